"""The planner against brute force on small random clusters: the same optimum, caps never exceeded."""

from __future__ import annotations

import itertools
import random

import pytest

from cake.planner import Node, PlanError, plan


def brute_force(layers: int, master: Node, workers: list[Node]) -> float:
    """Every way to give the master a prefix and each worker, in order, a range (or none)."""
    best = float("inf")
    for counts in itertools.product(*(range(min(layers, n.capacity) + 1) for n in [master, *workers])):
        if sum(counts) != layers:
            continue
        cost = counts[0] * master.layer_ms + sum(x * w.layer_ms + w.hop_ms for x, w in zip(counts[1:], workers) if x)
        best = min(best, cost)
    return best


def random_cluster(rng: random.Random) -> tuple[int, Node, list[Node]]:
    layers = rng.randint(1, 9)
    def node(name: str, hop: float) -> Node:
        per_layer = rng.choice([100, 150, 400])
        return Node(name, rng.choice([0.5, 1.0, 2.0, 3.5]), hop, per_layer * rng.randint(0, 6), per_layer)
    return layers, node("master", 0.0), [node(f"w{i}", rng.choice([0.0, 0.3, 2.0, 9.0]))
                                         for i in range(rng.randint(1, 4))]


def test_the_plan_is_the_brute_force_optimum_and_keeps_every_cap():
    rng = random.Random(1)
    feasible = infeasible = 0
    for _ in range(400):
        layers, master, workers = random_cluster(rng)
        want = brute_force(layers, master, workers)
        if want == float("inf"):
            with pytest.raises(PlanError, match=r"^the model's \d+ layers need about"):
                plan(layers, master, workers)
            infeasible += 1
            continue
        got = plan(layers, master, workers)
        assert got.token_ms == pytest.approx(want)
        covered = sorted(i for name in got.ranges for i in got.layers_of(name))
        assert covered == list(range(layers))  # every layer once, contiguous ranges
        order = [n.name for n in [master, *workers] if n.name in got.ranges]
        assert [s for s, _ in sorted(got.ranges.values())] == sorted(s for s, _ in got.ranges.values())
        assert order == sorted(got.ranges, key=lambda n: got.ranges[n][0])  # topology order kept
        for n in [master, *workers]:
            start, end = got.ranges.get(n.name, (0, 0))
            assert (end - start) * n.layer_bytes <= n.room
        assert plan(layers, master, workers) == got  # deterministic
        feasible += 1
    assert feasible > 100 and infeasible > 20  # both kinds of instance were tried


def test_a_slow_node_takes_fewer_layers_and_an_expensive_hop_is_avoided():
    fast, slow = Node("a", 1.0, 1.0, 10**9, 10), Node("b", 3.0, 1.0, 10**9, 10)
    p = plan(8, Node("master", 100.0, 0, 0, 10), [fast, slow])
    assert p.ranges == {"a": (0, 8)}  # b would only add its hop and slower layers
    small = Node("a", 1.0, 1.0, 50, 10)  # room for 5 layers
    p = plan(8, Node("master", 100.0, 0, 0, 10), [small, slow])
    assert p.ranges == {"a": (0, 5), "b": (5, 8)}
    p = plan(8, Node("master", 0.5, 0, 10**9, 10), [Node("far", 0.1, 50.0, 10**9, 10)])
    assert p.ranges == {"master": (0, 8)}  # the master is faster than the far worker plus its hop
