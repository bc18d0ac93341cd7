"""Placement: which contiguous layers each node takes, from measured speed and memory.

One decode token costs, on each node that holds layers, its layers times its measured time per layer, plus,
for each worker in the chain, one measured hop. Each node's layers (their weights at its format, and their
KV cache for the context) must fit its memory cap. Workers take ranges in topology order; the master may
take a range too (first: its embedding is there, so no hop). Layers cost the same wherever they sit, so a
master suffix is never better than a prefix. The optimum is exact: a dynamic programme over workers ×
layers, deterministic for the same inputs (ties go to fewer hops, then to earlier workers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cake.errors import CakeError


class PlanError(CakeError):
    """No placement fits the cluster's memory."""


@dataclass(frozen=True)
class Node:
    """What the planner knows of one node: per-layer time, hop time, and room in layers."""

    name: str
    layer_ms: float  # one decode step of one layer, measured on the node at its dtype/quantization
    hop_ms: float  # one message to it and on (0 for the master)
    room: int  # bytes it offers for layers (weights + KV cache)
    layer_bytes: int  # what one layer takes there (weights at its format + KV cache for the context)
    chunk_ms: float = 0.0  # a prompt chunk through one layer (shown with the plan; decode time is what it minimises)

    @property
    def capacity(self) -> int:
        return self.room // self.layer_bytes if self.layer_bytes > 0 else 0


@dataclass(frozen=True)
class Plan:
    ranges: dict[str, tuple[int, int]]  # node -> [start, end) (only nodes with layers)
    token_ms: float  # the modelled time of one decode token

    def layers_of(self, name: str) -> list[int]:
        start, end = self.ranges.get(name, (0, 0))
        return list(range(start, end))


def plan(layers: int, master: Node, workers: list[Node]) -> Plan:
    """The fastest placement of `layers` layers: the master a prefix (possibly empty), then each worker in
    order a contiguous range (possibly empty)."""
    k = len(workers)
    # best[j][n]: (cost, hops) of placing n layers on the first j workers, each taking a range or none
    best = [[(0.0, 0)] + [(math.inf, 0)] * layers]
    take: list[list[int]] = []
    for w in workers:
        prev, row, choice = best[-1], [], []
        for n in range(layers + 1):
            top = min(n, w.capacity)
            pick, value = 0, prev[n]
            for x in range(1, top + 1):
                c, h = prev[n - x]
                cand = (c + x * w.layer_ms + w.hop_ms, h + 1)
                if cand < value:
                    pick, value = x, cand
            row.append(value)
            choice.append(pick)
        best.append(row)
        take.append(choice)
    options = []
    for p in range(min(layers, master.capacity) + 1):
        c, h = best[k][layers - p]
        if c < math.inf:
            options.append(((c + p * master.layer_ms, h), p))
    if not options:
        raise PlanError(infeasible(layers, master, workers))
    (cost, _), p = min(options)
    ranges = {master.name: (0, p)} if p else {}
    n = layers - p
    spans = []
    for j in range(k, 0, -1):
        x = take[j - 1][n]
        spans.append((workers[j - 1].name, x))
        n -= x
    start = p
    for name, x in reversed(spans):
        if x:
            ranges[name] = (start, start + x)
            start += x
    return Plan(ranges, cost)


def infeasible(layers: int, master: Node, workers: list[Node]) -> str:
    """The one line for a cluster that cannot hold the model."""
    nodes = [master, *workers]
    need = sum(n.layer_bytes for n in nodes) / len(nodes) * layers
    offered = sum(n.room for n in nodes)
    fits = sum(n.capacity for n in nodes)
    return (f"the model's {layers} layers need about {need / 1e9:.1f} GB at the nodes' formats, the cluster offers "
            f"{offered / 1e9:.1f} GB (room for {fits} layers); quantize (--quantize int4 needs about a quarter of "
            f"bf16), raise --max-memory, or add a worker")
