"""Process groups: tensor parallelism over `torch.distributed` (gloo on the CPU, NCCL on CUDA)."""

from xllm.distributed.tensor_parallel import TensorParallel, split_counts

__all__ = ["TensorParallel", "split_counts"]
