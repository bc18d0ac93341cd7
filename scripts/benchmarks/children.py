"""The measuring processes: a Job names what a child measures; the parent starts every child at once, then
asks each in turn for one run, round after round, so a change in machine load hits every figure alike
and the ratios between them hold. A child answers on a private copy of its stdout, one JSON line per
command: "run", "concurrent N", "products", "finish"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cake import launch
from cake.errors import CakeError

from . import LAUNCHER, NATIVE_OMP, USER_GOMP_SPINCOUNT

NATIVE_KINDS = ("transformers", "bandwidth", "reads")  # not cake: run with the user's OpenMP settings


@dataclass
class Job:
    kind: str  # a key of subjects.SUBJECTS
    model: str  # a key of models.SPECS
    model_dir: str
    prompt_tokens: int = 0
    tokens: int = 0
    topology: str | None = None
    nbytes: int = 0  # bandwidth: bytes the matvec reads
    device: str = "cpu"
    dtype: str = "f32"
    relay: bool = True  # cake with workers: workers pass hidden states to each other
    busy_poll: str = "auto"  # cake: the master's --busy-poll
    server: bool = False  # cake: compute as the API server's master does (compute_in_thread)
    quantize: str = "none"  # cake: the master's --quantize
    group: int = 32  # cake: the master's --group-size
    sizes: list[int] = field(default_factory=list)  # reads: the byte counts to time a read of
    arch: str = "llama"  # the model's family (models.FAMILIES)


@dataclass
class Run:
    ttft_s: float
    decode_s: float
    decode_tokens: int

    @property
    def decode_ms(self) -> float:
        return 1e3 * self.decode_s / self.decode_tokens


@dataclass
class StageSplit:
    """One stage's decode steps as the master's StageStats saw them (prefill excluded)."""
    name: str
    calls: int
    total_s: float
    compute_s: float

    def __add__(self, other: StageSplit) -> StageSplit:
        return StageSplit(self.name, self.calls + other.calls, self.total_s + other.total_s,
                          self.compute_s + other.compute_s)

    def __sub__(self, other: StageSplit) -> StageSplit:
        return StageSplit(self.name, self.calls - other.calls, self.total_s - other.total_s,
                          self.compute_s - other.compute_s)


class Subject:
    """One measured thing: set up (and warmed up) in __init__, then measured one run at a time."""

    def run(self) -> dict:
        raise CakeError(f"{type(self).__name__} has no runs")

    def concurrent(self, sessions: int) -> dict:
        raise CakeError(f"{type(self).__name__} does not run concurrent sessions")

    def products(self) -> dict:
        raise CakeError(f"{type(self).__name__} has no matrix products to time")

    def finish(self) -> dict:
        return {}


def proc_status(name: str, pid: int | None = None) -> str | None:
    """A field of /proc/<pid>/status (of this process by default), as the kernel writes it; None where
    there is no such file or field."""
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def peak_rss(pid: int | None = None) -> int | None:
    """Peak resident set size in bytes (VmHWM) of a process, or of this one; None where unknown."""
    hwm = proc_status("VmHWM", pid)  # "123456 kB"
    if hwm is not None:
        return int(hwm.split()[0]) * 1024
    if pid is None:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux
    return None


def cpu_list(pid: int | None = None) -> str | None:
    """The CPUs a process may run on, as the kernel lists them ("0-3"); None where unknown."""
    return proc_status("Cpus_allowed_list", pid)


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.exists() else []
    return lines[-1].strip() if lines else "no output"


class Child:
    """A child process serving one Subject; its stderr goes to `<logs>/<name>.log` (name: the job's kind
    unless given)."""

    def __init__(self, job: Job, logs: Path, wrap: list[str] | None = None, name: str | None = None):
        self.kind, self.log = name or job.kind, logs / f"{name or job.kind}.log"
        env = dict(os.environ)
        if job.kind in NATIVE_KINDS:
            env[NATIVE_OMP] = "1"
            if USER_GOMP_SPINCOUNT is None:
                env.pop("GOMP_SPINCOUNT", None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([*(wrap or []), sys.executable, str(LAUNCHER), "--child",
                                          json.dumps(asdict(job))],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                         env=env)

    def ask(self, command: str | None = None) -> dict:
        """Send a command (None: just wait for the ready line) and return the answer."""
        try:
            if command:
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            rc = self.proc.wait()
            raise CakeError(f"{self.kind} measurement failed (exit {rc}): {last_line(self.log)} [log: {self.log}]")
        return json.loads(line)

    def stop(self) -> None:
        launch.stop(self.proc)


@contextmanager
def child(job: Job, logs: Path, wrap: list[str] | None = None, name: str | None = None) -> Iterator[Child]:
    c = Child(job, logs, wrap, name)
    try:
        yield c
    finally:
        c.stop()
