"""`cake --check`: reach every worker in the topology and show what it serves, without loading weights.

For setting up a cluster: each worker's handshake (version, cluster key, layers against the topology),
its device, dtype, context and free memory, and the round-trip time to it; where workers list no layers,
the plan the master would make and what it would ship to workers without model files; then, for each pair
of consecutive workers that serve their layers, whether the first can relay hidden states to the second
(one token of zeros through both, in a throwaway session).
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
from cake.master_setup import MasterArgs, supplier as master_supplier
from cake.model.config import LlamaConfig, load_config
from cake.relay_chain import RelayChain
from cake.placement import chunk_said
from cake.shipping import Supplier
from cake.topology import Stage, Topology, Worker, load_topology

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


def run_check(args: MasterArgs, options: Options) -> None:
    config = load_config(args.model_dir)
    topology = load_topology(args.topology)
    topology.check_layers(config.num_hidden_layers)
    supplier = master_supplier(args, config, topology)  # the config only, while looking: never a layer
    options = replace(options, supply=supplier, look=True)
    statuses = asyncio.run(_probe_all(list(topology.workers.values()), options))
    for st in statuses:  # what the master would refuse when it connects
        if st.info is not None:
            st.error = model_mismatch(st.info, config)
    ready = not any(st.error for st in statuses)
    planned, plan_lines = topology, []
    if topology.unplaced and ready:
        planned, plan_lines = _plan(args, config, topology, statuses)
    stages = planned.stages(config.num_hidden_layers) if not planned.unplaced else []
    relays = []
    if ready and options.relay:
        relays = asyncio.run(_probe_relays(relay_pairs(stages), config.hidden_size, options, statuses))
    local = [i for i in range(config.num_hidden_layers) if i not in planned.owner_of()]
    print(f"{config.arch}: {config.num_hidden_layers} layers"
          + (f" in {len(stages)} stage(s): " + " -> ".join(map(str, stages)) if stages else ""))
    print("\n".join(plan_lines) or "master: embedding, head" + (f", layers {format_layers(local)}" if local else ""))
    for st in statuses:
        print(_worker_line(st, planned, topology, supplier))
    for (a, b), problem in relays:
        if problem is None:
            print(f"relay {a} -> {b}: not tried (a worker on it takes its layers when the master starts)")
        elif problem:
            print(f"relay {a} -> {b}: FAILED, the master will carry these hidden states itself: {problem}")
        else:
            print(f"relay {a} -> {b}: ok")
    if ready and stages:
        print(pipeline_line(stages, statuses, options, args.device))
    bad = [st.worker.name for st in statuses if st.error]
    if bad:
        raise CakeError(f"{len(bad)} of {len(statuses)} worker(s) not ready: {', '.join(bad)}; see above")


def _plan(args: MasterArgs, config: LlamaConfig, topology: Topology,
          statuses: list[WorkerStatus]) -> tuple[Topology, list[str]]:
    """The plan the master would make now, as lines for the check (cake.placement)."""
    from cake import placement

    master = placement.master_node(config, args.model_dir, args.device, args.dtype, args.quantize, args.group_size,
                                   args.context, args.max_memory)
    found = {st.worker.name: (st.info, st.rtt_ms) for st in statuses}
    planned, result, nodes = placement.make_plan(config, topology, master, found)
    local = [i for i in range(config.num_hidden_layers) if i not in planned.owner_of()]
    m = nodes["master"]
    return planned, [f"plan: one decode token about {result.token_ms:.2f} ms (layers x time per layer + one hop "
                     f"per worker); `cake --plan` prints it as a topology file",
                     f"master: embedding, head, layers {format_layers(local) if local else 'none'}; "
                     f"{m.layer_ms:.3f} ms a layer ({chunk_said(m.chunk_ms)}), "
                     f"room {gb(m.room)} for {m.capacity} layer(s)"]


def _worker_line(st: WorkerStatus, planned: Topology, topology: Topology, supplier: Supplier | None) -> str:
    w = st.worker
    if st.error:
        return f"{w.name} ({w.address}): ERROR {st.error}"
    i = st.info
    layers = planned.workers[w.name].layers
    placed = not topology.workers[w.name].layers
    line = (f"{w.name} ({w.address}): ok, {'planned ' if placed else ''}layers "
            f"{format_layers(layers) if layers else 'none'} on {i.device} ({i.dtype}{quantization_said(i)}), "
            f"context {i.capacity}, {i.memory / 2**30:.1f} GiB free, round trip {st.rtt_ms:.2f} ms"
            + (f", weights {gb(i.weight_bytes)}" if i.weight_bytes else ""))
    if i.layer_us:
        line += (f", {i.layer_us / 1e3:.3f} ms a layer"
                 + (f" ({chunk_said(i.chunk_us / 1e3)})" if i.chunk_us else "")
                 + f", room {gb(i.room)} for {i.room // max(1, i.layer_bytes)} layer(s)")
    if i.fetches and supplier is not None and layers and list(i.layers) != list(layers):
        fmt = supplier.shipped_format(i)
        size = gb(supplier.ship_size(layers, fmt))
        line += (f"; no model files: the master ships it layers {format_layers(layers)}, "
                 + (f"{size} at most" if fmt == supplier.fmt else f"about {size} as {fmt.scheme} (quantized here first)")
                 + " (what its cache holds, checked by hash, is not sent)")
    elif i.fetches and layers:
        line += "; no model files: its cache holds its layers"
    if i.topology and i.topology != topology.digest:
        line += "; its topology file differs from this one (it relays to the workers its own file names)"
    return line


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


async def _probe_relays(pairs: list[tuple[Stage, Stage]], hidden_size: int, options: Options,
                        statuses: list[WorkerStatus]):
    """Each pair's problem ('' for none), or None where a worker does not serve its stage's layers yet."""
    serving = {st.worker.name: set(st.info.layers) for st in statuses if st.info is not None}

    def serves(s: Stage) -> bool:
        return set(range(s.start, s.end)) <= serving.get(s.worker.name, set())

    return [((a, b), await probe_relay(a, b, hidden_size, options) if serves(a) and serves(b) else None)
            for a, b in pairs]
