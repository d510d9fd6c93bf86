"""Executors: between the engine and its workers.

`UniProcExecutor` runs one worker in the engine's process; `MultiprocExecutor` runs one worker
process per rank (on this host, and ranks of other hosts that connect to it), sends each step to
every rank as a value and takes back the first rank's output and every rank's statistics. A
watchdog notices a rank that dies; the engine then fails what is in flight (`WorkerDiedError`).
"""

from xllm.executor.base import Executor, WorkerDiedError

__all__ = ["Executor", "WorkerDiedError"]
