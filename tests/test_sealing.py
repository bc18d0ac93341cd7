"""Sealed links: with a cluster key every frame after the handshake is encrypted and authenticated, between
master and worker and between relaying workers. A proxy on the path sees no field names, and a byte it
flips breaks that one connection, which the master replays over: the answer does not change."""

from __future__ import annotations

import logging

import pytest

from cake.client import Options
from cake.master import Master
from cake.tokenizer import Tokenizer
from cake.topology import load_topology
from conftest import reference_greedy, run, write_topology
from test_pipeline import cake_generate

KEY = "sealed and delivered"
N = 12
NAMES = (b"forward", b"positions", b"sessions", b"reply_conn", b"relay_conns", b"result", b"compute_us")


@pytest.fixture(scope="module")
def prompt(tiny_model):
    return Tokenizer(tiny_model).encode_prompt("Nobody on the path may read or bend this.")


def generate_through(tiny_model, topology, prompt, key):
    master = Master(tiny_model, load_topology(topology), options=Options(key=key, retry_timeout=30))
    return run(cake_generate(tiny_model, None, prompt, n=N, master=master))


def shown(recorded: list[bytearray]) -> list[bytes]:
    wire = b"".join(recorded)
    return [name for name in NAMES if name in wire]


@pytest.mark.parametrize("way", ["down", "up"])
def test_a_flipped_byte_is_caught_and_the_answer_is_unchanged(tiny_model, cluster, tap, prompt, tmp_path, caplog,
                                                               way):
    """One byte of a hidden state inverted on the way (worker to master, or master to worker): the
    receiver finds the frame broken, the connection closes, the master reconnects and replays."""
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]}, extra=("--cluster-key", KEY))
    t = tap(c.ports["w"], flip=(way, 0, 3000))  # past the handshake, inside the prompt's hidden states
    topology = write_topology(tmp_path / "via-tap.yml", {"w": (t.port, ["model.layers.0-5"])})
    with caplog.at_level(logging.INFO, logger="cake"):
        got = generate_through(tiny_model, topology, prompt, KEY)
    assert t.flipped.is_set()
    assert got == reference_greedy(tiny_model, prompt, N)
    assert len(t.up) == 2, "the master should have reconnected once"
    if way == "down":  # the master found the broken frame itself
        assert "sent a broken frame: a sealed frame failed its check" in caplog.text
    else:  # the worker did, and said so before it closed
        assert "closed the connection: a sealed frame failed its check" in caplog.text
        assert "failed its check" in c.log("w").read_text()
    assert "replaying" in caplog.text
    assert shown(t.up) == [] and shown(t.down) == []


def test_without_a_key_frames_stay_in_clear(tiny_model, cluster, tap, prompt, tmp_path):
    """No key, no sealing (as documented): the same proxy sees the field names."""
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]})
    t = tap(c.ports["w"])
    topology = write_topology(tmp_path / "via-tap.yml", {"w": (t.port, ["model.layers.0-5"])})
    assert generate_through(tiny_model, topology, prompt, None) == reference_greedy(tiny_model, prompt, N)
    assert b"forward" in b"".join(t.up) and b"result" in b"".join(t.down)


def test_relays_between_workers_are_sealed_too(tiny_model, cluster, tap, prompt, tmp_path, caplog):
    """Worker a passes its output to worker b through a proxy (a's own topology file points there) that
    sees no field names (not even the relay's connection tokens) and flips one byte; b drops that
    connection, a tells the master, which replays: the answer is unchanged."""
    layout = {"a": ["model.layers.0-2"], "b": ["model.layers.3-5"]}
    c = cluster(tiny_model, layout, extra=("--cluster-key", KEY), start=False)
    t = tap(c.ports["b"], flip=("up", 0, 3000))
    c.topologies["a"] = write_topology(tmp_path / "a-via-tap.yml",
                                       {"a": (c.ports["a"], layout["a"]), "b": (t.port, layout["b"])})
    c.start_all()
    with caplog.at_level(logging.INFO, logger="cake"):
        got = generate_through(tiny_model, c.topology, prompt, KEY)
    assert got == reference_greedy(tiny_model, prompt, N)
    assert t.flipped.is_set() and len(t.up) >= 2  # a reconnected to b
    assert "failed its check" in c.log("b").read_text()
    assert "replaying" in caplog.text
    assert shown(t.up) == [] and shown(t.down) == []
