"""A worker without --model: the folder where the weights the master ships land, and the requests that
fill it (the master's side is cake.shipping).

The cache folder (--cache-dir, default $XDG_CACHE_HOME/cake or ~/.cache/cake) holds one bundle per model
and worker, `<cache>/<bundle>/<worker>/`, like a cake-split-model bundle: config.json, one safetensors
file per layer with the model's tensor names, and the index (written by the worker from the files'
own headers). A worker can be started on it with --model as well.

- Every name the master sends is one plain file name (letters, digits, '.', '_' and '-', no '..'), so
  nothing is ever written outside the cache folder, whatever a master says.
- A file's digest is the SHA-256 of the XXH3-128 sums of its 1 MiB blocks (cake.content_hash): each
  block is checked as its chunk arrives (the master sends their sums with it), and the file as a whole
  by its digest, with one pass over the bytes.
- A file arrives as `<name>.part`, each chunk written at its offset once its blocks check; it gets its
  name only once whole and matching the digest the master announced.
- A file already there is hashed: it is kept (read, never rewritten) when it matches, deleted and
  fetched again when it does not (truncated, corrupt, or another model's). A `.part` left by an
  interrupted transfer is resumed after its last whole block; the whole file is still checked at the end.
- The bytes still to fetch must fit the disk, or the master gets one error before anything is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cake import placement, streams, wire
from cake.content_hash import BLOCK, SUM, block_sums, content_digest, file_sums
from cake.devices import compute_unit, machine_id, pick_device, pick_dtype
from cake.errors import CakeError
from cake.layer_ranges import format_layers
from cake.memory import free_memory, gb
from cake.model.config import LlamaConfig, load_config
from cake.model.stack import LayerStack
from cake.model.loader import Quantization, choose_quantization, load_layers, resolve_context
from cake.model.weights import INDEX, read_header
from cake.progress import Progress
from cake.seal import TAG
from cake.topology import Worker as Entry
from cake.worker import Conn, Placement, RequestError, Worker, WorkerArgs

log = logging.getLogger("cake.worker")

MAX_CHUNK = 4 * BLOCK  # the largest chunk a worker asks for (a frame's fixed costs over 4 MiB)
DEPTH = 8  # chunks being summed and written at once (the master's window, cake.shipping.WINDOW, is 32 MiB)
SUFFIX = ".safetensors"
_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/cake, or ~/.cache/cake."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cake"


def plain_name(name: str, what: str) -> str:
    """`name` when it is one plain file name; otherwise the refusal (a master may be hostile)."""
    if not _PLAIN.match(name) or ".." in name:
        raise RequestError("bad_request", f"refused {what} {wire.one_line(repr(name), 80)}: a name from the master "
                                          f"must be one plain file name (letters, digits, '.', '_', '-'; no '..')")
    return name


def folder_for(worker: str) -> str:
    """A worker's name as a folder name (topology names may hold anything YAML allows)."""
    if _PLAIN.match(worker) and ".." not in worker:
        return worker
    return re.sub(r"[^A-Za-z0-9_-]", "_", worker)[:40] + "-" + hashlib.sha256(worker.encode()).hexdigest()[:8]


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write `data` to `path` through a temporary name, unless the file already holds exactly that."""
    if path.is_file() and path.read_bytes() == data:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


@dataclass
class Incoming:
    """One file of a manifest: where it goes, what it must hash to, and how much of it is here."""

    path: Path
    size: int
    digest: bytes
    held: int = 0  # bytes here and checked
    sums: list[bytes] = field(default_factory=list)  # the sums of the blocks held, while it is fetched
    found: str = "new"  # what the cache had: 'held', 'resumed', 'corrupt' or 'new'
    queued: int = 0  # where the next chunk goes: after `held` and the chunks still being written

    @property
    def part(self) -> Path:
        return self.path.with_name(self.path.name + ".part")

    def check(self) -> None:
        """Look at what the cache holds of this file (hashing it) and set `held` and `found`."""
        if self.path.exists():
            if self.path.stat().st_size == self.size and content_digest(file_sums(self.path)) == self.digest:
                self.held, self.found = self.size, "held"
                return
            self.path.unlink()  # not what the master ships (corrupt, cut short, or another model's): again
            self.found = "corrupt"
        if self.part.exists():
            have = self.part.stat().st_size
            whole = have if have == self.size else have - have % BLOCK
            if 0 < whole <= self.size:
                self.sums = file_sums(self.part, whole)
                if whole < self.size:
                    self.held, self.found = whole, "resumed"
                    return
                if content_digest(self.sums) == self.digest:  # whole, but stopped before its rename
                    os.replace(self.part, self.path)
                    self.held, self.found = self.size, "held"
                    return
            self.part.unlink()
        self.held, self.sums = 0, []

    def write(self, data: memoryview, at: int, disk: ThreadPoolExecutor) -> list[bytes]:
        """Write one chunk at `at` (off the event loop; the bytes go to disk on `disk` while this thread
        sums them): its blocks' sums."""
        writing = disk.submit(self._pwrite, data, at)
        try:
            return block_sums(data)
        finally:
            writing.result()  # `data` is read no more only once this returns

    def _pwrite(self, data: memoryview, at: int) -> None:
        fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], at + done)
        finally:
            os.close(fd)


@dataclass
class Transfer:
    """The manifest a master sent on connection `conn`, and how far its files have come."""

    conn: int
    files: list[Incoming]
    progress: Progress
    fetched: int = 0  # files completed by this transfer
    done: bool = False
    broken: str = ""  # why a chunk failed: the chunks after it are not kept either
    writing: deque[asyncio.Future] = field(default_factory=deque)  # chunks being written, then answered, in order

    async def written(self) -> None:
        """Wait for the chunks in hand to be written and answered (each answers its own error)."""
        while self.writing:
            await self.writing.popleft()


@dataclass
class Fetch:
    """What a worker started without --model does with the master's ModelConfig, Manifest and Chunk
    requests; it builds the worker's model (config, empty stack, how layers load) once the config came."""

    root: Path
    name: str  # the worker's
    entry: Entry  # its topology entry (layers listed, or placed by the master)
    device: str = "auto"
    dtype: str = "auto"
    context: int | None = None
    quantize: str | None = None
    group: int = 32
    max_memory: int | None = None
    bundle: str = ""
    folder: Path | None = None
    transfer: Transfer | None = None
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max(2, min(8, os.cpu_count() or 2)),
                                                                                  thread_name_prefix="cake-cache"))
    _disk: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="cake-disk"))
    buffers: streams.Buffers = field(  # chunks' payloads, and their sealed bytes
        default_factory=lambda: streams.Buffers(keep=DEPTH + 2, largest=MAX_CHUNK + TAG))

    def receiving(self) -> streams.Buffers | None:
        """The buffers the next frame is read into: the pool while weights come, else none."""
        t = self.transfer
        return self.buffers if t is not None and not t.done else None

    def bare_info(self, worker: Worker, token: str) -> wire.Info:
        """The handshake of a worker that has no model yet: the master sends its config first."""
        dev = pick_device(self.device)
        return wire.Info(name=self.name, layers=[], device=str(dev), dtype="", hidden_size=0, num_layers=0,
                         capacity=0, memory=free_memory(dev), conn=token, max_batch=0, topology=worker.topology.digest,
                         machine=machine_id(), unit=compute_unit(dev), placed=False, fetches=True)

    async def serve(self, worker: Worker, dest: Conn, msg: wire.Message,
                    tensor: torch.Tensor | None) -> wire.Message | None:
        """The answer to one of the master's requests; None for a chunk (answered once written)."""
        if isinstance(msg, wire.ModelConfig):
            return await self._config(worker, dest, msg, _bytes(tensor, "config"))
        if worker.config is None or self.folder is None:
            raise RequestError("bad_request", f"worker '{self.name}' has no model yet: send its config first")
        if isinstance(msg, wire.Manifest):
            return await self._manifest(worker, dest, msg)
        return await self._chunk(dest, msg, tensor)

    # ---- the config --------------------------------------------------------------------------------

    async def _config(self, worker: Worker, dest: Conn, msg: wire.ModelConfig, data: memoryview) -> wire.Info:
        bundle = plain_name(msg.bundle, "bundle folder")
        if self.transfer is not None:
            await self.transfer.written()
        if worker.config is not None and bundle == self.bundle:
            return worker.info(dest.token)
        if worker.sessions:
            raise RequestError("busy", f"worker '{self.name}' holds sessions of another master's model; stop that "
                                       f"master or let its answers end, then start this one")
        folder = self.root / bundle / folder_for(self.name)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_if_changed(folder / "config.json", bytes(data))
            config = load_config(folder)
        except OSError as e:
            raise RequestError("disk", f"worker '{self.name}' cannot write its cache folder '{folder}': "
                                       f"{e.strerror or e}; give it --cache-dir on a disk it may write") from None
        except CakeError as e:
            raise RequestError("bad_request", f"worker '{self.name}': the master's config.json: {e}") from None
        bad = [i for i in self.entry.layers if i >= config.num_hidden_layers]
        if bad:
            raise RequestError("bad_layers", f"worker '{self.name}' lists layer {bad[0]} in its topology file, but "
                                             f"the master's model has {config.num_hidden_layers} layers")
        fmt = self._format(msg)
        dev = pick_device(self.device)
        dt = pick_dtype(self.dtype, dev, config.torch_dtype)
        stack = LayerStack(config, {}, resolve_context(config, self.context), dt, dev, fmt)
        layer_us = chunk_us = room = one = 0
        if not self.entry.placed:  # as a placed worker with a model folder does (cake.placement)
            took = await asyncio.to_thread(placement.measure_layer, config, fmt, dt, dev)
            layer_us, chunk_us = took.decode_us, took.chunk_us
            room, one = placement.room(dev, self.max_memory), placement.layer_bytes(config, fmt, dt, stack.capacity)
        self.bundle, self.folder, self.transfer = bundle, folder, None
        worker.take_model(config, stack, Placement(lambda layers: self._load(config, stack, layers), layer_us, room,
                                                   one, fetches=True, chunk_us=chunk_us))
        said = (f"; one layer takes {layer_us / 1e3:.3f} ms here, room for {room // max(1, one)} layer(s)"
                if layer_us else f"; it takes layers {format_layers(self.entry.layers)}")
        log.info("the master's model '%s' (%s, %d layers) goes in %s%s", bundle, config.arch,
                 config.num_hidden_layers, folder, said)
        return worker.info(dest.token)

    def _format(self, msg: wire.ModelConfig) -> Quantization:
        """How this worker keeps its matrices: as the master stores them when they come quantized (as a
        quantized folder is run as stored), else as --quantize asks (quantized as they load)."""
        if msg.quantization in ("", "none"):
            return choose_quantization(None, "", self.quantize, self.group)
        shipped = Quantization(msg.quantization, msg.group if msg.quantization == "int4" else 0)
        if self.quantize not in (None, "none", shipped.scheme) or (self.quantize == "int4" and self.group != msg.group):
            raise RequestError("bad_request", f"worker '{self.name}' was started with --quantize {self.quantize}, but "
                                              f"the master ships {shipped} weights; leave out --quantize to run them "
                                              f"as shipped, or give the master the full-precision model")
        return shipped

    def _load(self, config: LlamaConfig, empty: LayerStack, layers: list[int]) -> LayerStack:
        """The assigned layers, from the bundle the master shipped (checked before: see _manifest)."""
        if not layers:
            return empty
        return load_layers(self.folder, layers, self.device, self.dtype, self.context, config,
                           quantize=self.quantize, group=self.group, max_memory=self.max_memory)[0]

    # ---- the files ---------------------------------------------------------------------------------

    async def _manifest(self, worker: Worker, dest: Conn, msg: wire.Manifest) -> wire.Have:
        n = len(msg.names)
        if not n or len(msg.sizes) != n or len(msg.digests) != 32 * n or len(set(msg.names)) != n:
            raise RequestError("bad_request", "a manifest needs distinct names, and as many sizes and 32-byte digests")
        names = [plain_name(name, "file name") for name in msg.names]
        if any(not name.endswith(SUFFIX) for name in names) or any(not 0 < s < 2**50 for s in msg.sizes):
            raise RequestError("bad_request", f"a manifest names {SUFFIX} files of 1 byte or more")
        t = self.transfer
        if t is not None and not t.done and t.conn != dest.id and any(c.id == t.conn for c in worker.conns.values()):
            raise RequestError("busy", f"worker '{self.name}' is fetching its weights from another master")
        if t is not None:
            await t.written()
        files = [Incoming(self.folder / name, size, msg.digests[32 * i:32 * i + 32])
                 for i, (name, size) in enumerate(zip(names, msg.sizes))]
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._pool, f.check) for f in files))
        for f in files:
            f.queued = f.held
        need = sum(f.size - f.held for f in files)
        total = sum(f.size for f in files)
        free = shutil.disk_usage(self.folder).free
        if need > free:
            raise RequestError("disk", f"worker '{self.name}' needs {gb(need)} more in its cache folder "
                                       f"'{self.folder}' for its layers, but that disk has {gb(free)} free; free "
                                       f"some space there, or start it with --cache-dir on a larger disk")
        self.transfer = t = Transfer(dest.id, files, Progress(need, lambda line: log.info("fetching: %s", line)))
        held = [f for f in files if f.found == "held"]
        for f in files:
            if f.found == "corrupt":
                log.warning("%s in the cache does not match the master's digest (cut short or corrupt): fetching "
                            "it again", f.path.name)
            elif f.found == "resumed":
                log.info("resuming %s at %s of %s", f.path.name, gb(f.held), gb(f.size))
        if need == 0:
            log.info("the cache holds all %d file(s) of these layers (%s, each checked against its digest): nothing "
                     "to fetch", n, gb(total))
            self._complete(t)
        else:
            log.info("fetching %s from the master into %s: %d of %d file(s)%s", gb(need), self.folder, n - len(held), n,
                     f" ({len(held)} already cached)" if held else "")
        fits = (worker.max_frame - wire.FORWARD_OVERHEAD) // BLOCK * BLOCK  # frame_limits leaves room for one
        return wire.Have([f.held for f in files], max(BLOCK, min(MAX_CHUNK, fits)))

    async def _chunk(self, dest: Conn, msg: wire.Chunk, payload: torch.Tensor | None) -> None:
        """Check a chunk and hand it to threads that hash it and write it; it is answered once written and
        checked, after the chunks before it. DEPTH chunks are in hand at most: past that, the next one is
        read from the socket once the oldest is done."""
        data, t = _bytes(payload, "chunk"), self.transfer
        if t is None or t.conn != dest.id or not 0 <= msg.file < len(t.files):
            raise RequestError("bad_request", "a chunk for no file of this connection's manifest")
        if t.broken:  # a chunk failed: once those in hand are settled, the next one goes where it failed
            await t.written()
            t.broken = ""
            for g in t.files:
                g.queued = g.held
        f = t.files[msg.file]
        at, end = f.queued, f.queued + len(data)
        if len(msg.sums) != SUM * -(-len(data) // BLOCK):
            raise RequestError("bad_request", f"a chunk of {len(data)} bytes carries {len(msg.sums)} bytes of sums; "
                                              f"it needs {SUM} for each block of {BLOCK} (is the master's cake as new?)")
        if msg.offset != at or not len(data) or end > f.size or (end < f.size and len(data) % BLOCK):
            raise RequestError("bad_request", f"a chunk of {f.path.name} at {msg.offset} ({len(data)} bytes); this "
                                              f"worker takes it from byte {at} of {f.size} on, in whole blocks of "
                                              f"{BLOCK} bytes")
        f.queued = end
        before = t.writing[-1] if t.writing else None
        writing = asyncio.get_running_loop().run_in_executor(self._pool, f.write, data, at, self._disk)
        writing.add_done_callback(lambda _: self.buffers.give(payload))  # read no more: its buffer is free
        t.writing.append(asyncio.ensure_future(self._write(dest, t, f, writing, at + len(data), msg.sums, before)))
        while len(t.writing) > DEPTH:
            await t.writing.popleft()

    async def _write(self, dest: Conn, t: Transfer, f: Incoming, writing: asyncio.Future, end: int, sums: bytes,
                     before: asyncio.Future | None) -> None:
        if before is not None:  # the chunks before this one are kept (or cut off) first
            await before
        try:
            reply = self._written(t, f, await writing, sums, end)
        except RequestError as e:
            log.warning("a chunk from the master was refused: %s", e)
            reply = wire.Error(e.code, str(e))
        except Exception as e:  # a full disk, a bug: the master must hear of it, and this worker goes on
            log.exception("writing a chunk from the master failed")
            t.broken = t.broken or f"worker '{self.name}' failed to write its weights ({type(e).__name__}: {e}); see its log"
            with contextlib.suppress(OSError):
                os.truncate(f.part, f.held)
            reply = wire.Error("internal", t.broken)
        with contextlib.suppress(ConnectionError, OSError):
            await dest.send(reply)

    def _written(self, t: Transfer, f: Incoming, mine: list[bytes], sums: bytes, end: int) -> wire.Ok:
        """Keep a chunk that is on disk, or cut it off again when it (or one before it) failed its check."""
        if not t.broken and b"".join(mine) != sums:
            t.broken = f"worker '{self.name}': a chunk of {f.path.name} failed its checksum"
        if t.broken:
            os.truncate(f.part, f.held)  # each chunk after the bad one is cut off in its turn
            raise RequestError("corrupt", t.broken)
        t.progress.add(end - f.held)
        f.held = end
        f.sums += mine
        if f.held == f.size:
            if content_digest(f.sums) != f.digest:
                f.part.unlink()
                f.held = f.queued = 0
                f.sums = []
                raise RequestError("corrupt", f"worker '{self.name}': {f.path.name} came whole but does not match its "
                                              f"digest; it is fetched again")
            os.replace(f.part, f.path)
            t.fetched += 1
            if all(g.held == g.size for g in t.files):
                log.info("fetched %d file(s) from the master: %s", t.fetched, t.progress.summary())
                self._complete(t)
        return wire.Ok()

    def _complete(self, t: Transfer) -> None:
        """Every file is here and verified: the index of their tensors (rewritten only when it changes)."""
        self.buffers.clear()
        weight_map, total = {}, 0
        for f in t.files:
            try:
                header, _ = read_header(f.path)
            except CakeError as e:
                raise RequestError("bad_request", f"worker '{self.name}': the master shipped a file that is not "
                                                  f"safetensors ({e})") from None
            weight_map.update({name: f.path.name for name in header if name != "__metadata__"})
            total += f.size
        text = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1, sort_keys=True)
        write_if_changed(self.folder / INDEX, text.encode())
        t.done = True


def _bytes(tensor: torch.Tensor | None, what: str) -> memoryview:
    if tensor is None or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise RequestError("bad_request", f"a {what} carries its bytes as one u8 tensor")
    return memoryview(tensor.numpy())


def open_cache(args: WorkerArgs, entry: Entry) -> Fetch:
    """The Fetch of a worker started without --model: its cache folder made (or a clear error), its
    --device checked now rather than when the master calls."""
    root = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".cake-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CakeError(f"cannot use '{root}' as the cache folder for the weights the master ships: "
                        f"{e.strerror or e}; give --cache-dir a folder this user may write") from None
    pick_device(args.device)
    return Fetch(root.resolve(), args.name, entry, args.device, args.dtype, args.context, args.quantize,
                 args.group_size, args.max_memory)
