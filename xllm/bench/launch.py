"""Start a server in a subprocess and wait until it answers: `xllm serve` here, peers later."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    log_path: str

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launch(cmd: Sequence[str], port: int, log_dir: str, timeout: float = 300.0, health: str = "/health") -> Iterator[ServerProcess]:
    """Run `cmd` (a server listening on 127.0.0.1:`port`); yield once `health` answers 200; SIGTERM it at the end.

    Raises RuntimeError, with the server's log, if it exits or does not answer within `timeout` s.
    """
    log_path = os.path.join(log_dir, f"server-{port}.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{server.log()}")
            try:
                with urllib.request.urlopen(server.url + health, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer in {timeout} s:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def launch_xllm(log_dir: str, *args: str, threads: int = 2, timeout: float = 300.0) -> contextlib.AbstractContextManager[ServerProcess]:
    """`xllm serve` with `args` on a free port, with `threads` torch threads."""
    port = free_port()
    cmd = [sys.executable, "-m", "xllm.entrypoints.cli", "serve", "--port", str(port), "--threads", str(threads), *args]
    return launch(cmd, port, log_dir, timeout)
