"""The OpenAI-compatible server, driven over real HTTP by the official `openai` client and raw requests.

The main server runs in a background thread of this process on top of real worker processes; the
reference is transformers' greedy `generate` on the same weights with the same chat template.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from cake import launch
from cake.api import ApiServer, StopMatcher, build_server, parse_api_address
from cake.errors import CakeError
from cake.run_master import MasterArgs
from conftest import Cluster, reference_greedy

N = 16
LAYOUT = {"a": ["model.layers.0-1"], "b": ["model.layers.3-5"]}  # layer 2 runs on the master
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Explain pipelines."}]


class ServerThread:
    """An ApiServer on a free 127.0.0.1 port, served by its own event loop in a background thread."""

    def __init__(self, server: ApiServer):
        self.server = server
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        assert self.ready.wait(60), "server did not start"
        if self.error:
            raise self.error
        self.url = f"http://127.0.0.1:{server.port}"

    def _main(self) -> None:
        try:
            asyncio.run(self.server.serve("127.0.0.1", 0, ready=lambda port: self.ready.set()))
        except BaseException as e:  # surfaced to the test that started it
            self.error = e
            self.ready.set()

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


def start_server(model: Path, topology: Path | None = None, api_key: str | None = None, **args) -> ServerThread:
    return ServerThread(build_server(MasterArgs(model_dir=str(model), topology=topology and str(topology), **args),
                                     api_key))


def post(url: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def send_request(url: str, body: dict, events: int = 0) -> tuple[socket.socket, bytes]:
    """POST a request on a raw socket (so the test decides when it closes); read until `events` SSE
    events have arrived."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    data = json.dumps(body).encode()
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    got = b""
    while got.count(b"data: ") < events:
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    return sock, got


def worker_ends(log: Path) -> list[tuple[int, int]]:
    """(ended, still held) for every `end` the worker served, from its debug log."""
    return [(int(a), int(b)) for a, b in re.findall(r"ended (\d+) session\(s\); (\d+) held", log.read_text())]


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="module")
def api_cluster(tiny_model, tmp_path_factory):
    # -vv: the workers log every `end` they serve, which the disconnect test reads
    c = Cluster(tmp_path_factory.mktemp("api-cluster"), tiny_model, LAYOUT, extra=("-vv",))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def server(tiny_model, api_cluster):
    s = start_server(tiny_model, api_cluster.topology)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def hf(tiny_model):
    return PreTrainedTokenizerFast.from_pretrained(str(tiny_model))


def chat_ids(hf, messages) -> list[int]:
    return hf(hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]


def stream_text(chunks) -> tuple[str, list]:
    chunks = list(chunks)
    text = "".join((c.choices[0].delta.content or "") if hasattr(c.choices[0], "delta") else c.choices[0].text
                   for c in chunks if c.choices)
    return text, chunks


# ---- the main path ------------------------------------------------------------------------------------

def test_models_lists_the_served_model(server, tiny_model):
    models = server.client().models.list().data
    assert [m.id for m in models] == [tiny_model.name]
    assert models[0].object == "model"


def test_models_retrieve_names_the_served_model_only(server, tiny_model):
    assert server.client().models.retrieve(tiny_model.name).id == tiny_model.name
    status, reply = get(f"{server.url}/v1/models/gpt-5")
    assert status == 404 and reply["error"]["code"] == "model_not_found"
    assert reply["error"]["message"] == f"no model 'gpt-5' here; this server serves '{tiny_model.name}'"


def test_developer_messages_are_system_messages_and_prompts_may_be_token_ids(server, tiny_model, hf):
    """What newer OpenAI clients send: a 'developer' message (the system message's new name), and a
    completion prompt as token ids (or a batch of one)."""
    client = server.client()
    as_system = client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=6)
    as_developer = client.chat.completions.create(
        model="any", max_tokens=6,
        messages=[{**m, "role": "developer"} if m["role"] == "system" else m for m in MESSAGES])
    assert any(m["role"] == "system" for m in MESSAGES)
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens
    ids = hf("Hello there, pipeline")["input_ids"]
    want = hf.decode(reference_greedy(tiny_model, ids, 6), skip_special_tokens=True)
    for prompt in (ids, [ids], ["Hello there, pipeline"]):
        r = client.completions.create(model="any", prompt=prompt, max_tokens=6, temperature=0)
        assert r.choices[0].text == want and r.usage.prompt_tokens == len(ids)


def test_chat_greedy_matches_transformers(server, tiny_model, hf):
    ids = chat_ids(hf, MESSAGES)
    expected = reference_greedy(tiny_model, ids, N)
    # no temperature: generation_config.json does not sample, so the default is greedy
    r = server.client().chat.completions.create(model="any", messages=MESSAGES, max_tokens=N)
    assert r.choices[0].message.content == hf.decode(expected, skip_special_tokens=True)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("stop" if expected[-1] in (128001, 128009) else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids), len(expected), len(ids) + len(expected))
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == tiny_model.name
    assert abs(r.created - time.time()) < 60


def test_completion_raw_prompt_matches_transformers(server, tiny_model, hf):
    prompt = "Hello there, pipeline"
    ids = hf(prompt)["input_ids"]
    expected = reference_greedy(tiny_model, ids, N)
    r = server.client().completions.create(model="any", prompt=prompt, max_tokens=N, temperature=0)
    assert r.choices[0].text == hf.decode(expected, skip_special_tokens=True)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(expected))


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_stream_equals_whole(server, kind):
    client = server.client()
    if kind == "chat":
        create, args = client.chat.completions.create, {"messages": MESSAGES}
    else:
        create, args = client.completions.create, {"prompt": "Once upon a time"}
    args.update(model="any", max_tokens=N, temperature=0.8, top_p=0.9, seed=42)
    whole = create(**args)
    text, chunks = stream_text(create(**args, stream=True, stream_options={"include_usage": True}))
    want = whole.choices[0].message.content if kind == "chat" else whole.choices[0].text
    assert text == want and text
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    if kind == "chat":
        assert chunks[0].choices[0].delta.role == "assistant"
    # without include_usage no chunk carries usage
    _, plain = stream_text(create(**args, stream=True))
    assert all(c.usage is None and c.choices for c in plain)


def test_stop_string_cuts_text_whole_and_streamed(server, tiny_model, hf):
    client = server.client()
    ids = chat_ids(hf, MESSAGES)
    full = hf.decode(reference_greedy(tiny_model, ids, 24), skip_special_tokens=True)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.find(stop)]
    args = dict(model="any", messages=MESSAGES, max_tokens=24, stop=["never-occurs", stop])
    whole = client.chat.completions.create(**args)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < 24
    text, chunks = stream_text(client.chat.completions.create(**args, stream=True))
    assert text == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    # a single string works too, on /v1/completions as well
    r = client.completions.create(model="any", prompt="Once upon a time", max_tokens=N, temperature=0)
    stop = r.choices[0].text[3:6]
    cut = client.completions.create(model="any", prompt="Once upon a time", max_tokens=N, temperature=0, stop=stop)
    assert cut.choices[0].text == r.choices[0].text[:r.choices[0].text.find(stop)]


def test_concurrent_requests_are_isolated(server):
    requests = [
        ("chat", dict(messages=MESSAGES, max_tokens=24)),
        ("completion", dict(prompt="The quick brown fox", max_tokens=20, temperature=0)),
        ("chat", dict(messages=[{"role": "user", "content": "Sample something."}], max_tokens=22,
                      temperature=0.9, seed=5)),
    ]
    client = server.client()
    solo = []
    for kind, args in requests:
        r = (client.chat.completions if kind == "chat" else client.completions).create(model="any", **args)
        solo.append(r.choices[0].message.content if kind == "chat" else r.choices[0].text)

    arrivals: list[int] = []

    async def one(aclient: openai.AsyncOpenAI, i: int) -> str:
        kind, args = requests[i]
        create = aclient.chat.completions.create if kind == "chat" else aclient.completions.create
        parts = []
        async for c in await create(model="any", stream=True, **args):
            if c.choices:
                arrivals.append(i)
                parts.append((c.choices[0].delta.content or "") if kind == "chat" else c.choices[0].text)
        return "".join(parts)

    async def together() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(len(requests))))

    assert asyncio.run(together()) == solo
    # they really ran interleaved: some request produced chunks before another had finished
    last = {i: max(k for k, j in enumerate(arrivals) if j == i) for i in range(3)}
    first = {i: arrivals.index(i) for i in range(3)}
    assert any(first[j] < last[i] and first[i] < last[j] for i in range(3) for j in range(3) if i != j)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_stops_generation_and_frees_sessions(server, api_cluster, caplog, stream):
    caplog.set_level("INFO", logger="cake.api")
    logs = [api_cluster.log(name) for name in LAYOUT]
    before = [len(worker_ends(p)) for p in logs]
    # long enough that finishing it, rather than stopping, would take many seconds
    body = {"messages": MESSAGES, "max_tokens": 3000, "stream": stream}
    sock, got = send_request(server.url, body, events=4 if stream else 0)
    if stream:
        assert b"200 OK" in got
    else:
        time.sleep(0.5)  # let the server read the request: a whole answer sends nothing until it is done
    sock.close()
    for p, n in zip(logs, before):
        assert wait_for(lambda: len(worker_ends(p)) > n), f"no end reached {p.name}"
        assert worker_ends(p)[n] == (1, 0)  # the request's session, and nothing left held
    assert wait_for(lambda: "the client went away" in caplog.text)
    stopped = int(re.search(r"the client went away after (\d+) tokens", caplog.text).group(1))
    assert stopped < 3000
    # and the server goes on serving
    assert server.client().completions.create(model="any", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_chat_page_is_served(server):
    with urllib.request.urlopen(f"{server.url}/", timeout=30) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
        page = r.read().decode()
    assert "<title>cake chat</title>" in page and "/v1/chat/completions" in page and "stream: true" in page


# ---- errors -------------------------------------------------------------------------------------------

BAD = [
    ("chat", b"{not json", None),
    ("chat", b"[1, 2]", None),
    ("chat", {}, "messages"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": "hi"}, "messages"),
    ("chat", {"messages": ["hi"]}, "messages[0]"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("chat", {"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, "temperature"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "temperature": True}, "temperature"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "seed": 1.5}, "seed"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "stop": 3}, "stop"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ("completion", {"max_tokens": 3}, "prompt"),
    ("completion", {"prompt": ["a", "b"]}, "prompt"),
    ("completion", {"prompt": [1, -2]}, "prompt"),
    ("completion", {"prompt": [1, 128256]}, "prompt"),
    ("completion", {"prompt": [1, True]}, "prompt"),
    ("completion", {"prompt": [[1, 2], [3]]}, "prompt"),
    ("completion", {"prompt": ""}, "prompt"),
    ("completion", {"prompt": "word " * 5000}, "prompt"),
]


@pytest.mark.parametrize("kind,body,param", BAD, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD)])
def test_bad_requests_get_openai_errors(server, kind, body, param):
    status, reply = post(f"{server.url}/v1/{'chat/completions' if kind == 'chat' else 'completions'}", body)
    assert status == 400, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_context_overflow_is_named(server):
    status, reply = post(f"{server.url}/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    assert "4096" in reply["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="does not fit"):
        server.client().chat.completions.create(model="any", messages=MESSAGES, max_tokens=5000)


def test_unknown_route_and_method_are_json_errors(server):
    status, reply = post(f"{server.url}/v1/embeddings", {"input": "x"})
    assert status == 404 and "/v1/chat/completions" in reply["error"]["message"]
    try:
        urllib.request.urlopen(f"{server.url}/v1/completions", timeout=30)
    except urllib.error.HTTPError as e:
        assert e.code == 405 and json.loads(e.read())["error"]["type"] == "invalid_request_error"
    else:
        pytest.fail("GET on a POST route was accepted")


def test_api_key_required_when_set(tiny_model):
    s = start_server(tiny_model, api_key="s3cret")
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            status, reply = post(f"{s.url}/v1/chat/completions", body, headers)
            assert status == 401 and reply["error"]["code"] == "invalid_api_key", headers
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        r = s.client(api_key="s3cret").chat.completions.create(model="any", messages=body["messages"], max_tokens=2)
        assert r.usage.completion_tokens == 2
        with urllib.request.urlopen(f"{s.url}/", timeout=30) as page:  # the page itself is public
            assert page.status == 200
    finally:
        s.stop()


def test_worker_down_is_503_naming_it_then_recovers(tiny_model, cluster):
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]})
    s = start_server(tiny_model, c.topology, retry_timeout=1.0)
    try:
        client = s.client()
        ok = client.completions.create(model="any", prompt="Hi", max_tokens=3, temperature=0)
        c.kill("w")
        for stream in (False, True):
            t0 = time.monotonic()
            with pytest.raises(openai.APIStatusError) as e:
                r = client.completions.create(model="any", prompt="Hi", max_tokens=3, stream=stream)
                list(r)
            assert e.value.status_code == 503
            assert "worker 'w'" in e.value.message and "unreachable" in e.value.message
            assert time.monotonic() - t0 < 15
        c.start("w")
        c.wait("w")
        again = client.completions.create(model="any", prompt="Hi", max_tokens=3, temperature=0)
        assert again.choices[0].text == ok.choices[0].text
    finally:
        s.stop()


# ---- the command line ---------------------------------------------------------------------------------

@pytest.mark.parametrize("busy_poll", ["0", "3000"])
def test_cli_serves_until_sigterm_and_frees_sessions(busy_poll, tiny_model, cluster, tmp_path):
    """Also on a busy-polling event loop (cake/eventloop.py): signals, streaming and shutdown the same."""
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, extra=("-vv", "--busy-poll", busy_poll))
    port = launch.free_port()
    err = open(tmp_path / "master.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cake", "--mode", "master", "--model", str(tiny_model),
                             "--topology", str(c.topology), "--api", str(port), "--busy-poll", busy_poll],
                            stdout=subprocess.PIPE, stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: b"on http://127.0.0.1" in (tmp_path / "master.log").read_bytes(), 90), \
            (tmp_path / "master.log").read_text()
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
            assert json.loads(r.read())["data"][0]["id"] == tiny_model.name
        sock, got = send_request(url, {"prompt": "Hi", "max_tokens": 3000, "stream": True}, events=3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        sock.close()
        assert b"the server is shutting down" in rest and b"[DONE]" not in rest
        assert wait_for(lambda: worker_ends(c.log("w"))[-1:] == [(1, 0)])
        assert proc.stdout.read() == b""  # logs go to stderr only
        assert "stopped" in (tmp_path / "master.log").read_text()
    finally:
        launch.stop(proc)
        err.close()


def test_api_address_forms():
    assert parse_api_address("8080") == ("127.0.0.1", 8080)
    assert parse_api_address("0.0.0.0:9000") == ("0.0.0.0", 9000)
    assert parse_api_address("[::1]:8081") == ("::1", 8081)
    for bad in ("nope", "70000", "host:", ":0"):
        with pytest.raises(CakeError, match="--api"):
            parse_api_address(bad)


# ---- stop strings, as a pure function -----------------------------------------------------------------

@given(st.text("ab\n", max_size=30), st.lists(st.text("ab\n", min_size=1, max_size=4), max_size=3),
       st.lists(st.integers(0, 30), max_size=8))
def test_stop_matcher_streams_the_cut_text(text, stops, cuts):
    cuts = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    m = StopMatcher(stops)
    out = []
    for a, b in zip(cuts, cuts[1:]):
        out.append(m.push(text[a:b]))
    out.append(m.flush())
    # generation ends with the first piece that completes a stop string: cut before the earliest one so far
    expected = text
    for end in cuts[1:]:
        hits = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if hits:
            expected = text[:min(hits)]
            break
    assert "".join(out) == expected
    assert m.hit == any(s in text for s in stops)
