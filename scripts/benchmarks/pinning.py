"""Where each node runs: every process on every core (one machine), or each node on cores of its own
(--cores-per-node), as separate machines would give them, with one memory bus for all."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cake.errors import CakeError

from . import LAUNCHER, RUN_ON


def worker_ranges(layers: int, count: int = 2) -> dict[str, tuple[int, int]]:
    """The layers of `count` workers (worker-a, worker-b, ...) in contiguous ranges as even as can be."""
    bounds = [layers * i // count for i in range(count + 1)]
    return {f"worker-{chr(ord('a') + i)}": (bounds[i], bounds[i + 1]) for i in range(count)}


def physical_order(cpus: list[int], siblings: dict[int, set[int]] | None = None) -> list[int]:
    """`cpus` with the hardware threads of one physical core side by side (Linux numbers a core's two
    hyperthreads i and i + n/2, say), so that consecutive slices give nodes whole cores of their own.
    `siblings`: CPU -> the CPUs of its physical core (default: as /sys lists them)."""
    if siblings is None:
        siblings = {}
        for c in cpus:
            try:
                text = Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text()
            except OSError:
                continue
            siblings[c] = {int(x) for part in text.strip().split(",") if part
                           for x in (range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))}
    order: list[int] = []
    for c in sorted(cpus):
        if c not in order:
            order += sorted(({c} | siblings.get(c, set())) & set(cpus))
    return order


def core_sets(nodes: int, per_node: int, available: list[int] | None = None) -> tuple[tuple[int, ...], ...]:
    """Disjoint sets of `per_node` CPUs, one per node, from the CPUs this process may use (a physical
    core's hardware threads together: see physical_order)."""
    if available is None:
        if not hasattr(os, "sched_getaffinity"):
            raise CakeError("--cores-per-node pins processes to CPUs, which needs Linux")
        available = physical_order(sorted(os.sched_getaffinity(0)))
    need = nodes * per_node
    if need > len(available):
        raise CakeError(f"--cores-per-node {per_node} needs {need} CPU cores (a master and {nodes - 1} worker(s)), "
                        f"but this machine lets the benchmark use {len(available)}; lower --cores-per-node or --workers")
    return tuple(tuple(available[i * per_node:(i + 1) * per_node]) for i in range(nodes))


@dataclass(frozen=True)
class Placement:
    """How many loopback workers the benchmark runs, and where each node runs. Unpinned (no `cores`),
    every process shares every core, as on one machine. Pinned, node 0 (the master, and each all-local,
    transformers and matvec process, which run one at a time) and each worker get CPUs of their own, with
    a thread per CPU: what separate machines would give each node, but one memory bus for all."""
    workers: int = 2
    cores: tuple[tuple[int, ...], ...] = ()

    @property
    def label(self) -> str:
        return f"{self.workers} worker{'s' if self.workers != 1 else ''}"

    def ranges(self, layers: int) -> dict[str, tuple[int, int]]:
        return worker_ranges(layers, self.workers)

    def wrap(self, node: int) -> list[str]:
        """The launcher that pins node `node` (0: the master's set; i: worker i), or nothing."""
        if not self.cores:
            return []
        return [sys.executable, str(LAUNCHER), RUN_ON, ",".join(map(str, self.cores[node]))]

    def describe(self, layers: int) -> str:
        """The report's line for a pinned run (one with `cores`)."""
        show = lambda cpus: ",".join(map(str, cpus))  # noqa: E731
        workers = "; ".join(f"{name} on {show(cpus)}" for name, cpus in zip(self.ranges(layers), self.cores[1:]))
        return (f"PINNED: each node on {len(self.cores[0])} CPU core(s) of its own, a thread per core "
                f"(--cores-per-node): the master and the all-local, transformers and matvec processes on "
                f"{show(self.cores[0])}; {workers}; OMP_NUM_THREADS set to match")
