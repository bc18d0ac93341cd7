"""`cake --check`: reach every worker in the topology and show what it serves, without loading weights.

For setting up a cluster: each worker's handshake (version, cluster key, layers against the topology),
its device, dtype, context and free memory, and the round-trip time to it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

from cake import wire
from cake.client import Options, WorkerLink
from cake.errors import CakeError
from cake.model.config import load_config
from cake.topology import Worker, format_layers, load_topology

PINGS = 5


@dataclass
class WorkerStatus:
    worker: Worker
    info: wire.Info | None = None
    rtt_ms: float = 0.0
    error: str = ""


async def probe(worker: Worker, options: Options) -> WorkerStatus:
    link = WorkerLink(worker, options)
    try:
        await link.ensure_connected()
        times = []
        for _ in range(PINGS):
            t0 = time.perf_counter()
            await link.request(wire.Ping())
            times.append(time.perf_counter() - t0)
        return WorkerStatus(worker, link.info, 1e3 * statistics.median(times))
    except Exception as e:  # every failure is reported on its row; the others are still probed
        return WorkerStatus(worker, error=str(e) if isinstance(e, CakeError) else f"{type(e).__name__}: {e}")
    finally:
        link.close()


def run_check(model_dir: str, topology_path: str | None, options: Options) -> None:
    config = load_config(model_dir)
    topology = load_topology(topology_path)
    stages = topology.stages(config.num_hidden_layers)
    statuses = asyncio.run(_probe_all(list(topology.workers.values()), options))
    local = [i for s in stages if s.worker is None for i in range(s.start, s.end)]
    print(f"{config.num_hidden_layers} layers in {len(stages)} stage(s): " + " -> ".join(map(str, stages)))
    print("master: embedding, head" + (f", layers {format_layers(local)}" if local else ""))
    for st in statuses:
        w = st.worker
        if st.error:
            print(f"{w.name} ({w.address}): ERROR {st.error}")
            continue
        i = st.info
        print(f"{w.name} ({w.address}): ok, layers {format_layers(i.layers)} on {i.device} ({i.dtype}), "
              f"context {i.capacity}, {i.memory / 2**30:.1f} GiB free, round trip {st.rtt_ms:.2f} ms")
    bad = [st.worker.name for st in statuses if st.error]
    if bad:
        raise CakeError(f"{len(bad)} of {len(statuses)} worker(s) not ready: {', '.join(bad)}; see above")


async def _probe_all(workers: list[Worker], options: Options) -> list[WorkerStatus]:
    return list(await asyncio.gather(*(probe(w, options) for w in workers)))
