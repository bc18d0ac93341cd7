"""Loopback workers: real `cake --mode worker` processes, each a contiguous share of the layers, and the
topology that names them (through the --link-delay-ms proxy when a network is emulated)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cake import launch
from cake.errors import CakeError

from . import LAUNCHER
from .children import cpu_list, last_line, peak_rss
from .pinning import Placement

WORKER_START_TIMEOUT = 300.0  # seconds: a worker reads its share of a 1.8 GB checkpoint first


@dataclass
class Cluster:
    topology: Path
    procs: dict[str, subprocess.Popen]

    def peak_rss(self) -> dict[str, int | None]:
        return {name: peak_rss(p.pid) for name, p in self.procs.items()}

    def cpus(self) -> dict[str, str | None]:
        return {name: cpu_list(p.pid) for name, p in self.procs.items()}


def write_topology(path: Path, ranges: dict[str, tuple[int, int]], ports: dict[str, int]) -> None:
    launch.write_topology(path, {name: (ports[name], [f"model.layers.{start}-{end - 1}"])
                                 for name, (start, end) in ranges.items()}, "benchmark worker")



@contextmanager
def running_workers(model_dir: Path, layers: int, logs: Path, device: str, dtype: str,
                    link_delay_ms: float = 0.0, busy_poll_us: int = 0, suffix: str = "",
                    placement: Placement = Placement(), extra: tuple[str, ...] = (),
                    timeout: float = WORKER_START_TIMEOUT) -> Iterator[Cluster]:
    """`cake --mode worker` processes on loopback (two unless `placement` says otherwise), each serving
    a contiguous share of the layers, on the CPUs `placement` gives them; always stopped. With a link
    delay, the topology sends everyone (master and workers) through a delaying proxy. `suffix` names a
    second set's topology and logs; `extra` is added to each worker's command line (--quantize)."""
    ranges = placement.ranges(layers)
    ports = {name: launch.free_port() for name in ranges}
    reached = {name: launch.free_port() for name in ranges} if link_delay_ms > 0 else ports
    topology = logs / f"topology{suffix}.yml"
    write_topology(topology, ranges, reached)
    procs: dict[str, subprocess.Popen] = {}
    try:
        if link_delay_ms > 0:
            spec = {"delay_ms": link_delay_ms, "routes": [[reached[n], ports[n]] for n in ranges]}
            procs["proxy"] = subprocess.Popen([sys.executable, str(LAUNCHER), "--proxy", json.dumps(spec)],
                                              stdout=subprocess.PIPE, text=True)
            if procs["proxy"].stdout.readline().strip() != "ready":
                raise CakeError("the --link-delay-ms proxy failed to start")
        for node, name in enumerate(ranges, start=1):
            log = logs / f"{name}{suffix}.log"
            log.unlink(missing_ok=True)
            procs[name] = launch.start_worker(model_dir, name, topology, ports[name], "--device", device,
                                              "--dtype", dtype, "--busy-poll", str(busy_poll_us), *extra, log=log,
                                              wrap=placement.wrap(node))
        for name in ranges:
            try:
                launch.wait_ready(ports[name], procs[name], timeout)
            except CakeError as e:
                log = logs / f"{name}{suffix}.log"
                raise CakeError(f"{name} failed to start ({e}): {last_line(log)} [log: {log}]") from None
        yield Cluster(topology, {name: procs[name] for name in ranges})
    finally:
        for proc in procs.values():
            launch.stop(proc)
