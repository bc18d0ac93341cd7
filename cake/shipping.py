"""The master's side of weights delivered to workers that have no model files (the worker's side is
cake.weight_cache).

A worker that says `fetches` in its handshake is supplied on that connection, before it serves: first
the model's config.json (it then measures its layer, as a placed worker does), then, once it has layers
to serve (its topology entry's, or the plan's), the files that hold them, then its assignment, which it
loads from its cache. Everything goes over the connection's own frames, so a cluster key seals it.

Each layer is one file made from the master's model folder as a cake-split-model bundle holds it: a
safetensors header with the model's tensor names, then their bytes as the master stores them (floats,
or a quantized bundle's parts). Its digest (cake.content_hash: the SHA-256 of its 1 MiB blocks' XXH3-128s) is computed once
(in threads, every byte read once) and its blocks' sums kept in the master's cache folder while the files
it is made of are unchanged (SumStore); the worker checks its cache against it and says
what it holds, so only the rest is sent, from where an interrupted copy ends. Chunks of whole blocks (as
large as the worker asks: 4 MiB) go out with their blocks' sums, WINDOW bytes of them unanswered at
most: each is answered once written, so the worker's disk sets the pace and its memory holds a few
chunks. Sending hashes nothing (the blocks' sums were kept from the first pass) and, without a cluster
key, copies nothing: a chunk goes from the model's files to the socket with os.sendfile.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cake import eventloop, wire
from cake.errors import WorkerError
from cake.layer_ranges import format_layers
from cake.memory import gb
from cake.model.config import LlamaConfig
from cake.model.loader import Quantization, share_bytes, stored_quantization
from cake.model.quant import FORMAT_VERSION
from cake.model.tensor_names import layer_tensor_names
from cake.model.weights import DTYPES, Entry, WeightFiles
from cake.progress import Progress
from cake.seal import Seal
from cake.content_hash import BLOCK, SUM, SUM_NAME, block_sum, content_digest

if TYPE_CHECKING:
    from cake.client import WorkerLink

log = logging.getLogger("cake.shipping")

WINDOW = 32 << 20  # bytes sent and not yet answered
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
RETRIED = ("corrupt",)  # a worker's error that a new attempt (reconnect, manifest, resume) may cure


def bundle_name(model_dir: str | Path, config_bytes: bytes, fmt: Quantization) -> str:
    """The folder of a worker's cache the model goes in: the model folder's name and a digest of its config
    and storage format ('Meta-Llama-3-8B-Instruct-3f2a9c1d07e5')."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(model_dir).resolve().name).strip("._-")[:60] or "model"
    return f"{name}-{hashlib.sha256(config_bytes + str(fmt).encode()).hexdigest()[:12]}"


@dataclass
class LayerFile:
    """One layer's file as the worker will hold it: the safetensors header (with its 8-byte length), then
    the tensors' bytes, read from the master's files when their turn comes."""

    name: str
    head: bytes
    parts: list[Entry]
    sums: list[bytes] = field(default_factory=list)  # each block's sum (hash)
    digest: bytes = b""  # cake.weight_cache.content_digest of those

    @property
    def size(self) -> int:
        return len(self.head) + sum(e.end - e.start for e in self.parts)

    def pieces(self, offset: int, n: int) -> list[tuple[bytes | Path, int, int]]:
        """Where bytes [offset, offset + n) come from: (the header's bytes or a model file, start, count)."""
        out, at = [], 0  # at: where the current piece starts in this file
        for piece in [None, *self.parts]:
            size = len(self.head) if piece is None else piece.end - piece.start
            lo, hi = max(offset, at), min(offset + n, at + size)
            if lo < hi:
                out.append((self.head, lo - at, hi - lo) if piece is None else (piece.path, piece.start + lo - at, hi - lo))
            at += size
        return out

    def read(self, offset: int, n: int) -> bytearray:
        """Bytes [offset, offset + n)."""
        out = bytearray(n)
        view, done = memoryview(out), 0
        for source, start, count in self.pieces(offset, n):
            if isinstance(source, bytes):
                view[done:done + count] = source[start:start + count]
            else:
                _read_exactly(source, start, view[done:done + count])
            done += count
        return out

    def block_sums(self, offset: int, n: int) -> bytes:
        """The sums of the blocks [offset, offset + n) covers (offset at a block's start)."""
        return b"".join(self.sums[offset // BLOCK:-(-(offset + n) // BLOCK)])

    def hash(self) -> None:
        self.sums = [block_sum(self.read(at, min(BLOCK, self.size - at))) for at in range(0, self.size, BLOCK)]
        self.digest = content_digest(self.sums)

    def stamp(self) -> str:
        """What this file is made of, as the file system sees it: its header, and each source file's
        path, byte range, size, modification and change times and inode. Sums stored under it (SumStore)
        are used while none of these changes, as rsync and git trust a file's size and time."""
        said = hashlib.sha256(self.head)
        for e in self.parts:
            st = e.path.stat()
            said.update(f"\0{e.path.resolve()}\0{e.start}\0{e.end}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
                        f"\0{st.st_ino}".encode())
        return said.hexdigest()


class SumStore:
    """The master's block sums of the layer files it made, kept between runs (one file of sums a layer
    file, named by its stamp), so a master that starts again reads no weight to know what to ship."""

    def __init__(self, folder: Path):
        self.folder = folder

    def load(self, f: LayerFile) -> bool:
        """Take `f`'s sums from the store: False when they are not there (or not whole)."""
        try:
            data = (self.folder / f"{f.stamp()}.sums").read_bytes()
        except OSError:
            return False
        if len(data) != SUM * -(-f.size // BLOCK):
            return False
        f.sums = [data[i:i + SUM] for i in range(0, len(data), SUM)]
        f.digest = content_digest(f.sums)
        return True

    def save(self, f: LayerFile, stamp: str) -> None:
        """Keep `f`'s sums, taken while its stamp was `stamp` (not when the files changed meanwhile: the sums
        may be of neither). Whole before renamed; a store that cannot be written costs the next run a hash."""
        if f.stamp() != stamp:
            return
        path = self.folder / f"{stamp}.sums"
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(b"".join(f.sums))
            os.replace(tmp, path)
        except OSError as e:
            log.debug("could not keep the sums of %s in %s: %s", f.name, self.folder, e)
            tmp.unlink(missing_ok=True)


def _read_exactly(path: Path, start: int, out: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        got = 0
        while got < len(out):
            n = f.readinto(out[got:])
            if not n:
                raise WorkerError(f"'{path}' ends early; the master's model folder is truncated")
            got += n


def layer_file(files: WeightFiles, config: LlamaConfig, index: int) -> LayerFile:
    """Layer `index` of the master's folder as one safetensors file (a quantized matrix as its parts)."""
    names = []
    for n in layer_tensor_names(index, config):
        base = n.removesuffix(".weight")
        names += [f"{base}.{p}" for p in ("qweight", "scales", "zeros") if f"{base}.{p}" in files] or [n]
    entries = [files.entry(n) for n in names]  # a missing tensor is a clear error before anything is sent
    meta = {"format": "pt", **{k: v for k, v in files.metadata(names[0]).items() if k.startswith("cake.")}}
    header: dict = {"__metadata__": meta}
    offset = 0
    for name, e in zip(names, entries):
        size = e.end - e.start
        header[name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return LayerFile(f"layer-{index:05d}.safetensors", len(blob).to_bytes(8, "little") + blob, entries)


class Channel:
    """A worker's connection while the master supplies it, before its requests start: the frames of every
    request (sealed with a cluster key), an answer at a time, each within the request timeout."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 seals: tuple[Seal | None, Seal | None], max_frame: int, timeout: float, label: str):
        self.reader, self.writer = reader, writer
        self.seal, self.opener = seals
        self.max_frame, self.timeout, self.label = max_frame, timeout, label

    async def send(self, msg: wire.Message, tensor: torch.Tensor | None = None) -> None:
        await wire.write_message(self.writer, msg, tensor, self.seal)

    async def send_from_files(self, msg: wire.Message, pieces: list[tuple[bytes | Path, int, int]]) -> None:
        """An unsealed frame whose payload (bytes) comes from `pieces` (LayerFile.pieces): from a model file
        with os.sendfile, so the bytes never pass through this process."""
        loop = asyncio.get_running_loop()
        n = sum(count for _, _, count in pieces)
        self.writer.write(wire.frame_head(msg, {"dtype": "u8", "shape": [n]}, n))
        for source, start, count in pieces:
            if isinstance(source, bytes):
                self.writer.write(source[start:start + count])
                continue
            with open(source, "rb") as f:
                if await loop.sendfile(self.writer.transport, f, start, count) != count:
                    raise WorkerError(f"'{source}' ends early; the master's model folder is truncated")
        await self.writer.drain()

    async def recv(self) -> wire.Message:
        try:
            msg, _ = await eventloop.wait_for(wire.read_message(self.reader, self.max_frame, self.opener),
                                              self.timeout)
        except asyncio.TimeoutError:
            raise ConnectionError(f"no answer in {self.timeout:g}s while supplying its weights") from None
        except (asyncio.IncompleteReadError, wire.FrameError) as e:
            raise ConnectionError(f"the connection broke while supplying its weights ({type(e).__name__})") from None
        if isinstance(msg, wire.Error):
            if msg.code in RETRIED:
                raise ConnectionError(msg.message)
            raise WorkerError(f"{self.label}: {msg.message}")
        return msg

    async def ask(self, msg: wire.Message, want: type, tensor: torch.Tensor | None = None):
        await self.send(msg, tensor)
        reply = await self.recv()
        if not isinstance(reply, want):
            raise WorkerError(f"{self.label} answered '{msg.TYPE}' with '{reply.TYPE}'; run the same cake version on "
                              f"every node")
        return reply


class Supplier:
    """What a master gives the workers that fetch their weights (client.Options.supply): the config, the
    files of the layers they are to serve, and the assignment."""

    def __init__(self, model_dir: str | Path, config: LlamaConfig, rate: int | None = None):
        self.dir = Path(model_dir)
        self.config = config
        self.rate = rate  # bytes per second to each worker (--ship-rate); None: as fast as it goes
        self.config_bytes = (self.dir / "config.json").read_bytes()
        self.files = WeightFiles(self.dir)
        probe = "model.layers.0.self_attn.q_proj.weight"
        self.fmt = stored_quantization(self.files, probe) or Quantization()
        self.bundle = bundle_name(self.dir, self.config_bytes, self.fmt)
        self._made: dict[tuple[Quantization, int], LayerFile] = {}
        self._lock = threading.Lock()
        from cake.weight_cache import default_cache_dir

        self.cache = default_cache_dir() / "master"  # what this master keeps between runs
        self.stored = SumStore(self.cache / f"sums-{SUM_NAME}-{BLOCK >> 20}MiB")
        self.sent = 0  # bytes shipped by this master, all workers together

    async def __call__(self, link: WorkerLink, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       seals: tuple[Seal | None, Seal | None], info: wire.Info) -> wire.Info:
        ch = Channel(reader, writer, seals, link.opt.max_frame, link.opt.request_timeout, link.label)
        # Every time: a worker that holds another master's model takes this one (or says it is busy).
        config = torch.frombuffer(bytearray(self.config_bytes), dtype=torch.uint8)
        info = await ch.ask(wire.ModelConfig(self.bundle, self.fmt.scheme, self.fmt.group), wire.Info, config)
        want = list(link.worker.layers)
        if not want or info.layers == want or link.opt.look:
            return info
        files = await self.layer_files(want, self.shipped_format(info))
        await self.ship(ch, files, link)
        return await ch.ask(self.assignment(link), wire.Info)

    def ship_size(self, layers: list[int], fmt: Quantization | None = None) -> int:
        """Bytes the files of these layers take in `fmt` (default: as stored; headers read, nothing hashed):
        the most a worker is sent. A format this master has still to quantize them into is counted from
        their shapes (cake.model.loader.share_bytes), nothing quantized."""
        fmt = fmt or self.fmt
        if fmt == self.fmt:
            return sum(layer_file(self.files, self.config, i).size for i in layers)
        if all((fmt, i) in self._made for i in layers):
            return sum(self._made[fmt, i].size for i in layers)
        floats = next(e.dtype for e in layer_file(self.files, self.config, layers[0]).parts if e.dtype.is_floating_point)
        return share_bytes(self.config, layers, fmt, floats)

    def assignment(self, link: WorkerLink) -> wire.Assign:
        """The plan when the master has one that names this worker, else its own topology entry's layers."""
        plan, w = link.opt.plan, link.worker
        if plan is not None and w.name in plan.names:
            return plan
        return wire.Assign([w.name], [w.layers[0]], [w.layers[-1] + 1])

    def shipped_format(self, info: wire.Info) -> Quantization:
        """What a worker is sent: its own format where it quantizes and this folder holds floats (quantized
        here, once: cake.quantized_store), else the folder's as stored."""
        said = Quantization.parse(info.quantization)
        return said if self.fmt.scheme == "none" and said is not None else self.fmt

    def _source(self, fmt: Quantization, layers: list[int]) -> WeightFiles:
        if fmt == self.fmt:
            return self.files
        from cake.quantized_store import QuantizedStore

        folder = self.cache / f"{self.bundle}-{fmt.scheme}{fmt.group or ''}-v{FORMAT_VERSION}"
        return QuantizedStore(self.files, self.config, fmt, folder).files(layers)

    async def layer_files(self, layers: list[int], fmt: Quantization | None = None) -> list[LayerFile]:
        """The files of these layers in `fmt` (default: as stored), hashed (once per master and format: a
        worker that comes back costs nothing)."""
        fmt = fmt or self.fmt
        missing = [i for i in layers if (fmt, i) not in self._made]
        source = await asyncio.to_thread(self._source, fmt, missing) if missing else self.files
        todo = {i: layer_file(source, self.config, i) for i in missing}
        known = await asyncio.to_thread(lambda: {i for i, f in todo.items() if self.stored.load(f)})
        for i in known:
            self._made[fmt, i] = todo.pop(i)
        if known:
            log.info("the sums of layers %s to ship were kept from an earlier run (their files are unchanged)",
                     format_layers(sorted(known)))
        if todo:
            size, t0 = gb(sum(f.size for f in todo.values())), time.monotonic()
            if len(todo) > 1:  # a big share takes a while (every byte is read): say so first
                log.info("hashing layers %s to ship (%s)", format_layers(list(todo)), size)
            await asyncio.gather(*(asyncio.to_thread(self._hash, (fmt, i), f) for i, f in todo.items()))
            log.info("hashed layers %s to ship (%s) in %.1fs", format_layers(list(todo)), size, time.monotonic() - t0)
        return [self._made[fmt, i] for i in layers]

    def _hash(self, key: tuple[Quantization, int], f: LayerFile) -> None:
        before = f.stamp()
        f.hash()
        self.stored.save(f, before)
        with self._lock:
            self._made[key] = f

    async def ship(self, ch: Channel, files: list[LayerFile], link: WorkerLink) -> None:
        """The manifest, then every byte the worker lacks, in chunks, WINDOW bytes unanswered at most."""
        have = await ch.ask(wire.Manifest([f.name for f in files], [f.size for f in files],
                                          b"".join(f.digest for f in files)), wire.Have)
        if len(have.held) != len(files) or have.max_chunk < 1:
            raise WorkerError(f"{link.label} answered the manifest with a malformed 'have'")
        todo = [(i, held) for i, (f, held) in enumerate(zip(files, have.held)) if held < f.size]
        need = sum(files[i].size - held for i, held in todo)
        total = sum(f.size for f in files)
        name = link.worker.name
        if not need:
            log.info("worker '%s' has the %d file(s) of layers %s in its cache (%s, checked by hash): nothing to "
                     "ship", name, len(files), format_layers(link.worker.layers), gb(total))
            return
        resumed = sum(1 for _, held in todo if held)
        log.info("shipping %s to worker '%s': %d of %d file(s)%s%s", gb(need), name, len(todo), len(files),
                 f", {len(files) - len(todo)} already in its cache" if len(todo) < len(files) else "",
                 f", {resumed} resumed" if resumed else "")
        progress = Progress(need, lambda line: log.info("shipping to worker '%s': %s", name, line))
        chunk = max(BLOCK, min(WINDOW, have.max_chunk) // BLOCK * BLOCK)
        if self.rate:  # an even pace: a chunk every quarter of a second or so
            chunk = min(chunk, max(BLOCK, self.rate // 4 // BLOCK * BLOCK))
        window = asyncio.Semaphore(max(2, WINDOW // chunk))
        sent: asyncio.Queue[int | None] = asyncio.Queue()

        async def sender() -> None:
            pushed, t0 = 0, time.monotonic()
            ahead = None
            try:
                pieces = [(i, off, min(chunk, files[i].size - off)) for i, held in todo
                          for off in range(held, files[i].size, chunk)]
                for k, (i, off, n) in enumerate(pieces):
                    msg = wire.Chunk(i, off, files[i].block_sums(off, n))
                    if ch.seal is None:  # straight from the files (os.sendfile)
                        await window.acquire()
                        await ch.send_from_files(msg, files[i].pieces(off, n))
                    else:  # sealed here: read (the next chunk while this one goes out), then sealed
                        data = await (ahead or asyncio.to_thread(files[i].read, off, n))
                        if k + 1 < len(pieces):
                            j, o, m = pieces[k + 1]
                            ahead = asyncio.ensure_future(asyncio.to_thread(files[j].read, o, m))
                        await window.acquire()
                        await ch.send(msg, torch.frombuffer(data, dtype=torch.uint8))
                    sent.put_nowait(n)
                    pushed += n
                    if self.rate:  # --ship-rate
                        await asyncio.sleep(max(0.0, pushed / self.rate - (time.monotonic() - t0)))
            finally:
                if ahead is not None:
                    ahead.cancel()
                sent.put_nowait(None)

        task = asyncio.ensure_future(sender())
        try:
            while (n := await sent.get()) is not None:
                reply = await ch.recv()
                if not isinstance(reply, wire.Ok):
                    raise WorkerError(f"{link.label} answered a chunk with '{reply.TYPE}'")
                progress.add(n)
                self.sent += n
                window.release()
            await task  # its error, if it failed
        finally:
            task.cancel()
        log.info("shipped %d file(s) to worker '%s': %s", len(todo), name, progress.summary())
