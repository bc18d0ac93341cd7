"""Placement end to end: workers whose topology entries list no layers measure a layer and offer their
memory, the master plans (cake --plan prints it), assigns, and generates exactly."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from cake.generate import generate
from cake.run_master import MasterArgs, build_master
from cake.sampling import SamplingParams
from cake.topology import load_topology
from conftest import EOS, greedy_through, leave_out_layers, reference_greedy, run, test_device

N = 12
PROMPT = [128000, 9906, 11, 1268, 527, 499, 30]
# One tiny_model layer here: f32 weights (43008 x 4 bytes and two norms of 64) plus a session's KV cache
# for the default context of 4096 (2 x 2 heads x 16 x 4096 x 4 bytes): 1.22 MB.
LAYER = 43008 * 4 + 2 * 64 * 4 + 2 * 2 * 16 * 4096 * 4


def test_the_master_plans_unplaced_workers_by_memory_and_generates_exactly(tiny_model, cluster, tmp_path):
    c = cluster(tiny_model, {"a": [], "b": []}, start=False)
    leave_out_layers(c.topology)  # the master places them
    assert all(not w.placed for w in load_topology(c.topology).workers.values())
    c.extras = {"a": ("--max-memory", f"{int(2.5 * LAYER)}B"), "b": ("--max-memory", f"{int(5.5 * LAYER)}B")}
    c.start_all()
    shown = subprocess.run([sys.executable, "-m", "cake", "--model", str(tiny_model), "--topology", str(c.topology),
                            "--plan", "--max-memory", "0", "--device", test_device()],
                           capture_output=True, text=True, timeout=180)
    assert shown.returncode == 0, shown.stderr
    saved = tmp_path / "planned.yml"
    saved.write_text(shown.stdout)
    planned = load_topology(saved)  # what --plan prints is a topology file as it is
    a, b = planned.workers["a"].layers, planned.workers["b"].layers
    assert 1 <= len(a) <= 2 and len(a) + len(b) == 6 and sorted(a + b) == list(range(6))  # a has room for 2
    assert planned.workers["a"].address == f"127.0.0.1:{c.ports['a']}"
    assert "# measured:" in shown.stdout and shown.stderr.count("\n") < 40

    args = MasterArgs(model_dir=str(tiny_model), topology=str(c.topology), device=test_device(), max_memory=0)
    master, _, _ = build_master(args)  # plans and assigns (its own event loop, before the master's)
    assert master.topology.planned  # what the cluster view reports as the plan's source

    want = reference_greedy(tiny_model, PROMPT, N)

    async def go():
        await master.connect()
        try:
            assert {link.info.name: tuple(link.info.layers) for link in master.links.values()} == {"a": a, "b": b}
            first = [t async for t in generate(master, PROMPT, SamplingParams(), N, EOS)]
            c.kill("b")  # it comes back without its layers: the master tells it again when it reconnects
            c.start("b")
            await asyncio.to_thread(c.wait, "b")
            return first, [t async for t in generate(master, PROMPT, SamplingParams(), N, EOS)]
        finally:
            await master.close()
    assert run(go()) == (want, want)
    assert "assigns layers" in c.log("a").read_text()
    assert c.log("b").read_text().count("assigns layers") == 2

    again, _, _ = build_master(args)  # the next master finds the workers serving the last plan's layers
    assert greedy_through(again, PROMPT, N) == want


def test_check_shows_the_plan_and_what_would_be_shipped_and_ships_nothing(tiny_model, cluster, tmp_path):
    """`cake --check` on unplaced workers, one without model files: the plan, each node's time per layer and
    room, and the bytes the master would ship (the layers' weights: 43008 f32 each, plus a header); no file
    reaches the worker's cache and no worker takes layers."""
    import re

    c = cluster(None, {"a": [], "b": []}, models={"a": tiny_model}, start=False)
    leave_out_layers(c.topology)
    cache = tmp_path / "cache-b"
    c.extras = {"a": ("--max-memory", f"{int(2.5 * LAYER)}B"),
                "b": ("--max-memory", f"{int(5.5 * LAYER)}B", "--cache-dir", str(cache))}
    c.start_all()
    shown = subprocess.run([sys.executable, "-m", "cake", "--model", str(tiny_model), "--topology", str(c.topology),
                            "--check", "--max-memory", "0", "--device", test_device()],
                           capture_output=True, text=True, timeout=180)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    out = shown.stdout
    assert re.search(r"^plan: one decode token about [\d.]+ ms", out, re.M), out
    assert "master: embedding, head, layers none;" in out
    assert out.count("ms a prompt chunk of 256 tokens") == 3, out  # the master's and each worker's, measured
    rows = {m[0]: m for m in re.findall(r"^(\w) \(127\.0\.0\.1:\d+\): ok, planned layers ([\d-]+) .*?, ([\d.]+) ms "
                                          r"a layer \([\d.]+ ms a prompt chunk of 256 tokens\), room [\d.]+ MB for (\d) layer\(s\)(.*)$", out, re.M)}
    assert set(rows) == {"a", "b"}, out
    assert (rows["a"][3], rows["b"][3]) == ("2", "5")  # room over one layer's weights and KV cache
    first, _, last = rows["b"][1].partition("-")
    n = int(last or first) - int(first) + 1
    shipped = re.search(r"no model files: the master ships it layers [\d-]+, ([\d.]+) MB at most", rows["b"][4])
    assert shipped and abs(float(shipped[1]) - n * (43008 + 2 * 64) * 4 / 1e6) < 0.01 * n + 0.05, out
    assert re.search(r"^relay a\[[\d-]+\] -> b\[[\d-]+\]: not tried", out, re.M), out
    assert not list(cache.rglob("*.safetensors")) and not list(cache.rglob("*.part"))
    assert "assigns layers" not in c.log("a").read_text() + c.log("b").read_text()
