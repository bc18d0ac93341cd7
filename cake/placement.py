"""From a topology whose workers list no layers to one that says who runs what: measure a layer here, ask
each worker what it measured and offers, plan (cake.planner), tell the workers, and write the plan as the
seed's YAML so it can be kept and reused."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace

import torch

from cake import wire
from cake.client import Options, WorkerLink
from cake.errors import CakeError
from cake.layer_ranges import format_layers
from cake.memory import free_memory, gb
from cake.model.config import LlamaConfig
from cake.model.kv_cache import KVCache, Row
from cake.model.layer import DecoderLayer
from cake.model.loader import Quantization, matrix_shape, share_bytes
from cake.model.quant import QuantLinear, quantize
from cake.model.stack import LayerStack
from cake.model.tensor_names import is_matrix, layer_parts
from cake.planner import Node, Plan, plan
from cake.topology import Topology, Worker

log = logging.getLogger("cake.placement")

TIMED_STEPS = 7
CHUNK = 256  # tokens of a prompt chunk (the master's pipelined chunks are as long)
MEASURE_S = 0.2  # seconds of steps at least, for a layer that takes less (up to 60 steps)


def layer_bytes(config: LlamaConfig, fmt: Quantization, dtype: torch.dtype, context: int) -> int:
    """What one decoder layer takes on a node: its weights at the node's format and a session's KV cache
    for the context (the largest layer, where a model's layers differ)."""
    kv = 2 * config.num_key_value_heads * config.head_dim * context * torch.empty((), dtype=dtype).element_size()
    return max(share_bytes(config, [i], fmt, dtype) for i in range(config.num_hidden_layers)) + kv


@dataclass(frozen=True)
class LayerTime:
    """What one decoder layer of this model takes on a node, measured there."""

    decode_us: int  # one decode step (one token)
    chunk_us: int  # one prompt chunk of CHUNK tokens


@torch.inference_mode()
def measure_layer(config: LlamaConfig, fmt: Quantization, dtype: torch.dtype, device: torch.device) -> LayerTime:
    """One decode step and one prompt chunk through one layer of this model's shape, at this node's dtype and
    quantization, on random weights (a mixture of experts with only the experts a token uses: the time of a
    step; a chunk routes to more of them, so its time is a floor there)."""
    c = replace(config, num_experts=config.experts_per_token) if config.num_experts else config
    index = next((i for i in range(c.num_hidden_layers) if c.moe(i)), 0)
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for key, names in layer_parts(c, index).items():
        if key.endswith("norm"):
            weights[key] = torch.ones(c.head_dim if key in ("q_norm", "k_norm") else c.hidden_size, dtype=dtype,
                                      device=device)
            continue
        rows = sum(matrix_shape(n.replace(".bias", ".weight"), c)[0] for n in names)
        if key.startswith("b"):  # a bias
            weights[key] = torch.zeros(rows, dtype=dtype, device=device)
            continue
        w = torch.randn(rows, matrix_shape(names[0], c)[1], generator=gen) * 0.02
        quantized = fmt.scheme != "none" and is_matrix(key)
        weights[key] = QuantLinear(quantize(w, fmt.scheme, fmt.group), device, dtype) if quantized else w.to(
            device, dtype)
    stack = LayerStack(c, {index: DecoderLayer(index, c, weights)}, CHUNK, dtype, device)
    stack.graphs = None

    def run(tokens: int, position: int, cache: KVCache) -> float:
        x = torch.randn(1, tokens, c.hidden_size, generator=gen).to(device, dtype)
        _sync(device)
        t0 = time.perf_counter()
        stack.forward(x, [Row(cache, position)], index, index + 1)
        _sync(device)
        return time.perf_counter() - t0

    cache = KVCache([index], c, CHUNK, dtype, device)
    steps, start = [], time.perf_counter()
    # The least disturbed step, over a fifth of a second at least: another process starting up beside this
    # one (a worker's neighbour, on a shared machine) would otherwise take every one of a few short steps.
    while len(steps) < 2 + TIMED_STEPS or (time.perf_counter() - start < MEASURE_S and len(steps) < 62):
        steps.append(run(1, len(steps), cache))
    chunks = [run(CHUNK, 0, cache)]  # the first warms the kernels for this shape, unless it is long already
    while len(chunks) < 3 and chunks[0] < 1.0:
        chunks.append(run(CHUNK, 0, cache))
    return LayerTime(max(1, int(1e6 * min(steps[2:]))), max(1, int(1e6 * min(chunks[1:] or chunks))))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def room(device: torch.device, max_memory: int | None, reserve: int = 0) -> int:
    """Bytes a node offers for layers: its free memory less `reserve` (the master's embedding and head),
    and no more than --max-memory."""
    free = max(0, free_memory(device) - reserve)
    return free if max_memory is None else min(free, max_memory)


async def survey(topology: Topology, options: Options) -> dict[str, tuple[wire.Info, float]]:
    """Each worker's handshake (what it measured and offers) and the median round trip to it, in ms."""
    from cake.check import probe

    looking = replace(options, look=True)  # nothing is shipped yet, and earlier plans' layers are no error
    found = await asyncio.gather(*(probe(w, looking) for w in topology.workers.values()))
    for st in found:
        if st.error:
            raise CakeError(f"worker '{st.worker.name}' at {st.worker.address}: {st.error}")
    return {st.worker.name: (st.info, st.rtt_ms) for st in found}


def make_plan(config: LlamaConfig, topology: Topology, master: Node,
              survey: dict[str, tuple[wire.Info, float]]) -> tuple[Topology, Plan, dict[str, Node]]:
    """The plan for the unplaced workers (and the master), over the layers no placed worker lists: those
    form one sequence for the planner, in order."""
    nodes = {}
    for w in topology.unplaced:
        info, rtt = survey[w.name]
        if not info.layer_us:
            raise CakeError(f"worker '{w.name}' did not measure a layer; run the same cake version on every node")
        nodes[w.name] = Node(w.name, info.layer_us / 1e3, rtt, info.room, info.layer_bytes, info.chunk_us / 1e3)
    owned = topology.owner_of()
    free = [i for i in range(config.num_hidden_layers) if i not in owned]
    result = plan(len(free), master, list(nodes.values()))
    layers = {name: [free[i] for i in result.layers_of(name)] for name in nodes}
    return topology.with_layers(layers), result, {"master": master, **nodes}


def render(topology: Topology, result: Plan, nodes: dict[str, Node], config: LlamaConfig) -> str:
    """The planned topology in the seed's format, with the figures it came from as comments."""
    lines = [f"# cake --plan: {config.arch}, {config.num_hidden_layers} layers; one decode token about "
             f"{result.token_ms:.2f} ms (layers x time per layer + one hop per worker)"]
    m = nodes["master"]
    local = [i for i in range(config.num_hidden_layers) if i not in topology.owner_of()]
    lines.append(f"# master: layers {format_layers(local) if local else 'none'}; {m.layer_ms:.3f} ms a layer "
                 f"({chunk_said(m.chunk_ms)}), room {gb(m.room)} for {m.capacity} layer(s)")
    for w in topology.workers.values():
        lines.append(f"{w.name}:")
        lines.append(f"  host: '{w.address}'")
        if w.description:
            lines.append(f"  description: '{w.description}'")
        n = nodes.get(w.name)
        if n is not None:
            lines.append(f"  # measured: {n.layer_ms:.3f} ms a layer ({chunk_said(n.chunk_ms)}), hop {n.hop_ms:.2f} ms, room "
                         f"{gb(n.room)} for {n.capacity} layer(s) of {gb(n.layer_bytes)}")
        if w.layers:
            lines.append("  layers:")
            lines += [f"    - 'model.layers.{r}'" for r in format_layers(w.layers).split(",")]
        else:  # an entry must list layers: this one is kept as a comment
            start = lines.index(f"{w.name}:")
            lines[start:] = [f"# {line}" for line in lines[start:]] + ["#   (no layers: the others are faster, "
                                                                         "or it has no room)"]
    return "\n".join(lines) + "\n"


def chunk_said(ms: float) -> str:
    """A prompt chunk's measured time through one layer, in words (--plan, --check)."""
    return f"{ms:.1f} ms a prompt chunk of {CHUNK} tokens" if ms else "prompt chunk not measured"


def master_node(config: LlamaConfig, model_dir: str, device: str, dtype: str, quantize: str | None, group: int,
                context: int | None, max_memory: int | None) -> Node:
    """What the master offers for layers: measured here at its own dtype and quantization, its room less
    its embedding and head (which are always there)."""
    from cake.devices import pick_device, pick_dtype
    from cake.model.loader import choose_quantization, resolve_context
    from cake.model.weights import WeightFiles

    dev = pick_device(device)
    dt = pick_dtype(dtype, dev, config.torch_dtype)
    fmt = choose_quantization(WeightFiles(model_dir), "model.embed_tokens.weight", quantize, group)
    head = share_bytes(config, [], fmt, dt, head=True)
    took = measure_layer(config, fmt, dt, dev)
    return Node("master", took.decode_us / 1e3, 0.0, room(dev, max_memory, head),
                layer_bytes(config, fmt, dt, resolve_context(config, context)), took.chunk_us / 1e3)


async def place(config: LlamaConfig, topology: Topology, options: Options, master: Node,
                assign: bool = True) -> tuple[Topology, str]:
    """Plan the unplaced workers (and the master's layers) and, with `assign`, tell every unplaced worker
    its layers; the planned topology and the plan as YAML."""
    found = await survey(topology, options)
    planned, result, nodes = make_plan(config, topology, master, found)
    text = render(planned, result, nodes, config)
    if assign:
        msg = assignment(planned)
        await asyncio.gather(*(_assign(w, planned.workers[w.name], msg, options, found[w.name][0].fetches)
                               for w in topology.unplaced))
    return planned, text


def assignment(planned: Topology) -> wire.Assign:
    """The plan as the message that tells a worker its layers (each worker's are one contiguous range)."""
    names = list(planned.workers)
    ranges = [planned.workers[n].layers for n in names]
    return wire.Assign(names, [r[0] if r else 0 for r in ranges], [r[-1] + 1 if r else 0 for r in ranges])


async def _assign(worker: Worker, planned: Worker, msg: wire.Assign, options: Options, fetches: bool) -> None:
    """Tell a worker its layers. One without model files that gets layers is given them first, on a
    connection that expects them (the master's supplier ships them, then assigns: cake.shipping)."""
    layers = planned.layers
    shipped = fetches and bool(layers)
    link = (WorkerLink(planned, replace(options, plan=msg)) if shipped else
            WorkerLink(worker, replace(options, look=True)))  # it may serve an earlier plan's layers
    try:
        if shipped:
            await link.ensure_connected()
            reply = link.info
        else:  # as it is before the plan: serving no layers
            reply, _ = await link.request(msg)
        if not isinstance(reply, wire.Info) or tuple(reply.layers) != layers:
            raise CakeError(f"worker '{worker.name}' did not take layers {format_layers(layers)}; see its log")
    finally:
        link.shutdown()
