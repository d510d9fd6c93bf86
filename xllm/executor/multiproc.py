"""Worker processes: one per rank, on this host and (with --nnodes) on others.

The engine listens on a control address; every rank connects to it (`worker_process.py`), sizes
its KV cache, and the engine gives all of them the smallest count. A step is pickled once and
sent to every rank; the executor waits for every rank's reply, watching the local processes'
sentinels as it waits, so a rank that dies mid-step is seen at once and not after a collective
times out. A watchdog thread watches them between steps too. Either way the executor is dead from
then on: `execute` raises `WorkerDiedError`, the local ranks left are killed (they would wait in a
collective for their dead peer), and the engine fails what was in flight.

Ranks of another host are started there by `xllm serve --nnodes N --node-rank R --dist-init-addr
host:port` (`run_node`), the way torchrun starts ranks: node 0's engine listens on port + 1 and the
process group meets at host:port. Their authkey comes from $XLLM_DIST_AUTHKEY (the same on every
host); on one host it is random.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import secrets
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Listener, wait

from xllm.config import EngineConfig
from xllm.executor.base import Executor, HandoffStats, WorkerDiedError
from xllm.executor.worker_process import dumps
from xllm.scheduler.output import RunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0  # loading a shard may take minutes; a rank that never connects fails the start


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _addresses(config: EngineConfig) -> tuple[str, tuple[str, int], bytes]:
    """(the process group's host:port, the engine's control address, the authkey)."""
    par = config.parallel
    if par.dist_init_addr is None:
        return f"127.0.0.1:{free_port()}", ("127.0.0.1", free_port()), secrets.token_bytes(16)
    host, _, port = par.dist_init_addr.rpartition(":")
    authkey = os.environ.get("XLLM_DIST_AUTHKEY", "xllm").encode()
    return par.dist_init_addr, (host, int(port) + 1), authkey


class RankProcess:
    """A rank's process: `python -m xllm.executor.worker_process`, a fresh interpreter (it
    imports neither the caller's main module nor its state, so a script needs no `__main__`
    guard). `sentinel` is a pidfd: readable once the process ends (for `connection.wait`)."""

    def __init__(self, rank: int, local_rank: int, per_node: int, control: tuple[str, int], authkey: bytes):
        import subprocess
        import sys

        self.name = f"xllm-rank{rank}"
        env = dict(os.environ, XLLM_WORKER_AUTHKEY=authkey.hex())
        cmd = [sys.executable, "-m", "xllm.executor.worker_process", str(rank), str(local_rank), str(per_node),
               f"{control[0]}:{control[1]}", str(os.getpid()), str(logging.getLogger("xllm").getEffectiveLevel() or 20)]
        self._popen = subprocess.Popen(cmd, env=env)
        self.pid = self._popen.pid
        self.sentinel = os.pidfd_open(self.pid)

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        import subprocess

        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        if self.is_alive():
            self._popen.terminate()


def _spawn(config: EngineConfig, control: tuple[str, int], authkey: bytes) -> list[RankProcess]:
    """Start this node's ranks (they are sent the configuration once they connect)."""
    par = config.parallel
    per_node = par.ranks_per_node
    return [RankProcess(par.node_rank * per_node + local, local, per_node, control, authkey) for local in range(per_node)]


def _kill(procs: list[RankProcess]) -> None:
    for p in procs:
        if p.is_alive():
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        p.join(timeout=5)


def _stop(procs: list[RankProcess], closing: threading.Event) -> None:
    closing.set()
    _kill(procs)


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig):
        par = config.parallel
        self.world_size = par.tensor_parallel_size
        self.handoff = HandoffStats()
        self._dead: str | None = None
        self._closing = threading.Event()  # shutdown (or exit) under way: ranks ending is expected
        self._lock = threading.Lock()
        dist_addr, control, authkey = _addresses(config)
        self._listener = Listener(control, authkey=authkey)
        self._config, self._dist_addr = config, dist_addr
        self.procs = _spawn(config, control, authkey)
        self._finalizer = weakref.finalize(self, _stop, list(self.procs), self._closing)  # at exit at the latest
        self.pids: dict[int, int] = {}  # rank -> pid
        self.conns: list = [None] * self.world_size
        try:
            self._accept_all()
            sized = self._gather("sized", START_TIMEOUT_S)
            self.num_blocks = min(int(m[1]) for m in sized.values())
            for conn in self.conns:
                conn.send_bytes(dumps(("blocks", self.num_blocks)))
            self._gather("ready", START_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        finally:
            self._listener.close()
        logger.info("%d worker rank(s) ready (pids %s); KV cache: %d blocks each", self.world_size,
                    ", ".join(str(self.pids[r]) for r in sorted(self.pids)), self.num_blocks)
        self._watchdog = threading.Thread(target=self._watch, name="xllm-rank-watchdog", daemon=True)
        self._watchdog.start()

    # ---- start-up ---------------------------------------------------------------------------
    def _accept_all(self) -> None:
        accepted: queue.Queue = queue.Queue()

        def accept():
            while True:
                try:
                    accepted.put(self._listener.accept())
                except OSError:  # closed
                    return
                except Exception as exc:  # noqa: BLE001 - a bad authkey: not one of ours
                    logger.warning("a connection to the control address was refused: %s", exc)

        threading.Thread(target=accept, name="xllm-accept", daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while any(c is None for c in self.conns):
            self._check_procs()
            if time.monotonic() > deadline:
                raise WorkerDiedError(f"worker ranks did not connect within {START_TIMEOUT_S:.0f} s")
            try:
                conn = accepted.get(timeout=0.2)
            except queue.Empty:
                continue
            kind, rank, pid = pickle.loads(conn.recv_bytes())
            if kind != "hello" or not 0 <= rank < self.world_size or self.conns[rank] is not None:
                conn.close()
                continue
            self.conns[rank], self.pids[rank] = conn, pid
            conn.send_bytes(dumps(("config", self._config, self._dist_addr)))

    def _check_procs(self) -> None:
        for p in self.procs:
            if p.exitcode is not None:
                raise WorkerDiedError(f"worker process {p.name} (pid {p.pid}) exited with code {p.exitcode}")

    def _gather(self, kind: str, timeout: float | None = None) -> dict[int, tuple]:
        """One message from every rank, watching the local processes while waiting."""
        pending = {conn: rank for rank, conn in enumerate(self.conns)}
        got: dict[int, tuple] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        sentinels = {p.sentinel: p for p in self.procs}
        while pending:
            ready = wait([*pending, *sentinels], timeout=1.0)
            for r in ready:
                if r in sentinels:
                    p = sentinels[r]
                    p.join(timeout=1)
                    self._fail(f"worker process {p.name} (pid {p.pid}) died (exit code {p.exitcode})")
                rank = pending.pop(r)
                try:
                    data = r.recv_bytes()
                except (EOFError, OSError):
                    self._fail(f"worker rank {rank} (pid {self.pids.get(rank)}) closed its connection: it died")
                self.handoff.bytes_in += len(data)
                message = pickle.loads(data)
                if message[0] == "error":
                    self._fail(f"worker rank {rank} failed:\n{message[1]}")
                if message[0] != kind:
                    self._fail(f"worker rank {rank} sent {message[0]!r}, expected {kind!r}")
                got[rank] = message
            if deadline is not None and time.monotonic() > deadline:
                self._fail(f"worker ranks did not answer within {timeout:.0f} s")
        return got

    # ---- failure ----------------------------------------------------------------------------
    def _fail(self, reason: str):
        with self._lock:
            if self._dead is None:
                self._dead = reason
                logger.error("%s; stopping the other ranks", reason)
        _kill(self.procs)
        raise WorkerDiedError(self._dead)

    def _watch(self) -> None:
        sentinels = {p.sentinel: p for p in self.procs}
        while self._dead is None and sentinels:
            ready = wait(list(sentinels), timeout=1.0)
            for r in ready:
                p = sentinels.pop(r)
                p.join(timeout=1)
                with self._lock:
                    if self._closing.is_set():
                        return
                    if self._dead is None:
                        self._dead = f"worker process {p.name} (pid {p.pid}) died (exit code {p.exitcode})"
                        logger.error("%s; stopping the other ranks", self._dead)
                _kill(self.procs)
                return

    @property
    def dead(self) -> str | None:
        return self._dead

    # ---- steps ------------------------------------------------------------------------------
    def execute(self, step: SchedulerOutput, prepared=None, before_forward: Callable[[], None] | None = None) -> RunnerOutput:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        started = time.perf_counter()
        bytes_in_before = self.handoff.bytes_in
        data = dumps(("step", step))
        try:
            for conn in self.conns:
                conn.send_bytes(data)
        except (OSError, BrokenPipeError):
            self._fail("a worker rank's connection broke while sending it a step: it died")
        if before_forward is not None:
            before_forward()
        replies = self._gather("out")
        ended = time.perf_counter()
        out: RunnerOutput = replies[0][1]
        for rank, (_, reply) in replies.items():
            if rank:
                out.stats.update(reply.stats)
        h = self.handoff
        handoff = (max(s["received_t"] for s in out.stats.values()) - started) + (ended - out.stats[0]["sent_t"])
        bytes_in = h.bytes_in - bytes_in_before
        h.steps += 1
        h.step_s += ended - started
        h.handoff_s += handoff
        h.bytes_out += len(data) * len(self.conns)
        if h.record:
            h.per_step.append((step.num_batched_tokens, handoff, ended - started, len(data) * len(self.conns) + bytes_in))
        return out

    def shutdown(self) -> None:
        self._closing.set()
        for conn in self.conns:
            if conn is None:
                continue
            try:
                conn.send_bytes(dumps(("shutdown",)))
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for p in self.procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        _kill(self.procs)
        for conn in self.conns:
            if conn is not None:
                conn.close()


def run_node(config: EngineConfig) -> int:
    """`xllm serve --node-rank R` (R > 0): run this host's ranks until one ends; returns its exit
    code. They connect to node 0's engine; if one dies, the others are stopped."""
    dist_addr, control, authkey = _addresses(config)
    procs = _spawn(config, control, authkey)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        while not stop.is_set():
            wait([p.sentinel for p in procs], timeout=0.5)
            ended = [p for p in procs if p.exitcode is not None]
            if ended:
                logger.info("rank process %s ended (exit code %s); stopping this node", ended[0].name, ended[0].exitcode)
                return ended[0].exitcode or 0
        return 0
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
        _kill(procs)
