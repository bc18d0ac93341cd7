"""The benchmark package (scripts/benchmarks/, run as scripts/bench.py): its arithmetic (concurrency window,
bytes a step reads, targets, topology) and real runs whose figures are checked for sanity: present,
positive, and consistent with each other. No timing is asserted, and the report's wording is not."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors import safe_open

from cake.errors import CakeError
from cake.topology import load_topology

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

from benchmarks import children, cli, figures, generation, models, pinning, quant, report, weights  # noqa: E402
from benchmarks.cluster import write_topology  # noqa: E402

BENCH = SCRIPTS / "bench.py"


def test_steady_rate_counts_only_the_window_where_every_session_decodes():
    # Session 0 decodes from t=0 to 10, session 1 from t=4 to 12: the window is (4, 10].
    stamps = [[0, 2, 4, 6, 8, 10], [4, 6, 8, 10, 12]]
    assert generation.steady_rate(stamps) == pytest.approx(6 / 6)  # 6, 8, 10 from each session


def test_steady_rate_of_one_session_is_its_decode_rate():
    assert generation.steady_rate([[1.0, 1.5, 2.0, 2.5]]) == pytest.approx(3 / 1.5)


def test_steady_rate_refuses_sessions_that_never_overlap():
    with pytest.raises(CakeError, match="raise --tokens"):
        generation.steady_rate([[0, 1, 2], [3, 4, 5]])


def test_prompt_is_fixed_and_free_of_special_ids():
    ids = models.prompt_ids(500)
    assert ids == models.prompt_ids(500) and ids != models.prompt_ids(500, seed=1)
    assert all(0 <= i < 128000 for i in ids)


def test_weight_bytes_match_the_checkpoint(tiny_model):
    with safe_open(tiny_model / "model.safetensors", framework="pt") as f:
        actual = {name: f.get_tensor(name).nbytes for name in f.keys()}
    w = weights.WeightBytes.read(tiny_model)
    assert w.total == sum(actual.values())
    layers = sum(n for name, n in actual.items() if name.startswith("model.layers."))
    assert w.decode_step == layers + actual["lm_head.weight"] + actual["model.norm.weight"]
    assert w.layer_range(0, 3) + w.layer_range(3, 6) == layers
    assert w.master == actual["model.embed_tokens.weight"] + actual["lm_head.weight"] + actual["model.norm.weight"]


def test_a_tied_head_is_read_from_the_embedding(tied_model):
    w = weights.WeightBytes.read(tied_model)
    assert w.head == 0 and w.decode_step == sum(w.layers.values()) + w.norm + w.embed


def test_corrupt_cached_model_is_one_clear_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"ab")
    with pytest.raises(CakeError, match="delete the folder"):
        weights.WeightBytes.read(tmp_path)


def test_topology_splits_layers_in_halves(tmp_path):
    path = tmp_path / "topology.yml"
    write_topology(path, pinning.worker_ranges(8), {"worker-a": 1234, "worker-b": 1235})
    stages = load_topology(path).stages(8)
    assert [(s.start, s.end, s.worker.name, s.worker.port) for s in stages] == [
        (0, 4, "worker-a", 1234), (4, 8, "worker-b", 1235)]


def test_workers_take_contiguous_ranges_as_even_as_can_be(tmp_path):
    assert pinning.worker_ranges(8, 1) == {"worker-a": (0, 8)}
    assert pinning.worker_ranges(8, 3) == {"worker-a": (0, 2), "worker-b": (2, 5), "worker-c": (5, 8)}
    assert pinning.worker_ranges(16) == pinning.worker_ranges(16, 2) == {"worker-a": (0, 8), "worker-b": (8, 16)}
    path = tmp_path / "topology.yml"
    ranges = pinning.worker_ranges(8, 3)
    write_topology(path, ranges, {name: 2000 + i for i, name in enumerate(ranges)})
    assert [(s.start, s.end, s.worker.name) for s in load_topology(path).stages(8)] == [
        (0, 2, "worker-a"), (2, 5, "worker-b"), (5, 8, "worker-c")]


def test_pinned_nodes_get_disjoint_cores_or_one_clear_error():
    assert pinning.core_sets(3, 2, list(range(8))) == ((0, 1), (2, 3), (4, 5))
    assert pinning.core_sets(2, 1, [4, 9]) == ((4,), (9,))
    with pytest.raises(CakeError, match=r"--cores-per-node 1 needs 3 CPU cores \(a master and 2 worker\(s\)\), "
                                        r"but this machine lets the benchmark use 2; lower"):
        pinning.core_sets(3, 1, [0, 1])
    # Hyperthreads numbered i and i + 4: each node gets whole physical cores, not halves of the same ones.
    siblings = {c: {c % 4, c % 4 + 4} for c in range(8)}
    order = pinning.physical_order(list(range(8)), siblings)
    assert order == [0, 4, 1, 5, 2, 6, 3, 7]
    assert pinning.core_sets(3, 2, order) == ((0, 4), (1, 5), (2, 6))
    assert pinning.physical_order([0, 1, 2], {}) == [0, 1, 2]  # where /sys says nothing


def test_bench_refuses_a_pinning_the_machine_cannot_give():
    out = subprocess.run([sys.executable, str(BENCH), "--cores-per-node", "4096"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert "--cores-per-node 4096 needs 12288 CPU cores" in out.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU pinning is Linux's")
def test_a_pinned_process_and_its_torch_threads_stay_on_their_cores():
    """The launcher the benchmark pins every node with (a real process): the command it becomes runs on
    the given CPU with one torch thread per CPU, and without the OpenMP default importing cake sets."""
    cpu = max(os.sched_getaffinity(0))
    probe = ("import json, os, torch; print(json.dumps([sorted(os.sched_getaffinity(0)), torch.get_num_threads(), "
             "os.environ.get('GOMP_SPINCOUNT')]))")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, str(BENCH), "--run-on", str(cpu), sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == [[cpu], 1, None]


def test_a_pinned_one_worker_run_has_one_hop_and_its_cores_in_the_figures():
    r = _fake_result("tiny")
    stages = [children.StageSplit("worker-a[0-7]", 63, 0.4, 0.36)]
    runs = [children.Run(ttft_s=0.1, decode_s=10.2 * 63 / 1e3, decode_tokens=63)] * 3
    one = figures.Measured(runs=runs, stage_runs=[stages] * 3, peak_rss=900_000_000, threads=1,
                           concurrency={1: [100.0], 2: [180.0], 4: [300.0]}, cpus="0")
    r = replace(r, workers=one, worker_rss={"worker-a": 300_000_000}, no_relay=None,
                placement=pinning.Placement(1, ((0,), (1,))), worker_cpus={"worker-a": "1"})
    assert r.hops == 1 and r.hop_overhead_us == pytest.approx(200.0)  # (10.2 - 10.0) ms over 1 hop
    assert [t.check for t in r.targets()][1] == "1 worker decode / all-local"
    assert not any("worker-b" in t.check for t in r.targets())
    j = r.to_json()
    assert j["workers"] == 1 and j["cores_per_node"] == [[0], [1]] and "cake_workers_no_relay" not in j["speed"]
    assert j["cpus"]["worker"] == {"worker-a": "1"} and j["cpus"]["master"] == "0"
    report.report(r, quick=False)  # renders


def test_targets_pass_on_the_right_side_of_the_goal():
    assert figures.Target("speed", 1.6, 1.5, "x", at_least=True).passed
    assert not figures.Target("speed", 1.4, 1.5, "x", at_least=True).passed
    assert figures.Target("hop", 120, 150, "us", at_least=False).passed
    assert not figures.Target("hop", 180, 150, "us", at_least=False).passed


def _fake_result(name: str) -> object:
    """A ModelResult with made-up timings, to compute the figures without measuring anything."""
    spec = models.SPECS[name]
    layer = 10_000_000
    held = weights.WeightBytes({i: layer for i in range(spec.layers)}, embed=500_000_000, head=500_000_000, norm=4096)

    def measured(decode_ms: float, stages: list = (), rss: int = 900_000_000, **kw) -> object:
        runs = [children.Run(ttft_s=0.1, decode_s=decode_ms * 63 / 1e3, decode_tokens=63)] * 3
        return figures.Measured(runs=runs, stage_runs=[list(stages)] * 3, peak_rss=rss, threads=2, **kw)

    half = spec.layers // 2
    stages = [children.StageSplit(f"worker-a[0-{half - 1}]", 63, 0.2, 0.18),
              children.StageSplit(f"worker-b[{half}-{spec.layers - 1}]", 63, 0.2, 0.18)]
    return figures.ModelResult(
        spec, held, prompt_tokens=128, tokens=64, repeats=3,
        bandwidth=figures.Measured(matvec_s=[0.09, 0.1, 0.11]),
        transformers=measured(20.0), local=measured(10.0),
        workers=measured(10.2, stages, concurrency={1: [100.0], 2: [180.0], 4: [300.0]}),
        worker_rss={"worker-a": 300_000_000, "worker-b": 300_000_000})


@pytest.mark.parametrize("name, own_target, other_target", [
    ("tiny", "cake all-local decode / transformers", "cake all-local decode / bandwidth limit"),
    ("big", "cake all-local decode / bandwidth limit", "cake all-local decode / transformers"),
])
def test_each_model_reports_its_own_targets(name, own_target, other_target):
    r = _fake_result(name)
    checks = [t.check for t in r.targets()]
    assert own_target in checks and other_target not in checks
    assert ("4 sessions aggregate decode / 1 session" in checks) == (name == "big")
    assert all(t.passed for t in r.targets())  # the made-up timings meet every goal
    assert r.hop_overhead_us == pytest.approx(100.0)  # (10.2 - 10.0) ms over 2 hops
    j = r.to_json()
    assert [t["check"] for t in j["targets"]] == checks and all(t["passed"] for t in j["targets"])
    assert j["bandwidth"]["bound_tps"] == pytest.approx(10.0)  # the median matvec, 0.1 s
    assert j["bandwidth"]["fraction"] == pytest.approx(100.0 / 10.0)  # all-local 10 ms/tok against 100 ms
    assert j["bandwidth"]["achieved_gb_per_s"] == pytest.approx(j["step_bytes"]["total"] * 100.0 / 1e9)
    assert j["speed"]["cake_local"]["decode_ms"] == pytest.approx(10.0)


def test_busy_poll_comparison_goes_next_to_the_default():
    """With busy-polling on, workers without it are measured too: their speed and concurrent sessions."""
    r = _fake_result("big")
    runs = [children.Run(ttft_s=0.1, decode_s=11.0 * 63 / 1e3, decode_tokens=63)] * 3
    plain = figures.Measured(runs=runs, stage_runs=[[]] * 3, peak_rss=900_000_000, threads=2,
                             concurrency={1: [90.0], 2: [170.0], 4: [315.0]})
    r = replace(r, no_poll=plain, busy_poll_us=20000)
    j = r.to_json()
    assert j["speed"]["cake_workers_no_poll"]["decode_ms"] == pytest.approx(11.0)
    assert j["aggregate_tps"] == {1: 100.0, 2: 180.0, 4: 300.0}
    assert j["aggregate_tps_no_poll"] == {1: 90.0, 2: 170.0, 4: 315.0}
    report.report(r, quick=False)  # renders


def test_stage_split_is_the_median_runs():
    """One slow run (a cold GPU's first, say) must not skew the per-stage rows."""
    runs = [children.Run(0.1, d * 63 / 1e3, 63) for d in (50.0, 10.0, 12.0)]
    splits = [[children.StageSplit("worker-a[0-3]", 63, d * 63 / 1e3, 0.0)] for d in (50.0, 10.0, 12.0)]
    m = figures.Measured(runs=runs, stage_runs=splits)
    assert m.stages == splits[2]  # decode 12 ms: the median of 10, 12, 50


def test_link_delay_proxy_delivers_every_byte_in_order_and_late():
    """The --link-delay-ms proxy (a real process on loopback) must hold traffic both ways, and lose or
    reorder nothing, or the emulated-network figures mean nothing."""
    import asyncio
    import json
    import subprocess
    import time

    from cake import launch

    delay_ms = 40

    async def go() -> tuple[bytes, float]:
        async def echo(reader, writer):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        target = server.sockets[0].getsockname()[1]
        listen = launch.free_port()
        spec = {"delay_ms": delay_ms, "routes": [[listen, target]]}
        proxy = subprocess.Popen([sys.executable, str(BENCH), "--proxy", json.dumps(spec)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert await asyncio.to_thread(proxy.stdout.readline) == "ready\n"
            reader, writer = await asyncio.open_connection("127.0.0.1", listen)
            sent = b"".join(bytes([i]) * 5000 for i in range(20))
            t0 = time.monotonic()
            for i in range(0, len(sent), 7000):
                writer.write(sent[i:i + 7000])
                await writer.drain()
            got = await asyncio.wait_for(reader.readexactly(len(sent)), 10)
            elapsed = time.monotonic() - t0
            writer.close()
            return got == sent, elapsed
        finally:
            launch.stop(proxy)
            server.close()

    same, elapsed = asyncio.run(go())
    assert same
    assert elapsed >= 2 * delay_ms / 1e3  # there and back


def test_hop_probe_measures_every_layer_of_a_hop():
    """scripts/hop_probe.py end to end (real worker processes, one busy-polling): one line per series,
    each a positive median, and a forward's compute share below its round trip. No timing is asserted."""
    out = subprocess.run([sys.executable, str(SCRIPTS / "hop_probe.py"), "--requests", "12", "--busy-poll", "2000"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 14  # the asyncio client's 4 series twice: without and with busy-polling
    assert sum("busy-poll 2000 us" in line for line in lines) == 4
    for line in lines:
        median = float(re.search(r"([\d.]+) us", line.rsplit(" ms ", 1)[1]).group(1))  # after "gap N ms"
        assert median > 0
        if "forward" in line:
            compute = float(re.search(r"compute ([\d.]+) us, rest -?[\d.]+ us", line).group(1))
            assert 0 < compute < median


def test_the_api_servers_compute_goes_next_to_the_clis():
    r = _fake_result("tiny")
    runs = [children.Run(ttft_s=0.1, decode_s=12.4 * 63 / 1e3, decode_tokens=63)] * 3
    r = replace(r, local_server=figures.Measured(runs=runs, stage_runs=[[]] * 3, peak_rss=900_000_000, threads=2))
    speed = r.to_json()["speed"]["cake_local_server"]
    assert speed["decode_ms"] == pytest.approx(12.4) and speed["ttft_ms"] == pytest.approx(100.0)
    assert speed["prefill_tps"] == pytest.approx(1280.0)  # 128 prompt tokens in 0.1 s
    assert "cake_local_server" not in _fake_result("tiny").to_json()["speed"]


def test_prompt_bench_measures_stalls_and_pipelining(tiny_model):
    """scripts/prompt_bench.py end to end on a small model (real worker processes): every figure positive,
    the longest pause at least the median one, off/on the ratio of the medians it prints."""
    for measure in ("stall", "pipeline"):
        out = subprocess.run([sys.executable, str(SCRIPTS / "prompt_bench.py"), measure, "--model-dir", str(tiny_model),
                              "--repeats", "1", "--prompt-tokens", "600"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        line = out.stdout.splitlines()[1]
        if measure == "stall":
            alone, ttft, median, longest = (float(x) for x in re.search(
                r"alone (\d+) ms, with A decoding (\d+) ms;.* median (\d+) ms, longest (\d+) ms", line).groups())
            assert alone > 0 and ttft > 0 and longest >= median >= 0, line
        else:
            off, on, ratio = (float(x) for x in re.search(
                r"\(median (\d+)\).*\(median (\d+)\); off/on ([\d.]+)x", line).groups())
            assert off > 0 and on > 0 and ratio == pytest.approx(off / on, rel=0.05), line


# ---- other families (--arch) ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(models.FAMILIES))
def test_every_family_is_built_in_the_benchmark_shape_and_cake_reads_it_so(arch):
    """transformers' config of each family, as the benchmark makes it, read by cake: the tiny shape, head_dim
    hidden / heads whatever the family's default, and a mixture's experts."""
    from cake.model.config import LlamaConfig

    spec = models.SPECS["tiny"].as_family(arch)
    c = LlamaConfig.from_dict(models.family_config(spec).to_dict())
    assert c.arch == arch and not c.tie_word_embeddings
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.vocab_size) == (256, 8, 8, 2, 32, 128256)
    assert (c.num_experts, c.experts_per_token) == (spec.experts, spec.experts_per_token)
    if spec.experts:
        assert c.expert_intermediate_size == spec.expert_intermediate > 0 and spec.experts_per_token < spec.experts
        assert not c.dense_layers
    else:
        assert c.intermediate_size == 704
    assert spec.folder != models.SPECS["tiny"].folder or arch == "llama"


def test_a_step_of_a_mixture_reads_only_its_routed_experts():
    sizes = {"model.embed_tokens.weight": 1000, "lm_head.weight": 1000, "model.norm.weight": 10}
    for layer in range(2):
        sizes[f"model.layers.{layer}.self_attn.qkv.weight"] = 300
        sizes[f"model.layers.{layer}.mlp.gate.weight"] = 8
        for e in range(4):
            for part in ("gate_proj", "up_proj", "down_proj"):
                sizes[f"model.layers.{layer}.mlp.experts.{e}.{part}.weight"] = 100
    w = weights.WeightBytes.of(sizes)
    assert w.experts == {0: [300] * 4, 1: [300] * 4} and w.expert_total == 2400
    assert w.decode_step == 2 * (308 + 1200) + 10 + 1000  # every expert
    assert w.routed_step(2) == 2 * (308 + 600) + 10 + 1000  # two of four a layer
    step = weights.StepBytes.of(w, 2, kv=50)
    assert (step.weights, step.experts, step.experts_all, step.kv) == (2 * 308 + 1010, 1200, 2400, 50)
    assert step.total == w.routed_step(2) + 50
    dense = weights.WeightBytes.of({k: v for k, v in sizes.items() if ".experts." not in k})
    assert dense.experts == {} and weights.StepBytes.of(dense, 0, 0).total == dense.decode_step


def test_kv_read_is_the_filled_part_of_cakes_cache(tiny_model):
    from cake.model.loader import load_layers

    stack, config = load_layers(tiny_model, list(range(6)), "cpu", "f32", 64)
    full = stack.new_cache().nbytes  # 64 positions
    assert weights.kv_read_bytes(6, config.num_key_value_heads, config.head_dim, "f32", 63) == full
    assert weights.kv_read_bytes(6, config.num_key_value_heads, config.head_dim, "bf16", 31) == full // 4


def test_expert_bytes_are_the_checkpoints(tmp_path):
    """A small Qwen3-MoE built as the benchmark builds one: each expert's bytes are its three tensors'."""
    spec = replace(models.SPECS["tiny"], hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                   vocab=512).as_family("qwen3_moe")
    models.build_model(spec, tmp_path / "m")
    with safe_open(tmp_path / "m" / "model.safetensors", framework="pt") as f:
        actual = {name: f.get_tensor(name).nbytes for name in f.keys()}
    w = weights.WeightBytes.read(tmp_path / "m")
    assert sorted(w.experts) == [0, 1] and all(len(ns) == spec.experts for ns in w.experts.values())
    assert w.expert_total == sum(n for name, n in actual.items() if ".mlp.experts." in name)
    one = sum(n for name, n in actual.items() if name.startswith("model.layers.0.mlp.experts.0."))
    assert w.experts[0][0] == one == 3 * 64 * spec.expert_intermediate * 4
    assert w.routed_step(spec.experts_per_token) == w.decode_step - 2 * (spec.experts - spec.experts_per_token) * one
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]


def test_a_mixture_of_experts_through_real_processes(tmp_path):
    """scripts/bench.py --arch qwen3_moe end to end on the tiny shape (transformers' Qwen3MoeForCausalLM,
    cake all-local and through a worker): speeds positive, a step reads fewer bytes than all the experts,
    and the bandwidth fraction is the decode speed over the limit's. No timing is asserted."""
    out = subprocess.run([sys.executable, str(BENCH), "--quick", "--arch", "qwen3_moe", "--prompt-tokens", "8",
                          "--workers", "1", "--workdir", str(tmp_path), "--json", str(tmp_path / "out.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((tmp_path / "out.json").read_text())["models"]["qwen3_moe-tiny"]
    assert m["arch"] == "qwen3_moe" and m["transformers_class"] == "Qwen3MoeForCausalLM"
    for setup in ("transformers", "cake_local", "cake_workers"):
        assert m["speed"][setup]["decode_ms"] > 0 and m["speed"][setup]["prefill_tps"] > 0, setup
    step, spec = m["step_bytes"], m["spec"]
    assert 0 < step["experts"] < step["experts_all"]
    assert step["experts"] * spec["experts"] == step["experts_all"] * spec["experts_per_token"]  # k of E, all alike
    assert step["total"] == step["weights"] + step["experts"] + step["kv"] < m["weights"]["decode_step"]
    assert step["kv"] > 0 and step["weights"] > 0
    bw, local_tps = m["bandwidth"], 1e3 / m["speed"]["cake_local"]["decode_ms"]
    assert bw["gb_per_s"] > 0 and bw["fraction"] == pytest.approx(local_tps / bw["bound_tps"])
    assert bw["achieved_gb_per_s"] == pytest.approx(step["total"] * local_tps / 1e9)
    assert bw["achieved_gb_per_s"] == pytest.approx(bw["fraction"] * bw["gb_per_s"])
    assert m["aggregate_tps"]["1"] > 0 and m["worker_rss"]["worker-a"] > 0


def test_arch_option_is_checked():
    assert cli.parse_args(["--arch", "Qwen3, mixtral"]).arch == ["qwen3", "mixtral"]
    for bad in (["--arch", "gpt2"], ["--arch", ","], ["--arch", "mixtral", "--quantize", "int8"]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)


# ---- quantized weights (issue 16) ----------------------------------------------------------------------

def test_held_bytes_follow_the_formats_formulas():
    down = "model.layers.0.mlp.down_proj.weight"
    assert weights.held_bytes(down, (256, 704), "bf16") == 256 * 704 * 2
    assert weights.held_bytes(down, (256, 704), "f32", "int8") == 256 * 704 + 2 * 256  # a bf16 scale a row
    assert weights.held_bytes(down, (256, 704), "bf16", "int4", 32) == 256 * (704 // 2 + 22 * 4)  # scale+zero a group
    assert weights.held_bytes(down, (10, 300), "bf16", "int4", 32) == 10 * (320 // 2 + 10 * 4)  # last group padded
    assert weights.held_bytes("lm_head.weight", (1000, 64), "bf16", "int8") == 1000 * 66
    assert weights.held_bytes("model.embed_tokens.weight", (1000, 64), "bf16", "int4", 64) == 1000 * (32 + 4)
    # Norms stay in the node's dtype.
    assert weights.held_bytes("model.layers.3.input_layernorm.weight", (256,), "bf16", "int4") == 512
    assert weights.held_bytes("model.norm.weight", (256,), "f32", "int8") == 1024


@pytest.mark.parametrize("scheme", ["none", "int8", "int4"])
def test_held_bytes_are_what_cake_holds(tiny_model, scheme):
    """The benchmark's byte counts (its own formulas) against what cake's loaded layers and head say they
    hold, bf16 activations: the limit of each format is computed for the bytes cake really reads."""
    import torch

    from cake.model.loader import Quantization, load_head, load_layers

    stack, config = load_layers(tiny_model, list(range(6)), "cpu", "bf16", 64, quantize=scheme)
    head = load_head(tiny_model, config, torch.device("cpu"), torch.bfloat16,
                     fmt=Quantization(scheme, 32 if scheme == "int4" else 0))
    held = weights.WeightBytes.held(tiny_model, "bf16", scheme, 32)
    assert held.layer_range(0, 6) == stack.weight_bytes
    assert held.master == head.weight_bytes
    assert held.decode_step == stack.weight_bytes + held.norm + held.head


def test_quant_formats_put_the_baselines_first():
    labels = lambda fs: [(f.label, f.dtype) for f in fs]  # noqa: E731
    assert labels(quant.quant_formats(["int8", "int4"], "f32", "bf16")) == [
        ("f32", "f32"), ("bf16", "bf16"), ("int8", "bf16"), ("int4", "bf16")]
    assert labels(quant.quant_formats(["none", "int4"], "bf16", "bf16")) == [("bf16", "bf16"), ("int4", "bf16")]


def test_quantize_option_is_checked():
    assert cli.parse_args(["--quantize", "none,INT8, int4"]).quantize == ["none", "int8", "int4"]
    for bad in (["--quantize", "int3"], ["--quantize", ","], ["--group-size", "7"]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)


def _fake_quant(name: str, decode_ms: dict, limit_ms: dict, rss: int = 300_000_000) -> object:
    """A QuantResult with made-up timings (all-local decode and bandwidth limit per format)."""
    spec = models.SPECS[name]
    formats = quant.quant_formats(["int8", "int4"], "f32", "bf16")
    size = {"f32": 4, "bf16": 2, "int8": 1, "int4": 0.5}  # bytes a weight
    held = {f.label: weights.WeightBytes({i: int(2_500_000 * size[f.label]) for i in range(spec.layers)},
                                       embed=int(12_500_000 * size[f.label]), head=int(12_500_000 * size[f.label]),
                                       norm=0) for f in formats}

    def measured(ms: float, **kw) -> object:
        runs = [children.Run(ttft_s=0.1, decode_s=ms * 63 / 1e3, decode_tokens=63)] * 3
        return figures.Measured(runs=runs, peak_rss=rss, threads=2,
                              products=[{"wqkv": ms / 4e3, "head": ms / 4e3}] * 3, **kw)

    local = {f.label: measured(decode_ms[f.label], weight_bytes=held[f.label].total) for f in formats}
    workers = {label: measured(decode_ms[label] * 1.05) for label in ("int8", "int4")}
    reads = figures.Measured(reads_s=[[limit_ms[f.label] / 1e3 for f in formats]] * 3, read_dtype="f32",
                           read_kernels=["torch.mv"] * 4)
    ranges = pinning.worker_ranges(spec.layers)
    return quant.QuantResult(spec, formats, "bf16", 32, held, local, workers,
                             {label: {w: rss for w in ranges} for label in workers}, reads, 128, 64, 3)


def test_quant_targets_on_the_big_model():
    q = _fake_quant("big", {"f32": 100.0, "bf16": 50.0, "int8": 30.0, "int4": 25.0},
                    {"f32": 90.0, "bf16": 45.0, "int8": 22.5, "int4": 14.0})
    got = {t.check: (round(t.measured, 3), t.passed) for t in q.targets()}
    assert got["int8 decode / bf16 decode (all-local)"] == (1.667, True)  # >= 1.6
    assert got["int4 decode / bf16 decode (all-local)"] == (2.0, False)  # < 2.2
    assert got["int8 decode / its bandwidth limit"] == (0.75, False)  # < 0.8
    assert got["f32 decode / its bandwidth limit"] == (0.9, True)
    assert got["int4 decode / its bandwidth limit"] == (0.56, False)
    assert got["int8 worker-a peak RSS (layers 0-7 as int8 + 400 MB)"] == (300.0, True)  # <= 20 + 400 MB
    j = q.to_json()
    assert j["rows"]["int4"]["speed"]["decode_ms"] == pytest.approx(25.0)
    assert j["rows"]["int4"]["speed"]["prefill_tps"] == pytest.approx(1280.0)
    assert j["rows"]["int4"]["of_limit"] == pytest.approx(14.0 / 25.0)
    assert j["rows"]["bf16"]["decode_step_bytes"] == 2 * j["rows"]["int8"]["decode_step_bytes"]
    report.quant_report(q, quick=False)  # renders
    assert j["rows"]["int8"]["vs_base"] == pytest.approx(50 / 30) and j["base"] == "bf16"
    assert [t["check"] for t in j["targets"]] == [t.check for t in q.targets()]
    # The speed targets are the big model's, on a CPU; memory targets apply everywhere.
    same = {k: 1.0 for k in ("f32", "bf16", "int8", "int4")}
    assert all("peak RSS" in t.check for t in _fake_quant("tiny", same, same).targets())


def test_quantized_rows_through_real_processes(tmp_path):
    """scripts/bench.py --quantize int8,int4 end to end on the tiny model (real masters and quantized
    workers): every row measured, the bytes the limit is timed on are what the masters hold, and the
    kernels and figures reach the report and the JSON. No timing is asserted."""
    out = subprocess.run([sys.executable, str(BENCH), "--quick", "--quantize", "int8,int4", "--tokens", "4",
                          "--prompt-tokens", "8", "--workers", "1", "--workdir", str(tmp_path),
                          "--json", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    model = json.loads((tmp_path / "out.json").read_text())["models"]["tiny"]
    assert list(model) == ["quantized"]  # no "none" asked: the unquantized benchmark is not run
    q = model["quantized"]
    assert q["formats"] == ["f32", "bf16", "int8", "int4"] and q["base"] == "bf16"
    hidden = models.SPECS["tiny"].hidden
    for label, row in q["rows"].items():
        assert row["speed"]["decode_ms"] > 0 and row["speed"]["prefill_tps"] > 0 and row["speed"]["peak_rss"] > 0
        assert row["weight_bytes_reported"] == row["weights_held"], label
        assert set(row["products_ms"]) == {"wqkv", "wo", "w13", "w2", "head"}
        assert row["limit_ms"] > 0 and row["of_limit"] > 0
        assert bool(row["kernels"]) == (label in ("int8", "int4"))
    itemsize = weights.ITEMSIZE[q["reads"]["dtype"]]
    for label, read in zip(q["formats"], q["reads"]["bytes"]):
        assert 0 <= read - q["rows"][label]["decode_step_bytes"] < hidden * itemsize  # within one row
    assert q["rows"]["int4"]["decode_step_bytes"] < q["rows"]["int8"]["decode_step_bytes"] < \
        q["rows"]["bf16"]["decode_step_bytes"]
    assert set(q["workers"]) == {"int8", "int4"}
    for label, w in q["workers"].items():
        assert w["worker_rss"]["worker-a"] > 0 and w["speed"]["decode_ms"] > 0
        assert w["master_weight_bytes"] == w["master_held"]
    assert [t["check"] for t in q["targets"]] == [
        f"{label} {who}" for label in ("int8", "int4")
        for who in (f"worker-a peak RSS (layers 0-7 as {label} + 400 MB)",
                    f"master peak RSS (embed + head as {label} + 400 MB)")]
