"""GET /api/cluster through real workers, and the /cluster page in a real headless Chromium: what each node
serves, its status as workers are killed and restarted, and where each token's time goes."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cake.cluster_view import Rate, layer_ranges, per_token_ms, session_cache_bytes
from cake.model.config import load_config
from cake.model.kv_cache import KVCache
from cake.topology import Stage, Worker
from conftest import Cluster, screenshot, wait_js
from test_api import LAYOUT, MESSAGES, get, send_request, start_server

RETRY = 2.0  # --retry-timeout of the servers that see a worker killed


def poll(url: str, until, timeout: float, headers: dict | None = None) -> dict:
    """GET /api/cluster until `until(snapshot)` holds; that snapshot. Fails after `timeout` seconds."""
    import json
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        req = urllib.request.Request(f"{url}/api/cluster", headers=headers or {})
        with urllib.request.urlopen(req, timeout=30) as r:
            snap = json.loads(r.read())
        if until(snap):
            return snap
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout:g}s; last snapshot: {snap}")
        time.sleep(0.05)


def node(snap: dict, name: str) -> dict:
    return next(n for n in snap["nodes"] if n["name"] == name)


def layer_bytes(model: Path, layers: range) -> int:
    """What these layers' weights take as the checkpoint stores them (f32, as the nodes run them here)."""
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        return sum(4 * math.prod(f.get_slice(name).get_shape()) for name in f.keys()
                   if any(name.startswith(f"model.layers.{i}.") for i in layers))


# ---- the arithmetic -------------------------------------------------------------------------------------

def test_layer_ranges_of_each_node():
    w = Worker("a", "127.0.0.1", 1, "", (0, 1, 4))
    stages = [Stage(0, 2, w), Stage(2, 4), Stage(4, 5, w), Stage(5, 6)]
    assert layer_ranges(stages, "a") == [[0, 1], [4, 4]]
    assert layer_ranges(stages, "master") == [[2, 3], [5, 5]]
    assert layer_ranges(stages, "b") == []


def test_a_session_cache_is_what_a_kv_cache_allocates(tiny_model):
    config = load_config(tiny_model)
    for dtype, name, size in ((torch.float32, "f32", 4), (torch.bfloat16, "bf16", 2)):
        cache = KVCache([0, 1, 2], config, 100, dtype, torch.device("cpu"))
        # keys and values, 3 layers, 2 KV heads of 16 features, 100 positions (tiny_model, written out)
        assert session_cache_bytes(config, 3, 100, name) == cache.k.nbytes + cache.v.nbytes == 2 * 3 * 2 * 16 * 100 * size


def test_per_token_split_and_rate():
    assert per_token_ms([]) is None
    compute, network = per_token_ms([(0.010, 0.004), (0.020, 0.008)])
    assert compute == pytest.approx(6.0) and network == pytest.approx(9.0)
    rate = Rate(window=5.0)
    for t in (0.0, 1.0, 2.0, 5.5):
        rate.add(t)
    assert rate.per_s(now=5.5) == pytest.approx(3 / 5)  # the token at 0.0 fell out of the window
    assert rate.per_s(now=20.0) == 0


# ---- the endpoint through real workers --------------------------------------------------------------------

@pytest.fixture(scope="module")
def watched(tiny_model, tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster-view"), tiny_model, LAYOUT)
    s = start_server(tiny_model, c.topology)
    yield c, s
    s.stop()
    c.stop()


def test_nodes_are_the_topology(watched, tiny_model):
    c, s = watched
    snap = poll(s.url, lambda j: all(n["rtt_ms"] for n in j["nodes"][1:]), timeout=20)
    assert snap["model"] == tiny_model.name and snap["num_layers"] == 6
    assert snap["plan"] == "topology" and snap["topology"] == str(c.topology)
    assert [(n["name"], n["role"], n["layers"]) for n in snap["nodes"]] == [
        ("master", "master", [[2, 2]]), ("a", "worker", [[0, 1]]), ("b", "worker", [[3, 5]])]
    assert [n["address"] for n in snap["nodes"][1:]] == [f"127.0.0.1:{c.ports['a']}", f"127.0.0.1:{c.ports['b']}"]
    assert node(snap, "master")["address"] == s.url.removeprefix("http://")
    assert [(st["node"], st["layers"]) for st in snap["stages"]] == [("a", [0, 1]), ("master", [2, 2]), ("b", [3, 5])]
    for n in snap["nodes"]:
        assert (n["status"], n["error"], n["device"], n["dtype"], n["quantize"]) == ("up", "", "cpu", "f32", "none")
        assert n["memory"]["free"] > 0 and n["memory"]["used"] == n["memory"]["weights"] + n["memory"]["kv_cache"]
    assert node(snap, "a")["memory"]["weights"] == layer_bytes(tiny_model, range(0, 2))
    assert node(snap, "b")["memory"]["weights"] == layer_bytes(tiny_model, range(3, 6))
    assert node(snap, "master")["memory"]["weights"] > layer_bytes(tiny_model, range(2, 3))  # and the head
    assert node(snap, "a")["rtt_ms"] > 0 and node(snap, "master")["rtt_ms"] is None


def test_a_running_answer_holds_kv_caches(watched, tiny_model):
    c, s = watched
    config = load_config(tiny_model)
    sock, _ = send_request(s.url, {"messages": MESSAGES, "max_tokens": 3000, "stream": True}, events=3)
    try:
        snap = poll(s.url, lambda j: j["active_sessions"] == 1, timeout=10)
        one_layer = 2 * config.num_key_value_heads * 4096 * config.head_dim * 4  # keys and values, f32
        assert [n["memory"]["kv_cache"] for n in snap["nodes"]] == [one_layer, 2 * one_layer, 3 * one_layer]
    finally:
        sock.close()
    snap = poll(s.url, lambda j: j["active_sessions"] == 0, timeout=20)
    assert [n["memory"]["kv_cache"] for n in snap["nodes"]] == [0, 0, 0]


def test_after_a_generation_each_token_has_compute_and_network_time(watched):
    c, s = watched
    before = get(f"{s.url}/api/cluster")[1]
    s.client().completions.create(model="m", prompt="The cluster", max_tokens=12, temperature=0)
    snap = get(f"{s.url}/api/cluster")[1]
    assert snap["tokens_per_s"] > 0 and snap["active_sessions"] == 0
    for old, st in zip(before["stages"], snap["stages"]):
        assert st["steps"] - old["steps"] == 11  # the prompt runs as one step, then one per further token
        assert len(st["compute_ms"]) == len(st["network_ms"]) == min(64, st["steps"])
        assert all(ms > 0 for ms in st["compute_ms"][-11:])
    for name in ("a", "b"):
        assert node(snap, name)["compute_ms"] > 0 and node(snap, name)["network_ms"] > 0
    assert node(snap, "master")["compute_ms"] > 0 and node(snap, "master")["network_ms"] == 0


def test_a_killed_worker_is_down_within_the_retry_timeout_and_up_after_restart(tiny_model, cluster):
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]})
    s = start_server(tiny_model, c.topology, retry_timeout=RETRY)
    try:
        poll(s.url, lambda j: node(j, "w")["status"] == "up", timeout=10)
        answer = s.client().completions.create(model="m", prompt="Hi", max_tokens=3, temperature=0)
        c.kill("w")
        down = node(poll(s.url, lambda j: node(j, "w")["status"] != "up", timeout=RETRY + 5), "w")
        assert down["status"] == "down" and "refused" in down["error"] and down["rtt_ms"] is None
        c.start("w")
        c.wait("w")
        up = node(poll(s.url, lambda j: node(j, "w")["status"] == "up", timeout=10), "w")
        assert up["error"] == ""
        again = s.client().completions.create(model="m", prompt="Hi", max_tokens=3, temperature=0)
        assert again.choices[0].text == answer.choices[0].text
    finally:
        s.stop()


def test_an_answer_waiting_for_a_killed_worker_shows_it_reconnecting_until_it_is_back(tiny_model, cluster):
    c = cluster(tiny_model, {"w": ["model.layers.0-5"]})
    s = start_server(tiny_model, c.topology, retry_timeout=60.0)
    try:
        poll(s.url, lambda j: node(j, "w")["status"] == "up", timeout=10)
        expected = s.client().completions.create(model="m", prompt="Hi", max_tokens=3, temperature=0)
        c.kill("w")
        poll(s.url, lambda j: node(j, "w")["status"] == "down", timeout=10)
        got = {}
        waiting = threading.Thread(target=lambda: got.update(
            r=s.client().completions.create(model="m", prompt="Hi", max_tokens=3, temperature=0)))
        waiting.start()
        poll(s.url, lambda j: node(j, "w")["status"] == "reconnecting" and j["active_sessions"] == 1, timeout=10)
        c.start("w")
        c.wait("w")
        poll(s.url, lambda j: node(j, "w")["status"] == "up", timeout=10)
        waiting.join(60)
        assert got["r"].choices[0].text == expected.choices[0].text
    finally:
        s.stop()


def test_the_cluster_needs_the_api_key_and_the_page_does_not(tiny_model):
    import urllib.error
    import urllib.request

    s = start_server(tiny_model, api_key="s3cret")
    try:
        status, reply = get(f"{s.url}/api/cluster")
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        snap = poll(s.url, lambda j: True, timeout=5, headers={"Authorization": "Bearer s3cret"})
        assert [n["name"] for n in snap["nodes"]] == ["master"] and snap["plan"] == "master"
        assert snap["nodes"][0]["layers"] == [[0, 5]]
        with urllib.request.urlopen(f"{s.url}/cluster", timeout=30) as page:
            assert page.status == 200 and b"<title>cake cluster</title>" in page.read()
    finally:
        s.stop()


# ---- the page in a real browser ---------------------------------------------------------------------------

CARDS = "[...document.querySelectorAll('#cards .card')]"


def test_the_page_shows_the_layer_map_the_nodes_a_live_chart_and_a_worker_going_down(tiny_model, cluster, browser,
                                                                                      tmp_path):
    from selenium.webdriver.common.by import By

    c = cluster(tiny_model, LAYOUT)
    s = start_server(tiny_model, c.topology, retry_timeout=RETRY)
    stopped = False
    try:
        browser.get(s.url + "/")  # from the chat page
        browser.find_element(By.LINK_TEXT, "Cluster").click()
        wait_js(browser, f"{CARDS}.length === 3")
        cards = browser.execute_script(f"""return {CARDS}.map(c => [c.dataset.node, c.dataset.status,
            c.querySelector('h3').textContent, c.style.borderTopColor])""")
        assert [card[:3] for card in cards] == [["master", "up", "mastermasterup"], ["a", "up", "aworkerup"],
                                                ["b", "up", "bworkerup"]]
        segments = browser.execute_script("""return [...document.querySelectorAll('#layermap .seg')].map(s =>
            [s.dataset.node, s.textContent, s.style.flexGrow, s.style.backgroundColor])""")
        assert [seg[:3] for seg in segments] == [["a", "a 0–1", "2"], ["master", "master 2", "1"], ["b", "b 3–5", "3"]]
        colour = {name: border for name, _, _, border in cards}
        assert all(seg[3] == colour[seg[0]] for seg in segments) and len(set(colour.values())) == 3

        # the chart follows a generation while it runs
        sock, _ = send_request(s.url, {"messages": MESSAGES, "max_tokens": 3000, "stream": True}, events=3)
        try:
            steps = "+document.getElementById('chart').dataset.steps"
            first = wait_js(browser, f"{steps} > 0 && {steps}")
            wait_js(browser, f"{steps} > {first}")
            summary = browser.find_element(By.ID, "summary").text
            assert summary.startswith("1 active session · ")
            painted = browser.execute_script("""const c = document.getElementById('chart');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n;""")
            assert painted > 1000  # bars, not only the axes' text
            screenshot(browser, "cluster.png", tmp_path)
        finally:
            sock.close()

        c.kill("b")
        wait_js(browser, "document.querySelector('.card[data-node=b]').dataset.status !== 'up'", timeout=RETRY + 5)
        b = browser.execute_script("""const c = document.querySelector('.card[data-node=b]');
            return [c.querySelector('.badge').textContent, c.querySelector('.error').textContent,
                    document.querySelector('#layermap .seg[data-node=b]').classList.contains('down')]""")
        assert b[0] in ("down", "reconnecting") and b[1] and b[2]
        assert browser.execute_script(f"return {CARDS}.filter(c => c.dataset.status === 'up').length") == 2

        browser.find_element(By.LINK_TEXT, "Chat").click()  # and back to the chat page
        wait_js(browser, "document.getElementById('model').textContent.length > 0")
        browser.back()
        wait_js(browser, f"{CARDS}.length === 3")
        s.stop()
        stopped = True
        banner = wait_js(browser, "!document.getElementById('banner').hidden && "
                                  "document.getElementById('banner').textContent")
        assert banner.startswith("The server is unreachable")
    finally:
        if not stopped:
            s.stop()
