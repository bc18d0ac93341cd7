"""End to end: real worker processes, real sockets; the reference is transformers on the same weights."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
import torch

from cake import launch
from cake.client import Options
from cake.generate import generate
from cake.master import Master
from cake.sampling import SamplingParams
from cake.split import split_model
from cake.tokenizer import Tokenizer
from cake.topology import load_topology
from conftest import (EOS, count_batches, handshake, reference_greedy, reference_model, run, test_device,
                      write_topology)

N = 24
SPLITS = {
    "one-worker": {"w": ["model.layers.0-5"]},
    "two-workers": {"a": ["model.layers.0-2"], "b": ["model.layers.3-5"]},
    "ranges-with-master-between": {"a": ["model.layers.0-1", "model.layers.4"], "b": ["model.layers.5"]},
}


async def cake_generate(model, topology, prompt_ids, n=N, params=None, master=None) -> list[int]:
    own = master is None
    master = master or Master(model, load_topology(topology), device=test_device())
    try:
        await master.connect()
        return [t async for t in generate(master, prompt_ids, params or SamplingParams(), n, EOS)]
    finally:
        if own:
            await master.close()


@pytest.fixture(scope="module")
def prompt_ids(tiny_model):
    return Tokenizer(tiny_model).encode_prompt("Explain pipelines in one sentence.", "Be brief.")


@pytest.fixture(scope="module")
def expected(tiny_model, prompt_ids):
    return reference_greedy(tiny_model, prompt_ids, N)


def test_all_local_matches_transformers(tiny_model, prompt_ids, expected):
    assert run(cake_generate(tiny_model, None, prompt_ids)) == expected


@pytest.mark.parametrize("split", list(SPLITS))
def test_split_matches_transformers(split, tiny_model, prompt_ids, expected, cluster):
    c = cluster(tiny_model, SPLITS[split])
    assert run(cake_generate(tiny_model, c.topology, prompt_ids)) == expected


THREE = {"a": ["model.layers.0-1"], "b": ["model.layers.2-3"], "c": ["model.layers.4-5"]}


async def generate_and_close(master, prompt_ids) -> list[int]:
    try:
        return await cake_generate(None, None, prompt_ids, master=master)
    finally:
        await master.close()


@pytest.mark.parametrize("relay", [True, False])
def test_workers_relay_to_each_other(relay, tiny_model, prompt_ids, expected, cluster):
    """With relay, a -> b -> c pass hidden states on themselves and c answers the master; without,
    each goes back through the master. Same tokens either way, and every stage ran every step."""
    c = cluster(tiny_model, THREE)
    master = Master(tiny_model, load_topology(c.topology), device=test_device(), options=Options(relay=relay))
    assert run(generate_and_close(master, prompt_ids)) == expected
    assert master.relayed_steps == (len(expected) if relay else 0)
    assert [st.stats.calls for st in master.stages] == [len(expected)] * 3


def test_relay_goes_through_the_master_where_a_worker_cannot_reach_the_next(
        tiny_model, prompt_ids, expected, cluster, tmp_path, caplog):
    from click.testing import CliRunner

    from cake.cli import main

    c = cluster(tiny_model, THREE, start=False)
    # Worker a's own topology file has b at a port nobody listens on: a cannot relay to b.
    c.topologies["a"] = write_topology(tmp_path / "a-sees.yml", {
        "a": (c.ports["a"], THREE["a"]), "b": (launch.free_port(), THREE["b"]), "c": (c.ports["c"], THREE["c"])})
    c.start_all()
    check = CliRunner().invoke(main, ["--model", str(tiny_model), "--topology", str(c.topology), "--check"])
    assert check.exit_code == 0, check.output  # the cluster works, through the master between a and b
    assert "relay a[0-1] -> b[2-3]: FAILED, the master will carry these hidden states itself: worker 'a'" in check.stdout
    assert "relay b[2-3] -> c[4-5]: ok" in check.stdout
    differs = "its topology file differs from this one (it relays to the workers its own file names)"
    assert [line.split(" ")[0] for line in check.stdout.splitlines() if differs in line] == ["a"]
    master = Master(tiny_model, load_topology(c.topology), device=test_device())
    with caplog.at_level("WARNING", logger="cake.master"):
        assert run(generate_and_close(master, prompt_ids)) == expected
    assert [r.getMessage() for r in caplog.records if "different topology file" in r.getMessage()] == [
        f"worker 'a' at 127.0.0.1:{c.ports['a']} was started with a different topology file from the master's: it "
        f"relays to the workers its own file names; give every node the same file"]
    assert ("a", "b") in master._no_relay and ("b", "c") not in master._no_relay
    assert master.relayed_steps == len(expected)  # b -> c still relays
    warned = [r.getMessage() for r in caplog.records if "through the master" in r.getMessage()]
    assert len(warned) == 1 and "worker 'a'" in warned[0] and "worker 'b'" in warned[0] and "\n" not in warned[0]


def test_a_relaying_worker_tells_the_master_when_the_next_one_drops_its_forward(tiny_model, cluster):
    """Worker b closes a's relay connection (a raw client sent a a forward too large for b): a answers the
    client's forward with 'relay_lost' at once, instead of leaving it to wait for --request-timeout."""
    from cake import wire

    c = cluster(tiny_model, {"a": ["model.layers.0-2"], "b": ["model.layers.3-5"]})
    c.extras["b"] = ("--max-frame-mb", "0.3")
    c.kill("b")
    c.start("b")
    c.wait("b")

    async def go():
        ra, wa, _ = await handshake(c.ports["a"])
        _, wb, info_b = await handshake(c.ports["b"])
        assert info_b.max_rows == 972
        x = torch.randn(1, 1300, 64)  # 333 kB of f32: over b's 0.3 MiB
        await wire.write_message(wa, wire.Forward(7, 0, 3, ["s"], [0], ["b"], [3], [6], [info_b.conn]), x)
        reply, _ = await asyncio.wait_for(wire.read_message(ra, 1 << 26), 20)
        await wire.write_message(wa, wire.Ping())
        ok, _ = await asyncio.wait_for(wire.read_message(ra, 1 << 26), 20)
        wa.close()
        wb.close()
        return reply, ok

    reply, ok = run(go())
    assert (type(reply), reply.code, reply.id, reply.peer) == (wire.Error, "relay_lost", 7, "b"), reply
    assert reply.message == "worker 'a' lost its connection to 'b' after relaying a forward to it"
    assert isinstance(ok, wire.Ok)
    assert "outside the limit" in c.log("b").read_text()


def test_interleaved_worker_ranges_relay_while_another_session_starts(tiny_model, prompt_ids, expected, cluster):
    """a and b each appear twice in the pipeline (chains a->b->c and b->a): a prompt's prefill running
    while other sessions decode must neither deadlock nor change anyone's tokens."""
    c = cluster(tiny_model, {"a": ["model.layers.0", "model.layers.5"], "b": ["model.layers.1", "model.layers.4"],
                             "c": ["model.layers.2-3"]})

    async def go():
        master = Master(tiny_model, load_topology(c.topology), device=test_device())
        await master.connect()
        started = asyncio.Event()

        async def first():
            out = []
            async for t in generate(master, prompt_ids, SamplingParams(), N, EOS):
                out.append(t)
                if len(out) == 3:
                    started.set()
            return out

        async def later():
            await started.wait()  # its prefill overlaps the first session's decode steps
            return await cake_generate(None, None, prompt_ids, master=master)

        try:
            return await asyncio.wait_for(asyncio.gather(first(), later(), later()), 120), master.relayed_steps
        finally:
            await master.close()

    outs, relayed = run(go())
    assert outs == [expected] * 3 and relayed > 0


def test_bundles_from_split_tool(tiny_model, prompt_ids, expected, cluster, tmp_path):
    c = cluster(tiny_model, SPLITS["ranges-with-master-between"], start=False)
    c.models = {b.name: b for b in split_model(tiny_model, c.topology, tmp_path / "bundles", quiet=True)}
    c.start_all()
    assert run(cake_generate(tiny_model, c.topology, prompt_ids)) == expected


def test_tied_sharded_meta_tokenizer(tied_model, cluster):
    ids = Tokenizer(tied_model).encode_prompt("Hello", raw=True)
    assert ids[0] == 128000  # Meta's tokenizer.json adds BOS itself
    expected = reference_greedy(tied_model, ids, N)
    c = cluster(tied_model, {"a": ["model.layers.1-2"]})
    assert run(cake_generate(tied_model, c.topology, ids)) == expected


def test_logits_match_transformers(tiny_model, prompt_ids, cluster):
    c = cluster(tiny_model, SPLITS["ranges-with-master-between"])
    ref = reference_model(tiny_model)
    tokens = list(prompt_ids)

    async def go():
        master = Master(tiny_model, load_topology(c.topology), device=test_device())
        await master.connect()
        session = master.new_session()
        got = [await master.step(session, list(prompt_ids))]
        for t in (17, 4242, 99):
            tokens.append(t)
            got.append(await master.step(session, [t]))
        await master.close()
        return got

    got = run(go())
    with torch.no_grad():
        want = ref(torch.tensor([tokens])).logits[0]
    positions = [len(prompt_ids) - 1 + i for i in range(4)]
    for g, p in zip(got, positions):
        assert torch.allclose(g.cpu(), want[p], atol=1e-4, rtol=0), (p, (g.cpu() - want[p]).abs().max())


def test_bf16_worker_behind_an_f32_master(tiny_model, prompt_ids, cluster):
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, extra=("--dtype", "bf16"))
    ref = reference_model(tiny_model)

    async def go():
        master = Master(tiny_model, load_topology(c.topology), device=test_device(), dtype="f32")
        await master.connect()
        info = master.links["w"].info
        logits = await master.step(master.new_session(), list(prompt_ids))
        await master.close()
        return info, logits

    info, logits = run(go())
    assert info.dtype == "bf16"
    with torch.no_grad():
        want = ref(torch.tensor([prompt_ids])).logits[0, -1]
    assert (logits.cpu() - want).abs().max() < 0.05 * want.abs().max()  # bf16 on the wire and in the layers


def test_relay_between_workers_of_different_dtypes(tiny_model, prompt_ids, cluster):
    """A heterogeneous cluster: a bf16 worker relays straight to an f32 one (each converts what it
    receives), and the answer tracks the reference as closely as bf16 allows."""
    c = cluster(tiny_model, {"a": ["model.layers.0-2"], "b": ["model.layers.3-5"]}, start=False)
    c.extras["a"] = ("--dtype", "bf16")
    c.start_all()
    ref = reference_model(tiny_model)

    async def go():
        master = Master(tiny_model, load_topology(c.topology), device=test_device(), dtype="f32")
        await master.connect()
        dtypes = [master.links[n].info.dtype for n in ("a", "b")]
        logits = await master.step(master.new_session(), list(prompt_ids))
        relayed = master.relayed_steps
        await master.close()
        return dtypes, logits, relayed

    dtypes, logits, relayed = run(go())
    assert dtypes == ["bf16", "f32"] and relayed == 1
    with torch.no_grad():
        want = ref(torch.tensor([prompt_ids])).logits[0, -1]
    assert (logits.cpu() - want).abs().max() < 0.05 * want.abs().max()


def test_second_generation_same_workers(tiny_model, prompt_ids, expected, cluster):
    c = cluster(tiny_model, SPLITS["two-workers"])

    async def go():
        master = Master(tiny_model, load_topology(c.topology), device=test_device())
        try:
            first = await cake_generate(tiny_model, None, prompt_ids, master=master)
            other = await cake_generate(tiny_model, None, prompt_ids[:-3], n=5, master=master)
            second = await cake_generate(tiny_model, None, prompt_ids, master=master)
            return first, other, second
        finally:
            await master.close()

    first, other, second = run(go())
    assert first == expected and second == expected
    assert other == reference_greedy(tiny_model, prompt_ids[:-3], 5)
    # a fresh master on the same still-running workers too
    assert run(cake_generate(tiny_model, c.topology, prompt_ids)) == expected


def test_concurrent_sessions_are_batched_and_isolated(tiny_model, cluster):
    c = cluster(tiny_model, SPLITS["ranges-with-master-between"])
    tok = Tokenizer(tiny_model)
    prompts = [tok.encode_prompt(p) for p in ("First question?", "A much longer second question, really.", "3")]
    lengths = [N, 9, 17]  # sessions finish at different times: batches shrink as they go

    async def go():
        master = Master(tiny_model, load_topology(c.topology), device=test_device())
        await master.connect()
        batches = count_batches(master)
        try:
            outs = await asyncio.gather(*(cake_generate(tiny_model, None, p, n, master=master)
                                          for p, n in zip(prompts, lengths)))
        finally:
            await master.close()
        return outs, batches

    outs, batches = run(go())
    for p, n, out in zip(prompts, lengths, outs):
        assert out == reference_greedy(tiny_model, p, n)
    assert max(batches) == 3  # decode steps really were batched


def test_seeded_sampling_same_across_splits(tiny_model, prompt_ids, cluster):
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repeat_penalty=1.1, seed=1234)
    local = run(cake_generate(tiny_model, None, prompt_ids, params=params))
    c = cluster(tiny_model, SPLITS["ranges-with-master-between"])
    assert run(cake_generate(tiny_model, c.topology, prompt_ids, params=params)) == local
    other_seed = run(cake_generate(tiny_model, None, prompt_ids, params=SamplingParams(0.9, 40, 0.95, 1.1, seed=99)))
    assert other_seed != local  # the seed is really used


@pytest.mark.parametrize("busy_poll", ["0", "3000"])
def test_cli_master_streams_only_text(busy_poll, tiny_model, prompt_ids, expected, cluster, tmp_path):
    """Also with every node busy-polling its sockets (cake/eventloop.py): same tokens, same text."""
    c = cluster(tiny_model, SPLITS["two-workers"], extra=("--busy-poll", busy_poll))
    ids_file = tmp_path / "ids.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cake", "--mode", "master", "--model", str(tiny_model), "--topology", str(c.topology),
         "--prompt", "Explain pipelines in one sentence.", "--system-prompt", "Be brief.", "-n", str(N),
         "--temperature", "0", "--output-ids", str(ids_file), "--busy-poll", busy_poll],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in c.ports:
        assert ("busy-polling for 3000 µs" in c.log(name).read_text()) == (busy_poll != "0")
    out = json.loads(ids_file.read_text())
    assert out["prompt"] == prompt_ids
    assert out["generated"] == expected
    tok = Tokenizer(tiny_model)
    assert proc.stdout == tok.decode(expected) + "\n"
    assert "tok/s" in proc.stderr and "time to first token" in proc.stderr
    assert "worker 'a'" in proc.stderr and "compute" in proc.stderr


def test_cli_raw_prompt_matches_tokenizer(tiny_model, tmp_path):
    ids_file = tmp_path / "ids.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cake", "--model", str(tiny_model), "--prompt", "<|begin_of_text|>Hi there",
         "--raw", "-n", "3", "--temperature", "0", "--output-ids", str(ids_file), "-q"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from transformers import PreTrainedTokenizerFast
    want = PreTrainedTokenizerFast.from_pretrained(str(tiny_model))("<|begin_of_text|>Hi there")["input_ids"]
    assert json.loads(ids_file.read_text())["prompt"] == want
    assert proc.stderr == ""


def test_prompt_plus_max_tokens_beyond_context_is_one_line(tiny_model):
    from click.testing import CliRunner

    from cake.cli import main

    result = CliRunner().invoke(main, ["--model", str(tiny_model), "--prompt", "hello", "--context", "32", "-n", "40"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: prompt (") and "does not fit the context of 32" in lines[-1], result.stderr


def test_context_holds_prompt_plus_answer_but_the_last_token(tiny_model, prompt_ids, expected):
    """The last token generated is never fed back: a context of prompt + n - 1 positions gives n tokens."""
    from cake.errors import CakeError

    n = 5
    master = Master(tiny_model, load_topology(None), device=test_device(), context=len(prompt_ids) + n - 1)
    assert run(cake_generate(tiny_model, None, prompt_ids, n=n, master=master)) == expected[:n]
    with pytest.raises(CakeError, match="does not fit the context"):
        run(cake_generate(tiny_model, None, prompt_ids, n=n + 1, master=master))


def test_a_prompt_over_a_workers_frame_limit_goes_in_chunks(tiny_model, cluster):
    """A worker that takes at most 0.3 MiB per request (972 rows of hidden 64 in f32) gets a 1100-token
    prompt in two requests, and the answer is still transformers' token for token."""
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, extra=("--max-frame-mb", "0.3"))
    prompt = torch.randint(0, 128000, (1100,), generator=torch.Generator().manual_seed(5)).tolist()

    async def go():
        master = Master(tiny_model, load_topology(c.topology), device=test_device())
        try:
            await master.connect()
            assert master.links["w"].info.max_rows == 972
            out = [t async for t in generate(master, prompt, SamplingParams(), 4, EOS)]
            return out, master.stages[0].stats.calls
        finally:
            await master.close()

    got, calls = run(go())
    assert got == reference_greedy(tiny_model, prompt, 4)
    assert calls == 2 + 3  # the prompt in two requests, then three decode steps
    assert "outside the limit" not in c.log("w").read_text()  # no request was refused


def test_more_concurrent_sessions_than_a_worker_takes_in_one_request(tiny_model, cluster):
    """A worker takes at most 256 sessions per forward: 260 concurrent sessions step in two requests,
    and each gets transformers' next tokens."""
    from cake.sampling import greedy

    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, extra=("--context", "16"))
    ids = torch.randint(0, 128000, (260, 3), generator=torch.Generator().manual_seed(3))

    async def go():
        master = Master(tiny_model, load_topology(c.topology), device=test_device(), context=16)
        try:
            await master.connect()
            assert master.links["w"].info.max_batch == 256
            sessions = [master.new_session() for _ in range(len(ids))]
            firsts = await asyncio.gather(*(master.step(s, row.tolist()) for s, row in zip(sessions, ids)))
            tokens = [[greedy(x)] for x in firsts]
            calls = master.stages[0].stats.calls
            nexts = await asyncio.gather(*(master.step(s, t) for s, t in zip(sessions, tokens)))
            return [t + [greedy(x)] for t, x in zip(tokens, nexts)], master.stages[0].stats.calls - calls
        finally:
            await master.close()

    got, decode_calls = run(go())
    assert decode_calls == 2  # 256 + 4 sessions
    with torch.no_grad():
        model = reference_model(tiny_model)
        first = model(ids).logits[:, -1].argmax(-1)
        second = model(torch.cat([ids, first[:, None]], 1)).logits[:, -1].argmax(-1)
    assert got == torch.stack([first, second], 1).tolist()


def test_folder_repetition_penalty_matches_transformers(tiny_model, prompt_ids, tmp_path):
    """generation_config.json's repetition_penalty applies by default, as in transformers' generate."""
    from cake.model.config import load_config, load_eos_ids
    from cake.run_master import MasterArgs, sampling_params
    from transformers import LlamaForCausalLM

    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny_model.iterdir():
        (folder / f.name).symlink_to(f)
    gen = json.loads((tiny_model / "generation_config.json").read_text())
    (folder / "generation_config.json").unlink()
    (folder / "generation_config.json").write_text(json.dumps({**gen, "repetition_penalty": 1.5}))
    params = sampling_params(MasterArgs(str(folder)))
    eos = load_eos_ids(folder, load_config(folder))
    master = Master(folder, load_topology(None), device=test_device())

    async def go():
        return [t async for t in generate(master, prompt_ids, params, N, eos)]

    got = run(go())
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=N, pad_token_id=eos[0],
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    want = out[0, len(prompt_ids):].tolist()
    assert got == want
    assert got != reference_greedy(tiny_model, prompt_ids, N)  # the penalty changed the answer


def test_cli_check_reports_every_worker(tiny_model, cluster):
    from click.testing import CliRunner

    from cake.cli import main

    c = cluster(tiny_model, SPLITS["ranges-with-master-between"])
    ok = CliRunner().invoke(main, ["--model", str(tiny_model), "--topology", str(c.topology), "--check"])
    assert ok.exit_code == 0, ok.output
    assert "6 layers in 4 stage(s): a[0-1] -> master[2-3] -> a[4-4] -> b[5-5]" in ok.stdout
    assert "master: embedding, head, layers 2-3" in ok.stdout
    assert f"a (127.0.0.1:{c.ports['a']}): ok, layers 0-1,4 on {test_device()} (f32), context 4096" in ok.stdout
    assert "relay a[4-4] -> b[5-5]: ok" in ok.stdout
    assert ("long prompts: one request per stage (--pipeline auto: the stages compute on 1 machine(s) or GPU(s))"
            in ok.stdout)  # every node on this machine's CPU (or GPU)
    on = CliRunner().invoke(main, ["--model", str(tiny_model), "--topology", str(c.topology), "--check",
                                   "--pipeline", "on"])
    assert "long prompts: pipelined across the stages (--pipeline on)" in on.stdout, on.output
    c.kill("b")
    bad = CliRunner().invoke(main, ["--model", str(tiny_model), "--topology", str(c.topology), "--check",
                                    "--retry-timeout", "0.5"])
    assert bad.exit_code == 1
    assert f"b (127.0.0.1:{c.ports['b']}): ERROR worker 'b' at 127.0.0.1:{c.ports['b']} is unreachable" in bad.stdout
    assert bad.stderr.strip() == "error: 1 of 2 worker(s) not ready: b; see above"


def test_cli_check_refuses_workers_of_another_model(tiny_model, cluster, tmp_path):
    """--check finds what generation would refuse: the master's model differs from the workers'."""
    from click.testing import CliRunner

    from cake.cli import main
    from cake.synthetic import make_model

    c = cluster(tiny_model, SPLITS["two-workers"])
    other = make_model(tmp_path / "other", hidden=32, intermediate=64, layers=6, heads=4, kv_heads=2, seed=1)
    bad = CliRunner().invoke(main, ["--model", str(other), "--topology", str(c.topology), "--check"])
    assert bad.exit_code == 1, bad.output
    assert (f"a (127.0.0.1:{c.ports['a']}): ERROR runs a different model (hidden 64, 6 layers) from the master's "
            f"(hidden 32, 6 layers); give every node the same model") in bad.stdout
    assert bad.stderr.strip() == "error: 2 of 2 worker(s) not ready: a, b; see above"


def test_a_long_prompt_does_not_stop_another_sessions_stream(tiny_model, cluster):
    """Session A decodes through two workers while session B's 4000-token prompt computes there: A's
    steps run between the prompt's steps on each worker, so A goes on producing tokens before B's first
    one (served in order, none), and both answers are transformers' own."""
    c = cluster(tiny_model, {"a": ["model.layers.0-2"], "b": ["model.layers.3-5"]})
    prompt_a = Tokenizer(tiny_model).encode_prompt("Keep talking.")
    prompt_b = torch.randint(0, 128000, (4000,), generator=torch.Generator().manual_seed(5)).tolist()
    n_a, n_b = 80, 3

    async def go():
        master = Master(tiny_model, load_topology(c.topology), device=test_device(), context=4096)
        await master.connect()
        events = []

        async def session(name, prompt, n, after=0):
            while sum(e == "a" for e in events) < after:
                await asyncio.sleep(0.001)
            events.append(f"{name} starts")
            out = []
            async for t in generate(master, prompt, SamplingParams(), n, ()):
                out.append(t)
                events.append(name)
            return out

        try:
            outs = await asyncio.gather(session("a", prompt_a, n_a), session("b", prompt_b, n_b, after=3))
        finally:
            await master.close()
        return outs, events

    (out_a, out_b), events = run(go())
    model = reference_model(tiny_model)

    def reference(prompt, n):
        with torch.no_grad():
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=EOS[0], attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        return ids[0, len(prompt):].tolist()

    assert out_a == reference(prompt_a, n_a)
    assert out_b == reference(prompt_b, n_b)
    during = events[events.index("b starts") + 1:events.index("b")]
    assert during.count("a") >= 2, events


def _pipeline_reference_logits(model_dir, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference_model(model_dir)(torch.tensor([ids])).logits[0, -1].float()


async def _pipelined_then_b_restarts(model, c, first: list[int]):
    """A --pipeline on master that has run `first` through cluster `c` (ranges-with-master-between), after
    which worker b was killed and restarted: the master, its session, the logits of `first`, and each
    stage's calls so far. The caller closes the master."""
    master = Master(model, load_topology(c.topology), device=test_device(), context=2048,
                    options=Options(pipeline="on", retry_timeout=30))
    try:
        await master.connect()
        s = master.new_session()
        one = await master.step(s, first)
        calls = [st.stats.calls for st in master.stages]
        c.kill("b")
        c.start("b")
        c.wait("b")
    except BaseException:
        await master.close()
        raise
    return master, s, one, calls


def test_a_long_prompt_in_pipelined_chunks_is_exact_and_survives_a_restart(tiny_model, cluster):
    """--pipeline on: a 700-token prompt goes through a worker with two ranges and master layers between
    them in chunks of 256 (stage by stage, one behind another): the logits are transformers', each stage
    saw 3 chunks. Then worker b restarts: the next 600 tokens find no cache there, and the master replays
    the whole 1300 in pipelined chunks, with transformers' logits again."""
    from cake.master import PIPELINE_CHUNK

    c = cluster(tiny_model, SPLITS["ranges-with-master-between"])
    ids = torch.randint(0, 128000, (1300,), generator=torch.Generator().manual_seed(9)).tolist()
    first, then = ids[:700], ids[700:]

    async def go():
        master, s, one, calls = await _pipelined_then_b_restarts(tiny_model, c, first)
        try:
            assert master.pipelines
            two = await master.step(s, then)
            return one, calls, two, [st.stats.calls for st in master.stages]
        finally:
            await master.close()

    one, calls, two, calls_after = run(go())
    chunks = -(-700 // PIPELINE_CHUNK)
    assert calls == [chunks] * 4  # a 0-1, master 2-3, a 4, b 5
    assert (one - _pipeline_reference_logits(tiny_model, first)).abs().max() < 1e-4
    assert (two - _pipeline_reference_logits(tiny_model, ids)).abs().max() < 1e-4
    assert calls_after[-1] - calls[-1] > -(-600 // PIPELINE_CHUNK)  # b's refused chunk, then the replay


def test_a_pipelined_step_stops_even_where_a_stage_misses_its_cancel(tiny_model, cluster):
    """Worker b restarts and refuses the first chunk of a pipelined step while worker a's layer-4 stage is
    in the middle of chunk 2 and a has not yet answered chunk 3 of layers 0-1; the layer-4 stage then
    finishes its forward as if no cancel had come (what asyncio.wait_for could do before Python 3.12).
    The step must still stop and replay, not wait forever for chunk 3, which the cancelled stages before
    it will never send. Real workers and sockets; the test arranges only that order, and the deaf stage."""
    c = cluster(tiny_model, SPLITS["ranges-with-master-between"])
    ids = torch.randint(0, 128000, (1300,), generator=torch.Generator().manual_seed(11)).tolist()
    first, then = ids[:700], ids[700:]

    async def go():
        master, s, _, _ = await _pipelined_then_b_restarts(tiny_model, c, first)
        try:
            a01, a4, b5 = master.stages[0], master.stages[2], master.stages[3]
            forwards = a01.forward, a4.forward, b5.forward
            on_chunk_2, refused = asyncio.Event(), asyncio.Event()

            async def a01_late(sessions, positions, x):  # chunk 3 (position 1212) comes after b's refusal
                if positions[0] == 700 + 512:
                    await refused.wait()
                return await forwards[0](sessions, positions, x)

            async def a4_deaf(sessions, positions, x):  # on chunk 2 until b has refused, and deaf to cancels
                async def chunk():
                    out = await forwards[1](sessions, positions, x)
                    if positions[0] == 700 + 256:
                        await refused.wait()
                    return out

                if positions[0] == 700 + 256:
                    on_chunk_2.set()
                task = asyncio.ensure_future(chunk())
                while True:
                    try:
                        return await asyncio.shield(task)
                    except asyncio.CancelledError:
                        pass  # the cancel is dropped; the forward goes on

            async def b5_after(sessions, positions, x):  # b answers chunk 1 once a is on chunk 2
                await on_chunk_2.wait()
                try:
                    return await forwards[2](sessions, positions, x)
                finally:
                    refused.set()

            a01.forward, a4.forward, b5.forward = a01_late, a4_deaf, b5_after
            return await asyncio.wait_for(master.step(s, then), 60)
        finally:
            await master.close()

    logits = run(go())
    assert (logits - _pipeline_reference_logits(tiny_model, ids)).abs().max() < 1e-4


def test_pipeline_auto_means_stages_on_more_than_one_machine_or_gpu(tiny_model, tmp_path):
    """auto pipelines a prompt only where stages can compute at the same time: workers on other machines,
    or on distinct GPUs; not CPU workers on the master's machine (they share its cores). A worker says
    which machine and GPU it runs on; one that does not is judged by its address and device."""
    from cake import wire
    from cake.devices import machine_id

    def master(hosts: dict[str, str], devices: dict[str, str] | None = None, local: bool = False, choice="auto",
               said: dict[str, tuple[str, str]] | None = None):
        """`devices`: what each worker's info says its device is; `said`: its (machine, compute unit)."""
        layers = {"a": ["model.layers.0-2"], "b": ["model.layers.3-5"] if not local else ["model.layers.3-4"]}
        path = tmp_path / f"t{len(list(tmp_path.iterdir()))}.yml"
        path.write_text("".join(f"{n}:\n  host: '{hosts[n]}'\n  layers: {layers[n]}\n" for n in hosts))
        m = Master(tiny_model, load_topology(path), device="cpu", options=Options(pipeline=choice))
        for name in set(devices or {}) | set(said or {}):
            machine, unit = (said or {}).get(name, ("", ""))
            m.links[name].info = wire.Info(name, [], (devices or {}).get(name, "cpu"), "f32", 64, 6, 2048, 0, "",
                                           machine=machine, unit=unit)
        return m

    assert not master({"a": "127.0.0.1:9001", "b": "127.0.0.1:9002"}).pipelines
    assert not master({"a": "localhost:9001", "b": "127.0.0.1:9002"}, local=True).pipelines
    assert master({"a": "127.0.0.1:9001", "b": "127.0.0.1:9002"}, choice="on").pipelines
    assert master({"a": "10.0.0.2:9001", "b": "10.0.0.3:9001"}).pipelines
    assert not master({"a": "10.0.0.2:9001", "b": "10.0.0.3:9001"}, choice="off").pipelines
    assert master({"a": "127.0.0.1:9001", "b": "127.0.0.1:9002"}, {"a": "cuda:0", "b": "cuda:1"}).pipelines
    assert not master({"a": "127.0.0.1:9001", "b": "127.0.0.1:9002"}, {"a": "cuda:0", "b": "cuda:0"}).pipelines
    assert master({"a": "127.0.0.1:9001", "b": "127.0.0.1:9002"}, {"a": "cpu", "b": "cuda:0"}).pipelines
    # What the workers say of themselves wins over addresses and device names:
    here = machine_id()
    lan = {"a": "192.168.1.20:9001", "b": "192.168.1.20:9002"}
    assert not master(lan, said={"a": (here, "cpu"), "b": (here, "cpu")}).pipelines  # this machine, by its LAN IP
    assert master(lan, said={"a": ("box", "cpu"), "b": ("box", "cuda-1f2e")}).pipelines  # its CPU and its GPU
    assert not master(lan, {"a": "cuda", "b": "cuda:0"}, said={"a": ("box", "cuda-1f2e"), "b": ("box", "cuda-1f2e")}).pipelines
    assert master(lan, {"a": "cuda:0", "b": "cuda:0"}, said={"a": ("box", "cuda-1f2e"), "b": ("box", "cuda-77aa")}).pipelines


def test_workers_say_which_machine_and_compute_unit_they_run_on(tiny_model, cluster):
    from cake.devices import compute_unit, machine_id

    c = cluster(tiny_model, {"a": ["model.layers.0-2"], "b": ["model.layers.3-5"]})

    async def go():
        master = Master(tiny_model, load_topology(c.topology), device=test_device())
        await master.connect()
        await master.close()
        return master, [(link.info.machine, link.info.unit) for link in master.links.values()]

    master, said = run(go())
    unit = compute_unit(master.device)
    assert said == [(machine_id(), unit)] * 2
    assert not master.pipelines  # both workers on this machine's one CPU (or one GPU): prompts not pipelined


def test_machine_id_ignores_a_made_up_hardware_address(monkeypatch):
    """Without a network card uuid.getnode() makes up a random address (multicast bit set) per process:
    the machine fingerprint must not depend on it, or every process would be a machine of its own."""
    import uuid

    from cake import devices

    ids = []
    for made_up in ((1 << 40) | 0x1234, (1 << 40) | 0xBEEF):
        monkeypatch.setattr(uuid, "getnode", lambda v=made_up: v)
        devices.machine_id.cache_clear()
        ids.append(devices.machine_id())
    monkeypatch.setattr(uuid, "getnode", lambda: 0x0242AC110002)  # a real (unicast) address counts
    devices.machine_id.cache_clear()
    real = devices.machine_id()
    devices.machine_id.cache_clear()
    assert ids[0] == ids[1] != real
