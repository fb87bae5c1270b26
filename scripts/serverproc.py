"""Start ``lookalike serve`` as a subprocess on a free loopback port: the one way the tests, the load test,
the attack script and the benchmarks run a real server process.

The server's output goes to a log file: a pipe nobody reads could fill up and block it.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(index: Path, port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """``lookalike serve INDEX --port PORT`` with extra environment ``env``; output to ``log_path``."""
    exe = shutil.which("lookalike", path=str(Path(sys.executable).parent)) or "lookalike"
    log = open(log_path, "ab")
    try:
        return subprocess.Popen([exe, "serve", str(index), "--port", str(port)], env=dict(os.environ, **env),
                                stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()  # the child has its own descriptor


def wait_ready(proc: subprocess.Popen, port: int, log_path: Path, timeout_s: float = 180) -> None:
    """Poll ``/readyz`` until it answers 200. Raises RuntimeError (with the log's tail) if the server
    exits or is not ready within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log_path.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"server did not become ready in {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def served(index: Path, env: dict[str, str] | None = None, log_path: Path | None = None,
           timeout_s: float = 180) -> Iterator[str]:
    """``lookalike serve INDEX`` on a free port for the ``with`` block; yields its base URL once
    ``/readyz`` answers 200, and stops it after. The log goes to ``log_path`` (by default a
    temporary file, removed after). Raises RuntimeError as :func:`wait_ready` does."""
    with tempfile.TemporaryDirectory(prefix="lookalike-serve-") as tmp:
        log = Path(log_path) if log_path is not None else Path(tmp) / "server.log"
        port = free_port()
        proc = spawn(index, port, env or {}, log)
        try:
            wait_ready(proc, port, log, timeout_s)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(proc)
