"""`cake --check`: reach every worker in the topology and show what it serves, without loading weights.

For setting up a cluster: each worker's handshake (version, cluster key, layers against the topology),
its device, dtype, context and free memory, and the round-trip time to it; then, for each pair of
consecutive workers, whether the first can relay hidden states to the second (one token of zeros
through both, in a throwaway session).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass, replace

import torch

from cake import wire
from cake.client import Options, SessionsLost, WorkerLink
from cake.errors import CakeError
from cake.layer_ranges import format_layers
from cake.memory import gb
from cake.devices import compute_unit, machine_id, pick_device
from cake.master import RemoteStage, model_mismatch, pipelines_long_prompts, quantization_said, worker_hardware
from cake.model.config import load_config
from cake.relay_chain import RelayChain
from cake.topology import Stage, Worker, load_topology

PINGS = 5
RELAY_PROBE_TIMEOUT = 10.0  # seconds for one token through two workers' layers


@dataclass
class WorkerStatus:
    worker: Worker
    info: wire.Info | None = None
    rtt_ms: float = 0.0
    error: str = ""


async def probe(worker: Worker, options: Options) -> WorkerStatus:
    link = WorkerLink(worker, options)
    try:
        try:
            await link.connect_once()
        except ConnectionError as e:  # nothing listens there: down now, no point waiting --retry-timeout
            if "refused" in str(e):
                return WorkerStatus(worker, error=f"{link.label} is unreachable ({e}): nothing listens there; "
                                                  f"start it (a worker listens once its layers are loaded)")
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
        link.shutdown()


def relay_pairs(stages: list[Stage]) -> list[tuple[Stage, Stage]]:
    """Consecutive stages on two different workers: where the master relays."""
    return [(a, b) for a, b in zip(stages, stages[1:])
            if a.worker is not None and b.worker is not None and a.worker.name != b.worker.name]


async def probe_relay(a: Stage, b: Stage, hidden_size: int, options: Options) -> str:
    """'' if worker a passes one token's hidden states on to worker b, else what went wrong. (The
    throwaway session holds a KV cache on each worker for a moment, and is ended at once.)"""
    quick = replace(options, request_timeout=RELAY_PROBE_TIMEOUT, retry_timeout=min(options.retry_timeout, 5.0))
    links = [WorkerLink(a.worker, quick), WorkerLink(b.worker, quick)]
    session = f"cake-check-{uuid.uuid4().hex[:12]}"
    try:
        chain = RelayChain([RemoteStage(a, links[0]), RemoteStage(b, links[1])])
        await chain.forward([session], [0], torch.zeros(1, 1, hidden_size))
        return ""
    except SessionsLost as e:
        return (f"no answer through worker '{e.worker}' within {RELAY_PROBE_TIMEOUT:g}s, or its connection broke; "
                f"check that '{a.worker.name}' can reach {b.worker.address}")
    except CakeError as e:
        return str(e)
    finally:
        for link in links:
            await link.end([session])
            link.shutdown()


def run_check(model_dir: str, topology_path: str | None, options: Options, device: str = "auto") -> None:
    config = load_config(model_dir)
    topology = load_topology(topology_path)
    stages = topology.stages(config.num_hidden_layers)
    statuses = asyncio.run(_probe_all(list(topology.workers.values()), options))
    for st in statuses:  # what the master would refuse when it connects
        if st.info is not None:
            st.error = model_mismatch(st.info, config)
    ready = not any(st.error for st in statuses)
    relays = []
    if ready and options.relay:
        relays = asyncio.run(_probe_relays(relay_pairs(stages), config.hidden_size, options))
    local = [i for s in stages if s.worker is None for i in range(s.start, s.end)]
    print(f"{config.arch}: {config.num_hidden_layers} layers in {len(stages)} stage(s): "
          + " -> ".join(map(str, stages)))
    print("master: embedding, head" + (f", layers {format_layers(local)}" if local else ""))
    for st in statuses:
        w = st.worker
        if st.error:
            print(f"{w.name} ({w.address}): ERROR {st.error}")
            continue
        i = st.info
        print(f"{w.name} ({w.address}): ok, layers {format_layers(i.layers)} on {i.device} ({i.dtype}"
              f"{quantization_said(i)}), "
              f"context {i.capacity}, {i.memory / 2**30:.1f} GiB free, round trip {st.rtt_ms:.2f} ms"
              + (f", weights {gb(i.weight_bytes)}" if i.weight_bytes else "")
              + ("; its topology file differs from this one (it relays to the workers its own file names)"
                 if i.topology and i.topology != topology.digest else ""))
    for (a, b), problem in relays:
        if problem:
            print(f"relay {a} -> {b}: FAILED, the master will carry these hidden states itself: {problem}")
        else:
            print(f"relay {a} -> {b}: ok")
    if ready:
        print(pipeline_line(stages, statuses, options, device))
    bad = [st.worker.name for st in statuses if st.error]
    if bad:
        raise CakeError(f"{len(bad)} of {len(statuses)} worker(s) not ready: {', '.join(bad)}; see above")


def pipeline_line(stages: list[Stage], statuses: list[WorkerStatus], options: Options, device: str) -> str:
    """Whether a master with this topology (and --device) pipelines long prompts (Master.pipelines), and why."""
    infos = {st.worker.name: st.info for st in statuses}
    units = {worker_hardware(s.worker.host, infos[s.worker.name]) if s.worker is not None else
             (machine_id(), compute_unit(pick_device(device))) for s in stages}
    on = pipelines_long_prompts(options.pipeline, units)
    why = (f"--pipeline {options.pipeline}" if options.pipeline != "auto" else
           f"--pipeline auto: the stages compute on {len(units)} machine(s) or GPU(s)")
    return f"long prompts: {'pipelined across the stages' if on else 'one request per stage'} ({why})"


async def _probe_all(workers: list[Worker], options: Options) -> list[WorkerStatus]:
    return list(await asyncio.gather(*(probe(w, options) for w in workers)))


async def _probe_relays(pairs: list[tuple[Stage, Stage]], hidden_size: int, options: Options):
    return [((a, b), await probe_relay(a, b, hidden_size, options)) for a, b in pairs]
