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


@pytest.mark.parametrize("key, needle", [(None, "requires a cluster key"), ("wrong", "does not know our cluster key")])
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


def test_worker_never_serves_an_unauthenticated_client(tiny_model, cluster):
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, extra=("--cluster-key", KEY))

    async def go(answer, sealed=False):
        reader, writer = await asyncio.open_connection("127.0.0.1", c.ports["w"])
        mine = auth.nonce()
        await wire.write_message(writer, wire.Hello(wire.PROTOCOL, wire.VERSION, mine))
        welcome, _ = await wire.read_message(reader, 1 << 20)
        assert welcome.auth and auth.verify(KEY, "worker", mine, welcome.nonce, welcome.proof)
        writer.write(b"".join(bytes(p) for p in wire.encode(answer(mine, welcome.nonce))))
        opener = Seal(auth.link_keys(KEY, mine, welcome.nonce)[1]) if sealed else None
        replies = []
        try:
            while True:
                replies.append((await asyncio.wait_for(wire.read_message(reader, 1 << 20, opener), 1))[0])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # closed by the worker
        except asyncio.TimeoutError:
            pass  # still open, waiting for requests
        writer.close()
        return replies

    # skipping authentication: a ping instead of the proof gets an error and a closed connection
    replies = run(go(lambda a, b: wire.Ping()))
    assert [type(r) for r in replies] == [wire.Error] and replies[0].code == "auth"
    # a proof made with another key, or a reflected worker proof, likewise
    def kinds(key: str, role: str) -> list[type]:
        return [type(r) for r in run(go(lambda a, b: wire.Auth(auth.proof(key, role, a, b))))]

    assert kinds("other", "client") == [wire.Error]
    assert kinds(KEY, "worker") == [wire.Error]
    # the right proof gets the worker's info, sealed with this connection's key
    assert [type(r) for r in run(go(lambda a, b: wire.Auth(auth.proof(KEY, "client", a, b)), sealed=True))] == [wire.Info]


def test_loopback_detection_for_the_open_worker_warning():
    assert auth.is_loopback("127.0.0.1") and auth.is_loopback("localhost") and auth.is_loopback("::1")
    assert not auth.is_loopback("0.0.0.0") and not auth.is_loopback("192.168.1.5")
