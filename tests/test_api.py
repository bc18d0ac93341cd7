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
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from cake import launch
from cake.api import ApiServer, StopMatcher, build_server, parse_api_address
from cake.errors import CakeError
from cake.run_master import MasterArgs
from conftest import Cluster, reference_greedy, reference_model

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
    else:  # a whole answer sends nothing until it is done: wait until the server has taken the request
        assert wait_for(lambda: server.server._admitted > 0), "the server never took the request"
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


def test_worker_down_is_503_naming_it_at_once_then_recovers(tiny_model, cluster):
    """The first request after a worker died waits --retry-timeout for it; once it is known to be down,
    requests (whole and streamed) are answered at once, a 503 naming it, until the
    background reconnect finds it back; then they are served again, with the same text."""
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]})
    retry = 5.0
    s = start_server(tiny_model, c.topology, retry_timeout=retry)
    try:
        client = s.client()
        ok = client.completions.create(model="any", prompt="Hi", max_tokens=3, temperature=0)
        c.kill("w")
        for i, stream in enumerate((False, False, True, False, True)):
            t0 = time.monotonic()
            with pytest.raises(openai.APIStatusError) as e:
                r = client.completions.create(model="any", prompt="Hi", max_tokens=3, stream=stream)
                list(r)
            took = time.monotonic() - t0
            assert e.value.status_code == 503
            assert "worker 'w'" in e.value.message and "unreachable" in e.value.message
            assert (took > retry / 2) if i == 0 else (took < 1.0), (i, took)  # backoff ends the wait up to 2 s early
        c.start("w")
        c.wait("w")
        deadline, again = time.monotonic() + 30, None
        while again is None:
            try:
                again = client.completions.create(model="any", prompt="Hi", max_tokens=3, temperature=0)
            except openai.APIStatusError as e:
                assert e.status_code == 503 and "worker 'w'" in e.message
                assert time.monotonic() < deadline, "never served again"
                time.sleep(0.1)
        assert again.choices[0].text == ok.choices[0].text
    finally:
        s.stop()


# ---- log-probabilities ---------------------------------------------------------------------------------
# On peaked_model, whose distributions have a clear top: a log-probability of the wrong token, position or
# processing (temperature, top-p) is far from the right one.

@pytest.fixture(scope="module")
def peaked_server(peaked_model, tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("peaked-cluster"), peaked_model, LAYOUT)
    s = start_server(peaked_model, c.topology)
    yield s
    s.stop()
    c.stop()


def reference_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """transformers' log_softmax of its own float32 logits: row i is the distribution of token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(reference_model(model_dir)(torch.tensor([ids])).logits[0].float(), dim=-1)


def token_bytes(hf, token_id: int) -> bytes:
    """A token's bytes from transformers' own byte-level table (special tokens: their text)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    added = hf.added_tokens_decoder.get(token_id)
    if added is not None:
        return added.content.encode()
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    return bytes(byte_of[c] for c in hf.convert_ids_to_tokens(token_id))


def token_name(hf, token_id: int) -> str:
    raw = token_bytes(hf, token_id)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def token_id(hf, raw: list[int]) -> int:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    name = bytes(raw).decode("utf-8", "replace")
    if name in hf.get_added_vocab():
        return hf.get_added_vocab()[name]
    return hf.convert_tokens_to_ids("".join(bytes_to_unicode()[b] for b in raw))


def check_position(hf, row: torch.Tensor, token: int, logprob: float, top: list[tuple[str, float]], k: int) -> None:
    """One position against the reference row: the token's log-probability and the k most likely tokens,
    in order. The row must have a clear top, or the check would prove little."""
    assert logprob == pytest.approx(row[token].item(), abs=1e-4)
    best = torch.topk(row, k)
    assert [name for name, _ in top] == [token_name(hf, i) for i in best.indices.tolist()]
    assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert best.values[0] > -torch.log(torch.tensor(float(row.numel()))) + 5  # far above uniform


@pytest.mark.parametrize("sampled", [False, True])
def test_chat_logprobs_are_transformers_log_softmax(peaked_server, peaked_model, hf, sampled):
    """Greedy, and sampled with temperature and top-p: the log-probabilities are of the model's own
    distribution, before sampling's filters (as OpenAI gives them)."""
    ids = chat_ids(hf, MESSAGES)
    args = dict(temperature=1.3, top_p=0.6, seed=3) if sampled else {}
    r = peaked_server.client().chat.completions.create(model="any", messages=MESSAGES, max_tokens=N, logprobs=True,
                                                       top_logprobs=3, **args)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens > 1
    answer = [token_id(hf, c.bytes) for c in content]
    if not sampled:
        assert answer == reference_greedy(peaked_model, ids, N)
    assert hf.decode(answer, skip_special_tokens=True) == r.choices[0].message.content
    rows = reference_logprobs(peaked_model, ids + answer)[len(ids) - 1:]
    for row, t, c in zip(rows, answer, content):
        assert (c.token, c.bytes) == (token_name(hf, t), list(token_bytes(hf, t)))
        check_position(hf, row, t, c.logprob, [(x.token, x.logprob) for x in c.top_logprobs], 3)
        assert all(x.bytes == list(token_bytes(hf, token_id(hf, x.bytes))) for x in c.top_logprobs)
    if sampled:  # the filters changed what was drawn, never the log-probabilities
        assert any(c.token != c.top_logprobs[0].token for c in content)


@pytest.mark.parametrize("as_ids", [False, True])
def test_echo_with_max_tokens_0_scores_the_prompt(peaked_server, peaked_model, hf, as_ids):
    """What lm-evaluation-harness's loglikelihood asks: the prompt's own tokens with their log-probabilities
    (the first has none), from text or token ids, read through the official client."""
    text = "Hello there, pipeline of hidden states"
    ids = hf(text)["input_ids"]
    r = peaked_server.client().completions.create(model="any", prompt=ids if as_ids else text, max_tokens=0,
                                                  echo=True, logprobs=2)
    choice, lp = r.choices[0], r.choices[0].logprobs
    assert choice.text == text and choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 0)
    assert lp.tokens == [token_name(hf, t) for t in ids]
    assert lp.text_offset == [len(hf.decode(ids[:i])) for i in range(len(ids))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    rows = reference_logprobs(peaked_model, ids)
    for i in range(1, len(ids)):
        top = list(lp.top_logprobs[i].items())
        check_position(hf, rows[i - 1], ids[i], lp.token_logprobs[i], top[:2], 2)
        # the prompt's token is listed too when it is not among the 2 most likely (OpenAI's "logprobs + 1")
        assert lp.top_logprobs[i][lp.tokens[i]] == lp.token_logprobs[i] and len(top) in (2, 3)


@pytest.mark.parametrize("greedy", [False, True])
def test_loglikelihood_request_of_lm_eval(peaked_server, peaked_model, hf, greedy):
    """lm-evaluation-harness's local-completions loglikelihood, request and parsing as it does them: a
    batch of one token-id prompt (context + continuation) with echo, max_tokens 1 and logprobs 1; the
    continuation's log-likelihood is the sum of token_logprobs[ctxlen:-1], and it is greedy when each is
    the largest of its top_logprobs. The continuation is some text, or the model's own greedy one."""
    context = hf("The quick brown")["input_ids"]
    continuation = reference_greedy(peaked_model, context, 3) if greedy else hf(" fox jumps over")["input_ids"]
    ids = context + continuation
    status, r = post(f"{peaked_server.url}/v1/completions",
                     {"model": "any", "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1,
                      "seed": 1234, "echo": True})
    assert status == 200, r
    choice = r["choices"][0]
    lp = choice["logprobs"]
    answer = reference_greedy(peaked_model, ids, 1)
    assert choice["text"] == hf.decode(ids) + hf.decode(answer, skip_special_tokens=True)
    assert lp["tokens"] == [token_name(hf, t) for t in ids + answer]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    rows = reference_logprobs(peaked_model, ids + answer)
    for i, t in enumerate((ids + answer)[1:], start=1):
        assert lp["token_logprobs"][i] == pytest.approx(rows[i - 1, t].item(), abs=1e-4)
    ctxlen = len(context)
    loglikelihood = sum(lp["token_logprobs"][ctxlen:-1])
    assert loglikelihood == pytest.approx(sum(rows[i - 1, ids[i]].item() for i in range(ctxlen, len(ids))), abs=1e-3)
    is_greedy = all(tok == max(top.values()) for tok, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                                 lp["top_logprobs"][ctxlen:-1]))
    assert is_greedy == greedy
    # the answer's token is greedy: the only entry of its top_logprobs
    assert lp["top_logprobs"][-1] == {lp["tokens"][-1]: lp["token_logprobs"][-1]}


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_logprobs_equal_whole(peaked_server, kind):
    client = peaked_server.client()
    if kind == "chat":
        create, args = client.chat.completions.create, dict(messages=MESSAGES, logprobs=True, top_logprobs=2)
    else:
        create, args = client.completions.create, dict(prompt="Once upon a time", logprobs=2, echo=True)
    args.update(model="any", max_tokens=N, temperature=0.9, seed=4)
    whole = create(**args).choices[0].logprobs
    chunks = [c for c in create(**args, stream=True) if c.choices]
    carried = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert len(carried) > 2  # spread over the chunks of the stream, not sent at the end
    if kind == "chat":
        assert chunks[0].choices[0].logprobs is None  # the role chunk
        assert [x for lp in carried for x in lp.content] == whole.content
    else:
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [x for lp in carried for x in getattr(lp, name)] == getattr(whole, name), name


@pytest.mark.parametrize("mode", ["chunks", "pipelined"])
def test_echo_of_a_long_prompt_split_into_requests(peaked_model, cluster, mode):
    """A prompt that goes through the workers in several requests (larger than a worker takes, or pipelined
    chunks of 256): every position's log-probability is still transformers'."""
    rng = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 100000, (150 if mode == "chunks" else 600,), generator=rng).tolist()
    extra = ("--max-frame-mb", "0.07") if mode == "chunks" else ()  # 0.07 MiB: about 30 positions a request
    c = cluster(peaked_model, LAYOUT, extra=extra)
    s = start_server(peaked_model, c.topology, pipeline="on")
    try:
        local = next(x for x in s.server.master.stages if x.stage.worker is None)  # layer 2, on the master
        r = s.client().completions.create(model="any", prompt=ids, max_tokens=0, echo=True, logprobs=1)
        assert local.stats.calls > 2  # the prompt went in several requests
    finally:
        s.stop()
    rows = reference_logprobs(peaked_model, ids)
    got = r.choices[0].logprobs.token_logprobs
    assert got[0] is None and len(got) == len(ids)
    want = rows[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(got[1:]), want, atol=1e-4, rtol=0)


BAD_LOGPROBS = [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 1.5}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": "3"}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true, as OpenAI refuses it
    ("chat", {"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
    ("chat", {"logprobs": 1}, "logprobs"),
    ("chat", {"logprobs": "true"}, "logprobs"),
    ("completion", {"logprobs": 6}, "logprobs"),
    ("completion", {"logprobs": -1}, "logprobs"),
    ("completion", {"logprobs": True}, "logprobs"),
    ("completion", {"logprobs": 2.0}, "logprobs"),
    ("completion", {"echo": "yes"}, "echo"),
    ("completion", {"max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ("completion", {"max_tokens": -1, "echo": True}, "max_tokens"),
]


@pytest.mark.parametrize("kind,fields,param", BAD_LOGPROBS, ids=[f"{k}-{p}-{i}" for i, (k, _, p) in
                                                                 enumerate(BAD_LOGPROBS)])
def test_bad_logprobs_values_are_400_naming_the_field(server, kind, fields, param):
    body = {"messages": [{"role": "user", "content": "hi"}]} if kind == "chat" else {"prompt": "hi"}
    status, reply = post(f"{server.url}/v1/{'chat/completions' if kind == 'chat' else 'completions'}",
                         {**body, "max_tokens": 2, **fields})
    assert status == 400, reply
    assert reply["error"]["param"] == param and f"'{param}'" in reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error"


def test_echo_without_logprobs_returns_the_prompt_first(server, hf):
    r = server.client().completions.create(model="any", prompt="Hello there", max_tokens=3, echo=True, temperature=0)
    plain = server.client().completions.create(model="any", prompt="Hello there", max_tokens=3, temperature=0)
    assert r.choices[0].text == "Hello there" + plain.choices[0].text and r.choices[0].logprobs is None
    assert server.client().completions.create(model="any", prompt="Hi", max_tokens=0, echo=True).choices[0].text == "Hi"


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
