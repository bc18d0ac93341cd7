"""Cluster-key authentication between real master and worker processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from cake import auth, wire
from cake.client import Options
from cake.errors import WorkerError
from cake.master import Master
from cake.seal import Seal
from cake.topology import load_topology
from conftest import reference_greedy, run
from test_pipeline import cake_generate

KEY = "correct horse battery staple"


@pytest.fixture(scope="module")
def prompt(tiny_model):
    from cake.tokenizer import Tokenizer
    return Tokenizer(tiny_model).encode_prompt("Who goes there?")


def connect_with(tiny_model, topology, key):
    async def go():
        m = Master(tiny_model, load_topology(topology), options=Options(key=key, retry_timeout=1))
        try:
            await m.connect()
        finally:
            await m.close()
    run(go())


def test_right_key_generates_exactly(tiny_model, cluster, prompt):
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, extra=("--cluster-key", KEY))
    master = Master(tiny_model, load_topology(c.topology), options=Options(key=KEY))
    assert run(cake_generate(tiny_model, None, prompt, n=8, master=master)) == reference_greedy(tiny_model, prompt, 8)


@pytest.mark.parametrize("key, needle", [(None, "requires a cluster key"), ("wrong", "refused the cluster key")])
def test_missing_or_wrong_key_is_refused(tiny_model, cluster, key, needle):
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, extra=("--cluster-key", KEY))
    with pytest.raises(WorkerError, match=needle):
        connect_with(tiny_model, c.topology, key)


def test_keyless_worker_is_refused_by_a_master_with_a_key(tiny_model, cluster):
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]})
    with pytest.raises(WorkerError, match="cannot prove who it is"):
        connect_with(tiny_model, c.topology, KEY)


def test_key_from_environment_through_the_cli(tiny_model, cluster, prompt, tmp_path):
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, env={auth.ENV_KEY: KEY})
    cmd = [sys.executable, "-m", "cake", "--model", str(tiny_model), "--topology", str(c.topology),
           "--prompt", "Who goes there?", "-n", "8", "--temperature", "0", "--retry-timeout", "2"]
    ok = subprocess.run(cmd + ["--output-ids", str(tmp_path / "ids.json")], capture_output=True, text=True,
                        timeout=120, env={**os.environ, auth.ENV_KEY: KEY})
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "ids.json").read_text())["generated"] == reference_greedy(tiny_model, prompt, 8)
    env = {k: v for k, v in os.environ.items() if k != auth.ENV_KEY}
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines()[-1].startswith("error: worker 'w' at 127.0.0.1:")
    assert "Traceback" not in bad.stderr


async def knock(port: int, answer, sealed: bool = False):
    """A raw client: hello, then `answer(client nonce, worker nonce)` in place of its proof (None: nothing).
    Returns the worker's welcome header as it came on the wire, and the messages the worker sent after it
    (the worker's proof in clear, then, with `sealed`, what it sealed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    mine = auth.nonce()
    await wire.write_message(writer, wire.Hello(wire.PROTOCOL, wire.VERSION, mine))
    welcome, _ = await wire.read_frame(reader, 1 << 20)
    if answer is not None:
        writer.write(b"".join(bytes(p) for p in wire.encode(answer(mine, welcome["nonce"]))))
    opener = Seal(auth.link_keys(auth.stretch(KEY), mine, welcome["nonce"])[1]) if sealed else None
    replies = []
    try:
        while True:
            replies.append((await asyncio.wait_for(wire.read_message(reader, 1 << 20, opener if replies else None), 1))[0])
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # closed by the worker
    except asyncio.TimeoutError:
        pass  # still open
    writer.close()
    return welcome, replies, mine, welcome["nonce"]


def test_worker_reveals_nothing_derived_from_the_key_before_the_client_proves_it(tiny_model, cluster):
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, extra=("--cluster-key", KEY))
    port, secret = c.ports["w"], auth.stretch(KEY)
    # the welcome holds only the worker's fresh nonce, and a client that stays silent gets nothing more
    welcome, replies, _, _ = run(knock(port, None))
    assert set(welcome) == {"type", "version", "nonce", "auth"} and welcome["auth"] is True and replies == []
    # skipping authentication: a ping instead of the proof gets an error and a closed connection
    _, replies, _, _ = run(knock(port, lambda a, b: wire.Ping()))
    assert [type(r) for r in replies] == [wire.Error] and replies[0].code == "auth"
    # a proof made with another key (stretched or not), or one with the worker's label, likewise
    for bad in (auth.stretch("other"), KEY.encode(), secret):
        role = "worker" if bad is secret else "client"
        _, replies, _, _ = run(knock(port, lambda a, b: wire.Auth(auth.proof(bad, role, a, b))))
        assert [(type(r), r.code) for r in replies] == [(wire.Error, "auth")]
    # the right proof gets the worker's own, then its info sealed with this connection's key
    _, replies, mine, theirs = run(knock(port, lambda a, b: wire.Auth(auth.proof(secret, "client", a, b)), sealed=True))
    assert [type(r) for r in replies] == [wire.Auth, wire.Info]
    assert auth.verify(secret, "worker", mine, theirs, replies[0].proof)


def test_failed_authentications_are_logged_with_the_address_at_most_once_a_second(tiny_model, cluster):
    """A worker says who failed to prove the key, at the default log level; a flood of failures makes one
    line a second, which counts the ones it left out."""
    import re
    import time

    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, extra=("--cluster-key", KEY))
    wrong = auth.stretch("guess")
    attempts, lines, deadline = 0, [], time.monotonic() + 60
    while not any("more since the last such line" in line for line in lines):
        assert time.monotonic() < deadline, lines
        run(knock(c.ports["w"], lambda a, b: wire.Auth(auth.proof(wrong, "client", a, b))))
        attempts += 1
        lines = [line for line in c.log("w").read_text().splitlines() if "failed authentication" in line]
    assert re.search(r"failed authentication from 127\.0\.0\.1:\d+: a proof made with another key", lines[0])
    assert len(lines) < attempts
    assert sum(int(n) for n in re.findall(r"\((\d+) more since", "\n".join(lines))) + len(lines) == attempts
    assert "Traceback" not in c.log("w").read_text()


def test_keygen_prints_a_random_key_that_works_as_is(tiny_model, cluster, prompt):
    import re

    cmd = [sys.executable, "-c", "import sys, runpy; sys.argv = ['cake', 'keygen']; runpy.run_module('cake', "
                                 "run_name='__main__'); assert 'torch' not in sys.modules, 'torch imported'"]
    runs = [subprocess.run(cmd, capture_output=True, text=True, timeout=60) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert re.fullmatch(r"[0-9a-f]{64}\n", r.stdout), r.stdout
    key = runs[0].stdout.strip()
    assert key != runs[1].stdout.strip()
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, extra=("--cluster-key", key))
    master = Master(tiny_model, load_topology(c.topology), options=Options(key=key))
    assert run(cake_generate(tiny_model, None, prompt, n=4, master=master)) == reference_greedy(tiny_model, prompt, 4)


def test_the_key_is_stretched_with_scrypt_once_per_process():
    import hashlib

    want = hashlib.scrypt(KEY.encode(), salt=auth.SALT, n=1 << 17, r=8, p=1, maxmem=1 << 28, dklen=32)
    assert auth.stretch(KEY) == want and auth.stretch(KEY) is auth.stretch(KEY)


def test_loopback_detection_for_the_open_worker_warning():
    assert auth.is_loopback("127.0.0.1") and auth.is_loopback("localhost") and auth.is_loopback("::1")
    assert not auth.is_loopback("0.0.0.0") and not auth.is_loopback("192.168.1.5")
