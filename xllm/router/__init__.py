"""The cluster's router side (imports no torch): routing policies and the global KV-cache index.

The router process itself (`xllm router`, the etcd registry, the proxy) is issue 17's; these are
its pure parts, each tested on its own.
"""
