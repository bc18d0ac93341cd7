"""Limits a stranger cannot push past: a worker full of silent connections, a frame that stalls, a payload
a message may not carry, an answer larger than asked for, an API flooded, nested or fed a novel, and the
master's own KV caches."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
import urllib.error
import urllib.request

import msgpack
import pytest

from cake import wire
from cake.client import Options, WorkerLink
from cake.topology import Worker as WorkerEntry
from conftest import handshake, reference_greedy, run

H = 64


def test_a_worker_full_of_silent_connections_makes_room_for_a_new_one(tiny_model, cluster):
    """64 connections through the handshake that then say nothing: the 65th was told 'busy' for as long
    as they stayed open. Past the idle timeout the one silent longest is closed instead, and a master
    gets in."""
    from cake.worker import MAX_CONNECTIONS

    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, env={"CAKE_IDLE_TIMEOUT": "3"})
    port = c.ports["w"]

    async def go():
        held = [await handshake(port) for _ in range(MAX_CONNECTIONS)]
        busy, deadline = 0, time.monotonic() + 60
        while True:  # the next one is busy until the first ones have been silent for 3 s
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await wire.write_message(writer, wire.Hello(wire.PROTOCOL, wire.VERSION, b"n" * 32))
            await wire.read_message(reader, 1 << 20)  # welcome
            reply, _ = await wire.read_message(reader, 1 << 20)
            if isinstance(reply, wire.Info):
                break
            assert reply.code == "busy" and time.monotonic() < deadline, reply
            busy += 1
            writer.close()
            await asyncio.sleep(0.1)
        first_reader = held[0][0]
        closed = await asyncio.wait_for(first_reader.read(), 10) == b""  # the one silent longest is gone
        await wire.write_message(writer, wire.Ping())
        pong, _ = await wire.read_message(reader, 1 << 20)
        for _, w, _ in held:
            w.close()
        writer.close()
        return busy, closed, pong

    busy, closed, pong = run(go())
    assert busy >= 1 and closed and isinstance(pong, wire.Ok)
    assert "closed a connection silent for" in c.log("w").read_text()


def test_a_frame_that_stalls_midway_is_closed_and_others_are_served(tiny_model, cluster):
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, env={"CAKE_FRAME_STALL": "0.5"})
    port = c.ports["w"]

    async def go():
        reader, writer, _ = await handshake(port)
        writer.write(struct.pack(">I", 4096) + b"\x00\x00")  # a frame of 4 KiB begins, and stops there
        await writer.drain()
        t0 = time.monotonic()
        reply, _ = await asyncio.wait_for(wire.read_message(reader, 1 << 20), 30)
        gone = await asyncio.wait_for(reader.read(), 10) == b""
        took = time.monotonic() - t0
        r2, w2, _ = await handshake(port)  # the worker serves others all along
        await wire.write_message(w2, wire.Ping())
        pong, _ = await wire.read_message(r2, 1 << 20)
        w2.close()
        writer.close()
        return reply, gone, took, pong

    reply, gone, took, pong = run(go())
    assert isinstance(reply, wire.Error) and reply.code == "bad_frame" and "stalled" in reply.message
    assert gone and took < 20 and isinstance(pong, wire.Ok)


def test_an_idle_connection_is_not_a_stalled_frame(tiny_model, cluster):
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, env={"CAKE_FRAME_STALL": "0.2"})

    async def go():
        reader, writer, _ = await handshake(c.ports["w"])
        for _ in range(3):  # silent between frames for longer than the stall limit, then a whole frame
            await asyncio.sleep(0.3)
            await wire.write_message(writer, wire.Ping())
            pong, _ = await asyncio.wait_for(wire.read_message(reader, 1 << 20), 10)
            assert isinstance(pong, wire.Ok)
        writer.close()

    run(go())


def test_a_payload_the_message_may_not_carry_is_refused_and_the_stream_stays_in_step(tiny_model, cluster):
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]})

    async def go():
        reader, writer, _ = await handshake(c.ports["w"])
        head = msgpack.packb({"type": "ping"})
        junk = b"\x07" * (512 << 10)  # a ping carries nothing (under the frame limit: 1 MiB here)
        writer.write(struct.pack(">I", 4 + len(head) + len(junk)) + struct.pack(">I", len(head)) + head + junk)
        await wire.write_message(writer, wire.Ping())
        replies = [(await asyncio.wait_for(wire.read_message(reader, 1 << 20), 30))[0] for _ in range(2)]
        writer.close()
        return replies

    refused, pong = run(go())
    assert isinstance(refused, wire.Error) and refused.code == "bad_request" and "no 'tensor'" in refused.message
    assert isinstance(pong, wire.Ok)


def test_the_client_reads_no_answer_larger_than_it_could_have_asked_for(caplog):
    """A 'worker' that says a forward carries at most 4 rows of 64, then answers a ping with a frame
    announcing 100 MB: the link drops it before reading any of it (it used to wait for all 100 MB)."""
    big = 100 << 20

    async def go():
        async def fake(reader, writer):
            from cake import auth

            await wire.read_message(reader, 1 << 16)
            await wire.write_message(writer, wire.Welcome(wire.VERSION, auth.nonce(), False))
            await wire.write_message(writer, wire.Info("w", [0], "cpu", "f32", H, 1, 128, 0, max_rows=4))
            await wire.read_message(reader, 1 << 16)  # the ping
            writer.write(struct.pack(">I", big) + b"\x00" * 64)
            await writer.drain()
            await reader.read()

        server = await asyncio.start_server(fake, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        link = WorkerLink(WorkerEntry("w", "127.0.0.1", port, "", (0,)), Options(request_timeout=20, retry_timeout=0.5))
        try:
            await link.ensure_connected()
            t0 = time.monotonic()
            with pytest.raises(Exception):
                await link.request(wire.Ping())
            return time.monotonic() - t0
        finally:
            link.shutdown()
            server.close()

    with caplog.at_level(logging.WARNING, logger="cake"):
        took = run(go())
    limit = 4 * H * 4 + wire.FORWARD_OVERHEAD
    assert f"frame of {big} bytes is outside the limit of 4..{limit}" in caplog.text
    assert took < 10


# ---- the API -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(tiny_model):
    from test_api import start_server

    s = start_server(tiny_model)
    yield s
    s.stop()


def post_raw(url: str, data: bytes) -> tuple[int, str, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("Content-Type", ""), json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, e.headers.get("Content-Type", ""), json.loads(body) if body.startswith(b"{") else {}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_json_nested_too_deep_is_a_400_with_an_error_body(api, path):
    status, kind, body = post_raw(api.url + path, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and kind.startswith("application/json")
    assert body["error"]["message"] == "the request body nests too deep"


@pytest.mark.parametrize("chat", [False, True])
def test_text_that_cannot_fit_the_context_is_refused_before_tokenizing(api, chat):
    from cake.api import MAX_TOKEN_BYTES

    text = "x" * (4096 * MAX_TOKEN_BYTES + 1)
    body = {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
    t0 = time.monotonic()
    status, _, reply = post_raw(api.url + ("/v1/chat/completions" if chat else "/v1/completions"),
                                json.dumps(body).encode())
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    assert f"({len(text)} characters) cannot fit the context of 4096 tokens" in reply["error"]["message"]
    assert time.monotonic() - t0 < 5


def test_a_long_text_is_tokenized_off_the_event_loop_and_other_requests_are_answered_meanwhile(api):
    """The tokenizer is held inside a long prompt (the test holds it); /v1/models is answered meanwhile, and
    the long request completes once tokenizing does."""
    import threading

    tokenizer = api.server.tokenizer
    entered, release = threading.Event(), threading.Event()
    encode = tokenizer.encode_raw

    def held(text: str) -> list[int]:
        if len(text) > 4096:
            entered.set()
            assert release.wait(60)
        return encode(text)

    tokenizer.encode_raw = held
    answers = []
    long = threading.Thread(target=lambda: answers.append(
        post_raw(api.url + "/v1/completions", json.dumps({"prompt": "tok " * 2000, "max_tokens": 1}).encode())))
    try:
        long.start()
        assert entered.wait(60)
        with urllib.request.urlopen(api.url + "/v1/models", timeout=10) as r:
            card = json.loads(r.read())["data"][0]
        assert not release.is_set() and long.is_alive()  # answered while the long text was being tokenized
        assert card["architecture"] == "llama" and card["context_length"] == 4096
    finally:
        release.set()
        long.join(60)
        tokenizer.encode_raw = encode
    assert answers and answers[0][0] == 200 and answers[0][2]["usage"]["prompt_tokens"] > 2000


def test_max_concurrency_is_an_option_of_the_api(tiny_model):
    """`--max-concurrency` reaches the server: 1 place and a queue of 4; 0 is refused by name."""
    import subprocess
    import sys

    from cake.api import build_server
    from cake.run_master import MasterArgs

    server = build_server(MasterArgs(model_dir=str(tiny_model)), max_concurrency=1)
    assert (server.max_concurrency, server.max_queued) == (1, 4)
    r = subprocess.run([sys.executable, "-m", "cake.cli", "--model", str(tiny_model), "--api", "1",
                        "--max-concurrency", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--max-concurrency 0 must be above 0" in r.stderr


def test_past_the_concurrency_cap_and_its_queue_requests_get_openais_429(api):
    from test_api import send_request

    api.server.max_concurrency, api.server.max_queued = 1, 1
    body = {"prompt": "Once upon a time", "max_tokens": 3000, "stream": True, "temperature": 0}
    try:
        running, _ = send_request(api.url, body, events=1)  # generating
        waiting, _ = send_request(api.url, body)  # queued behind it
        deadline = time.monotonic() + 30
        while api.server._admitted < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        req = urllib.request.Request(api.url + "/v1/completions", data=json.dumps({"prompt": "hi"}).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 429 and e.value.headers["Retry-After"] == "1"
        error = json.loads(e.value.read())["error"]
        assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded" and "busy" in error["message"]
        running.close()
        waiting.close()
        while api.server._admitted:  # both end once their clients are gone, and the server serves again
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status, _, ok = post_raw(api.url + "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2}).encode())
        assert status == 200 and ok["choices"]
    finally:
        api.server.max_concurrency, api.server.max_queued = 64, 256


# ---- the master's own KV caches ------------------------------------------------------------------------

def test_the_masters_own_kv_caches_are_bounded_and_evicted_sessions_replay(tiny_model):
    """All layers on the master, a budget of two sessions' caches: a third session evicts the least
    recently used, which replays when it steps again, and every answer is transformers'."""
    from cake.generate import generate
    from cake.master import LocalStage, Master
    from cake.sampling import SamplingParams
    from cake.tokenizer import Tokenizer
    from conftest import EOS

    master = Master(tiny_model, __import__("cake.topology", fromlist=["Topology"]).Topology())
    stage = next(st for st in master.stages if isinstance(st, LocalStage))
    stage.budget = 2 * master.stack.new_cache_bytes()
    tok = Tokenizer(tiny_model)
    prompts = [tok.encode_prompt(p) for p in ("One.", "Two, two.", "Three, three, three.")]

    async def go():
        gens = [generate(master, p, SamplingParams(), 6, EOS) for p in prompts]
        out = [[] for _ in prompts]
        for _ in range(6):  # the three take turns, one token each: every step needs a cache
            for i, g in enumerate(gens):
                try:
                    out[i].append(await g.__anext__())
                except StopAsyncIteration:
                    pass
                assert len(stage.caches) <= 2
        return out

    got = run(go())
    assert got == [reference_greedy(tiny_model, p, 6)[:len(g)] for p, g in zip(prompts, got)]
    assert all(got)
