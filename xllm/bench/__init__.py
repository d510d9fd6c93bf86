"""Benchmarks of the engine against its peers: `xllm bench offline` (more to come).

Figures are ratios against a peer measured in the same run, plus the fraction of the machine's
measured compute and bandwidth rooflines; see the "Performance method" of the design notes.
"""
