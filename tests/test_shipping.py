"""Weights delivered by the master (cake.shipping, cake.weight_cache): workers started without model files
get the config and their layers' files from the master, into their cache folder, and generate exactly;
a restarted worker gets nothing again, a cut-short file is fetched again, a transfer cut by the master's
death resumes (sealed with a cluster key), names from a hostile master never leave the cache folder, and
a full disk is one error before anything is sent."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import xxhash

from cake import wire
from cake.client import Options, WorkerLink
from cake.errors import WorkerError
from cake.generate import generate
from cake.model.config import load_config
from cake.model.loader import Quantization, stored_quantization
from cake.model.weights import INDEX, WeightFiles, read_header
from cake.run_master import MasterArgs, build_master
from cake.sampling import SamplingParams
from cake.shipping import Supplier
from cake.split import split_model
from cake.topology import load_topology
from cake.weight_cache import Fetch
from cake.worker import Worker, bind
from conftest import EOS, greedy_through, handshake, leave_out_layers, reference_greedy, run, test_device, write_topology

N = 12
PROMPT = [128000, 9906, 11, 1268, 527, 499, 30]
LAYER = 43008 * 4 + 2 * 64 * 4 + 2 * 2 * 16 * 4096 * 4  # one tiny_model layer and its KV cache (test_placement)
KEY = "shipping-test-key"


def block_sums(data: bytes) -> list[bytes]:
    """The XXH3-128 of each 1 MiB block, as docs/protocol.md defines them, from the xxhash library itself
    (not cake.content_hash's)."""
    mib = 1 << 20
    return [xxhash.xxh3_128(data[i:i + mib]).digest() for i in range(0, len(data), mib)]


def digest(data: bytes) -> bytes:
    """A file's digest as docs/protocol.md defines it: the SHA-256 of its blocks' sums."""
    return hashlib.sha256(b"".join(block_sums(data))).digest()


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    """tiny_model's width with a wide MLP: 3.2 MB a layer, several 1 MiB blocks, so a file can be cut short."""
    from cake.synthetic import make_model

    return make_model(tmp_path_factory.mktemp("wide") / "model", hidden=64, intermediate=4096, layers=4, heads=4,
                      kv_heads=2, seed=3)


def wait_log(path: Path, text: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> str:
    """Wait until `text` shows in the log at `path` (failing if `proc` ends first); the log so far."""
    deadline = time.monotonic() + timeout
    while True:
        log = path.read_text() if path.exists() else ""
        if text in log:
            return log
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {text!r} showed in {path}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} did not show in {path} within {timeout:g}s:\n{log[-2000:]}")
        time.sleep(0.02)


def cached_files(folder: Path) -> dict[str, tuple[int, int]]:
    """Each cached layer file's (inode, modification time): the same after a restart means read, not rewritten."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("layer-*.safetensors"))}


def test_workers_without_model_files_get_their_layers_and_generate_exactly(tiny_model, cluster, tmp_path):
    c = cluster(None, {"a": [], "b": []}, start=False)
    leave_out_layers(c.topology)  # the master places them
    caches = {n: tmp_path / f"cache-{n}" for n in ("a", "b")}
    c.extras = {"a": ("--max-memory", f"{int(2.5 * LAYER)}B", "--cache-dir", str(caches["a"])),
                "b": ("--max-memory", f"{int(5.5 * LAYER)}B", "--cache-dir", str(caches["b"]))}
    c.start_all()
    master, _, _ = build_master(MasterArgs(model_dir=str(tiny_model), topology=str(c.topology), device=test_device(),
                                           max_memory=0))  # plans, ships, assigns
    supply = master.options.supply
    want = reference_greedy(tiny_model, PROMPT, N)

    async def restart_b_and_generate() -> list[int]:
        c.kill("b")
        c.start("b")
        await asyncio.to_thread(c.wait, "b")
        return [t async for t in generate(master, PROMPT, SamplingParams(), N, EOS)]

    async def go():
        await master.connect()
        try:
            held = {link.info.name: link.info.layers for link in master.links.values()}
            first = [t async for t in generate(master, PROMPT, SamplingParams(), N, EOS)]
            shipped = supply.sent
            files = cached_files(caches["b"])
            again = await restart_b_and_generate()  # its cache holds everything: nothing is sent
            unchanged = (supply.sent == shipped, cached_files(caches["b"]) == files)
            cut = caches["b"].rglob("layer-*.safetensors").__next__()
            size = cut.stat().st_size
            with open(cut, "r+b") as f:
                f.truncate(size // 2)
            third = await restart_b_and_generate()  # that one file is sent again, and nothing else
            return held, first, again, unchanged, (cut.name, size, supply.sent - shipped), third
        finally:
            await master.close()

    held, first, again, unchanged, (name, size, resent), third = run(go())
    assert first == again == third == want
    assert 1 <= len(held["a"]) <= 2 and len(held["a"]) < len(held["b"]) and sorted(held["a"] + held["b"]) == [*range(6)]
    assert unchanged == (True, True)
    assert resent == size  # the cut-short file, whole, once
    log_a, log_b = c.log("a").read_text(), c.log("b").read_text()
    assert f"fetched {len(held['a'])} file(s) from the master" in log_a
    assert log_b.count("from the master into") == 2 and log_b.count("nothing to fetch") == 1
    assert f"{name} in the cache does not match the master's digest" in log_b
    bundle = next(caches["b"].iterdir()) / "b"
    assert sorted(json.loads((bundle / INDEX).read_text())["weight_map"].values())[0].startswith("layer-")
    assert not list(tmp_path.rglob("*.part"))


def test_a_transfer_cut_by_the_master_dying_resumes_sealed(wide_model, cluster, tap, tmp_path):
    """A worker whose topology entry lists its layers, with a cluster key: the first master ships slowly
    and is killed mid-file (once the worker shows progress); the next one, through a tap, resumes that
    file where it ends and generates exactly, and the weights never cross the wire in clear."""
    cache = tmp_path / "cache"
    c = cluster(None, {"w": ["model.layers.0-3"]}, extra=("--cluster-key", KEY, "--cache-dir", str(cache)))
    master = [sys.executable, "-m", "cake", "--model", str(wide_model), "--cluster-key", KEY, "--device",
              test_device(), "--raw", "-p", "Hello, how are you?"]
    first = subprocess.Popen([*master, "--topology", str(c.topology), "--ship-rate", "2MB", "-n", "1"],
                             stdout=subprocess.DEVNULL, stderr=open(tmp_path / "master-1.log", "wb"))
    try:
        wait_log(c.log("w"), "fetching: ", first)  # its progress: part of the way
    finally:
        first.kill()
        first.wait()
    parts = list(cache.rglob("*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size
    cut = parts[0].name.removesuffix(".part")

    t = tap(c.ports["w"])
    topology = write_topology(tmp_path / "via-tap.yml", {"w": (t.port, ["model.layers.0-3"])})
    ids = tmp_path / "ids.json"
    second = subprocess.run([*master, "--topology", str(topology), "-n", str(N), "--output-ids", str(ids)],
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    out = json.loads(ids.read_text())
    assert out["generated"] == reference_greedy(wide_model, out["prompt"], N)
    log = c.log("w").read_text()
    assert f"resuming {cut} at " in log and "resumed" in second.stderr
    assert not list(cache.rglob("*.part"))

    # What went over the tap: sealed. No 16 bytes of the last layer's weights (sent in the second run) in clear.
    weight = WeightFiles(wide_model).get("model.layers.3.mlp.down_proj.weight", torch.float32, torch.device("cpu"))
    sample = weight.reshape(-1)[1000:1016].numpy().tobytes()
    carried = b"".join(bytes(u) for u in t.up)
    assert len(carried) > weight.numel() * 4 and sample not in carried
    bundle = next(cache.iterdir()) / "w"
    shipped = WeightFiles(bundle).get("model.layers.3.mlp.down_proj.weight", torch.float32, torch.device("cpu"))
    assert torch.equal(shipped, weight)


async def _fake_master(port: int, steps: list[tuple[wire.Message, bytes | None]]) -> list[wire.Message]:
    """A master that says what a test gives it, on one connection (no key), and keeps each answer."""
    reader, writer, info = await handshake(port)
    assert info.fetches and not info.hidden_size
    answers = []
    try:
        for msg, payload in steps:
            tensor = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else None
            await wire.write_message(writer, msg, tensor)
            answers.append((await wire.read_message(reader, 1 << 24))[0])
    finally:
        writer.close()
    return answers


def test_names_from_a_hostile_master_never_leave_the_cache_folder(tiny_model, cluster, tmp_path):
    cache = tmp_path / "box" / "cache"
    c = cluster(None, {"w": ["model.layers.0-1"]}, extra=("--cache-dir", str(cache)))
    config = (tiny_model / "config.json").read_bytes()
    bad_bundles = ["..", "../escape", "/tmp/escape", "a/b", ".hidden", "a..b"]
    bad_files = ["../escape.safetensors", "/tmp/escape.safetensors", "sub/x.safetensors", "..safetensors",
                 "config.json", "x.safetensors\n"]
    steps = [(wire.ModelConfig(b), config) for b in bad_bundles] + [(wire.ModelConfig("model"), config)]
    steps += [(wire.Manifest([f], [8], bytes(32)), None) for f in bad_files]
    body = b'{"__metadata__":{}}'
    blob = len(body).to_bytes(8, "little") + body
    steps += [(wire.Manifest(["fine.safetensors"], [len(blob)], digest(blob)), None),
              (wire.Chunk(0, 0, bytes(32)), blob),  # a sum of SHA-256's size: an older master's
              (wire.Chunk(0, 0, bytes(16)), blob), (wire.Chunk(0, 0, block_sums(blob)[0]), blob)]
    answers = run(_fake_master(c.ports["w"], steps))
    refused = answers[:len(bad_bundles)] + answers[len(bad_bundles) + 1:len(bad_bundles) + 1 + len(bad_files)]
    assert all(isinstance(a, wire.Error) and a.code == "bad_request" for a in refused), refused
    assert "plain file name" in refused[0].message
    assert isinstance(answers[len(bad_bundles)], wire.Info) and answers[len(bad_bundles)].hidden_size == 64
    have, bad_length, bad_sum, ok = answers[-4:]
    assert isinstance(have, wire.Have) and have.held == [0]
    assert isinstance(bad_length, wire.Error) and bad_length.code == "bad_request" and "16 for each block" in bad_length.message
    assert isinstance(bad_sum, wire.Error) and "checksum" in bad_sum.message and isinstance(ok, wire.Ok)
    assert c.alive("w")
    made = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and "worker-" not in p.name
                  and not p.name.startswith("topology"))
    assert made == ["box/cache/model/w/config.json", "box/cache/model/w/fine.safetensors",
                    f"box/cache/model/w/{INDEX}"]


def test_a_master_started_again_reads_no_weight_to_know_what_to_ship(wide_model, tmp_path):
    """A master keeps the block sums of the layer files it ships while the files they come from are
    unchanged: a master started again (a new Supplier) takes them from its store, and hashes a layer again
    once its model file changed."""
    model = shutil.copytree(wide_model, tmp_path / "model")
    config = load_config(model)
    first = run(Supplier(model, config).layer_files([0, 1]))
    whole = [f.read(0, f.size) for f in first]
    sums = [block_sums(b) for b in whole]
    assert len(sums[1]) > 1
    assert [f.digest for f in first] == [digest(b) for b in whole]
    kept = Path(os.environ["XDG_CACHE_HOME"]) / "cake" / "master" / "sums-xxh3_128-1MiB" / f"{first[0].stamp()}.sums"
    assert kept.read_bytes() == b"".join(sums[0])
    kept.write_bytes(bytes(len(kept.read_bytes())))  # what the store says is what a new master believes
    again = run(Supplier(model, config).layer_files([0, 1]))
    assert again[0].digest == hashlib.sha256(bytes(16 * len(sums[0]))).digest() and again[1].digest == first[1].digest
    assert again[1].sums == sums[1]  # block by block: what a resumed transfer sends
    weights = next(model.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the model file changed
    assert run(Supplier(model, config).layer_files([0]))[0].digest == digest(whole[0])


async def _pipelined_master(port: int, config: bytes, blob: bytes, bad: int) -> list[wire.Message]:
    """Sends `blob`'s three chunks without waiting for answers (as cake.shipping does, within its window),
    the one at `bad` with a wrong checksum, then the bad one and those after it again; keeps every answer."""
    mib = 1 << 20
    reader, writer, _ = await handshake(port)
    pieces = [(off, blob[off:off + mib]) for off in range(0, len(blob), mib)]
    sums = lambda data: b"".join(block_sums(data))  # noqa: E731
    u8 = lambda data: torch.frombuffer(bytearray(data), dtype=torch.uint8)  # noqa: E731
    answers = []
    try:
        for msg, payload in ((wire.ModelConfig("model"), config),
                             (wire.Manifest(["big.safetensors"], [len(blob)], digest(blob)), None)):
            await wire.write_message(writer, msg, u8(payload) if payload else None)
            answers.append((await wire.read_message(reader, 1 << 24))[0])
        for k, (off, data) in enumerate(pieces):
            await wire.write_message(writer, wire.Chunk(0, off, bytes(len(sums(data))) if k == bad else sums(data)),
                                     u8(data))
        answers += [(await wire.read_message(reader, 1 << 24))[0] for _ in pieces]
        for off, data in pieces[bad:]:
            await wire.write_message(writer, wire.Chunk(0, off, sums(data)), u8(data))
        answers += [(await wire.read_message(reader, 1 << 24))[0] for _ in pieces[bad:]]
    finally:
        writer.close()
    return answers


def test_a_bad_chunk_among_chunks_in_flight_is_cut_off_and_sent_again(tiny_model, cluster, tmp_path):
    """The worker hashes and writes several chunks at once: a chunk that fails its checksum is refused, the
    chunks sent after it are not kept, and sent again from there the file comes whole and exact."""
    cache = tmp_path / "cache"
    c = cluster(None, {"w": ["model.layers.0-1"]}, extra=("--cache-dir", str(cache)))
    data = torch.Generator().manual_seed(3)
    body = torch.randint(0, 256, ((5 << 19) - 128,), dtype=torch.uint8, generator=data)  # 2.5 MiB with its header
    head = json.dumps({"t": {"dtype": "U8", "shape": [body.numel()], "data_offsets": [0, body.numel()]}}).encode()
    head += b" " * (120 - len(head))
    blob = len(head).to_bytes(8, "little") + head + body.numpy().tobytes()
    assert len(blob) == 5 << 19
    answers = run(_pipelined_master(c.ports["w"], (tiny_model / "config.json").read_bytes(), blob, bad=1))
    assert [type(a).__name__ for a in answers] == ["Info", "Have", "Ok", "Error", "Error", "Ok", "Ok"], answers
    assert answers[3].code == "corrupt" and "checksum" in answers[3].message
    assert (cache / "model" / "w" / "big.safetensors").read_bytes() == blob
    assert c.alive("w")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_what_a_quantizing_worker_would_be_shipped_is_counted_before_anything_is_quantized(tiny_model, tmp_path, scheme):
    """`cake --check` says how much a worker that quantizes would be sent: counted from the shapes while
    nothing is quantized (within 10% of the files the master then makes on this 64-wide model, whose headers
    weigh more than a real model's), and exact once they are made."""
    model = shutil.copytree(tiny_model, tmp_path / "model")
    supply = Supplier(model, load_config(model))
    fmt = Quantization(scheme, 0 if scheme == "int8" else 32)
    floats = supply.ship_size([0, 1, 2])
    guess = supply.ship_size([0, 1, 2], fmt)
    made = sum(f.size for f in run(supply.layer_files([0, 1, 2], fmt)))
    assert guess <= made <= 1.1 * guess and made < floats * (0.3 if scheme == "int8" else 0.2)  # headers: the rest
    assert supply.ship_size([0, 1, 2], fmt) == made


def test_a_disk_without_room_is_one_error_before_anything_is_sent(tiny_model, tmp_path, monkeypatch):
    from cake import weight_cache

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(weight_cache.shutil, "disk_usage", lambda path: usage._replace(free=300_000))
    sockets = bind("127.0.0.1", 0)
    port = sockets[0].getsockname()[1]
    topology = load_topology(write_topology(tmp_path / "t.yml", {"w": (port, ["model.layers.0-5"])}))
    fetch = Fetch(tmp_path / "cache", "w", topology.workers["w"])
    worker = Worker("w", None, None, topology=topology, fetch=fetch)
    supply = Supplier(tiny_model, load_config(tiny_model))

    async def go():
        serving = asyncio.ensure_future(worker.serve(sockets=sockets))
        link = WorkerLink(topology.workers["w"], Options(retry_timeout=10, supply=supply))
        try:
            with pytest.raises(WorkerError) as e:
                await link.ensure_connected()
            return str(e.value)
        finally:
            link.shutdown()
            serving.cancel()
    message = run(go())
    assert "needs 1.0 MB more in its cache folder" in message and "0.3 MB free" in message, message
    assert "--cache-dir" in message and supply.sent == 0
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == ["config.json"]


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_a_layer_file_holds_the_layer_as_the_master_stores_it(tiny_model, tmp_path, quantize):
    """The files the master makes are a bundle a worker loads: the same tensors, byte for byte, and a
    quantized folder's parts with its quantization metadata (quantized bytes are shipped as stored)."""
    source = tiny_model
    if quantize != "none":
        topology = write_topology(tmp_path / "t.yml", {"w": (1, ["model.layers.0-5"])})
        source = split_model(tiny_model, topology, tmp_path / "split", quiet=True, quantize=quantize)[0]
    supply = Supplier(source, load_config(source))
    folder = tmp_path / "bundle"
    folder.mkdir()
    files = run(supply.layer_files(list(range(6))))
    for f in files:
        data = f.read(0, f.size)
        assert f.digest == digest(data)
        head = len(f.head)
        assert f.read(head - 20, 50) == data[head - 20:head + 30]  # any range, across header and tensors
        (folder / f.name).write_bytes(data)
    index = {n: f.name for f in files for n in read_header(folder / f.name)[0] if n != "__metadata__"}
    (folder / INDEX).write_text(json.dumps({"weight_map": index}))
    theirs, ours = WeightFiles(source), WeightFiles(folder)
    layer_names = [n for n in theirs.where if n.startswith("model.layers.")]
    assert sorted(index) == sorted(layer_names)
    for n in layer_names:
        e = theirs.entry(n)
        assert torch.equal(theirs.get(n, e.dtype, torch.device("cpu")), ours.get(n, e.dtype, torch.device("cpu"))), n
    probe = "model.layers.0.self_attn.q_proj.weight"
    assert stored_quantization(ours, probe) == stored_quantization(theirs, probe)
    assert (stored_quantization(ours, probe) is None) == (quantize == "none")


def test_progress_says_bytes_rate_and_time_left():
    from cake.progress import duration, progress_line

    assert progress_line(12_000_000, 48_000_000, 0.125) == "12.0 MB of 48.0 MB (25%), 96.0 MB/s, about 0.4 s left"
    assert progress_line(0, 10, 0.0).endswith("time left unknown")
    assert [duration(s) for s in (0.44, 42, 200, 3900)] == ["0.4 s", "42 s", "3 min 20 s", "1 h 05 min"]


def test_the_options_say_what_is_wrong(tiny_model, tmp_path):
    topology = write_topology(tmp_path / "t.yml", {"w": (1, ["model.layers.0-5"])})
    cake = [sys.executable, "-m", "cake"]
    cases = [
        ([*cake, "--mode", "worker", "--model", str(tiny_model), "--name", "w", "--topology", str(topology),
          "--cache-dir", str(tmp_path / "c")], "--cache-dir: for a worker without --model"),
        ([*cake, "--topology", str(topology)], "the master needs --model"),
        ([*cake, "--model", str(tiny_model), "--topology", str(topology), "--ship-rate", "0"],
         "--ship-rate '0' is not a size above 0"),
        ([*cake, "--mode", "worker", "--name", "w", "--topology", str(topology), "--cache-dir", "/proc/cake-no"],
         "cannot use '/proc/cake-no' as the cache folder"),
    ]
    for command, said in cases:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and said in done.stderr, (command, done.stderr)


def test_a_worker_that_quantizes_is_shipped_quantized_bytes_and_generates_exactly(cluster, tmp_path, monkeypatch):
    """Worker a keeps int8 matrices and the master's folder holds floats: the master quantizes a's layers
    once (into its cache) and ships those, about a quarter of the floats' bytes; b gets floats. Greedy
    tokens equal transformers' with a's layers' matrices quantized and dequantized by the test's own
    formula (weights large enough that int8's error changes tokens: floats there would not pass)."""
    from cake.synthetic import make_model
    from test_quant import ref_quantize

    model = make_model(tmp_path / "model", hidden=64, intermediate=160, layers=6, heads=4, kv_heads=2, seed=3,
                       init_std=0.2)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "master-cache"))
    c = cluster(None, {"a": ["model.layers.0-2"], "b": ["model.layers.3-5"]}, start=False)
    caches = {n: tmp_path / f"cache-{n}" for n in ("a", "b")}
    c.extras = {"a": ("--quantize", "int8", "--cache-dir", str(caches["a"])), "b": ("--cache-dir", str(caches["b"]))}
    c.start_all()
    master, _, _ = build_master(MasterArgs(model_dir=str(model), topology=str(c.topology), device=test_device()))
    got = greedy_through(master, PROMPT, N)
    sent = master.options.supply.sent
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 2 and any(name.startswith(f"model.layers.{i}.") for i in range(3)):
                p.copy_(ref_quantize(p, "int8", 0))
        want = ref.generate(torch.tensor([PROMPT]), max_new_tokens=N, do_sample=False, eos_token_id=list(EOS),
                            pad_token_id=EOS[0], attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))
    assert got == want[0, len(PROMPT):].tolist()
    held = {p.name: read_header(p)[0] for p in caches["a"].rglob("layer-*.safetensors")}
    assert len(held) == 3 and all(h["__metadata__"]["cake.quantization"] == "int8" for h in held.values())
    assert all(h["model.layers.0.mlp.down_proj.qweight"]["dtype"] == "I8" for n, h in held.items() if "00000" in n)
    floats = 6 * 43008 * 4  # both workers' layers' matrices as f32
    int8_part = sum(p.stat().st_size for p in caches["a"].rglob("layer-*.safetensors"))
    assert int8_part < 0.3 * 3 * 43008 * 4 + 3 * 4096 and sent < 0.65 * floats + 6 * 4096
