"""Start and stop local worker processes: used by the demo, the benchmark and the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from cake.errors import CakeError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_topology(path: Path, workers: dict[str, tuple[int, list[str]]], description: str = "local worker") -> Path:
    """A topology file of workers on 127.0.0.1: name -> (port, ['model.layers.N-M', ...])."""
    lines = []
    for name, (port, layers) in workers.items():
        lines += [f"{name}:", f"  host: '127.0.0.1:{port}'", f"  description: '{description} {name}'", "  layers:"]
        lines += [f"    - '{spec}'" for spec in layers]
    path.write_text("\n".join(lines) + "\n")
    return path


def worker_command(model: str | Path | None, name: str, topology: str | Path, port: int, *extra: str) -> list[str]:
    """No `model`: the worker takes its layers from the master (cake.weight_cache)."""
    return [sys.executable, "-m", "cake", "--mode", "worker", *(["--model", str(model)] if model else []),
            "--name", name, "--topology", str(topology), "--address", f"127.0.0.1:{port}", *extra]


def start_worker(model: str | Path | None, name: str, topology: str | Path, port: int, *extra: str,
                 log: Path | None = None, env: dict | None = None, wrap: list[str] | None = None) -> subprocess.Popen:
    """`wrap`: a command the worker's command line is appended to (the benchmark's CPU pinning)."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([*(wrap or []), *worker_command(model, name, topology, port, *extra)], stdout=out,
                            stderr=out, env={**os.environ, **(env or {})})


def wait_ready(port: int, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:port (or the process dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise CakeError(f"worker on port {port} exited with code {proc.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise CakeError(f"worker on port {port} did not start listening within {timeout:.0f}s")


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
