"""The wire protocol: framing, message schema and validation, tensors <-> bytes. Nothing else touches bytes.

Frame:   u32 big-endian body length N | body
Body:    u32 big-endian header length h | msgpack header (h bytes) | payload (N - 4 - h bytes)
Payload: the raw bytes of at most one tensor, described in the header as {"dtype", "shape"}.

Every length is checked against a limit before anything is read or allocated; the header is unpacked
with msgpack's size limits; tensors are checked against a dtype whitelist and prod(shape) * itemsize ==
len(payload). No pickle, ever. See docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import math
import socket
import struct
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import msgpack
import torch

from cake import streams
from cake.errors import ProtocolError
from cake.seal import TAG, Seal, SealBroken

PROTOCOL = "cake"
VERSION = 4  # 4: shipped weights checked by XXH3-128; 3: the client proves first, sealed frames with a key; 2: relay
MAX_HEADER = 64 * 1024
FORWARD_OVERHEAD = MAX_HEADER + 64  # a forward frame's bytes besides its hidden states, at most
MAX_RANK = 4
_U32 = struct.Struct(">I")

WIRE_DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "i64": torch.int64,
    "u8": torch.uint8,  # bytes: a config file or a chunk of shipped weights (cake.shipping)
}
_DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}


class FrameError(ProtocolError):
    """The byte stream itself is broken (bad length, bad msgpack): the connection must be closed."""

    oversized = False  # the frame was longer than the reader's limit


class Malformed(ProtocolError):
    """A request framed and typed right whose parts do not fit together (a tensor its lists do not
    match): answered with an error of `code`; the connection goes on."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    def reply(self, rid: int = 0) -> Error:
        return Error(self.code, str(self), id=rid)


# ---- messages ---------------------------------------------------------------------------------------

@dataclass
class Message:
    TYPE: ClassVar[str] = ""

    def to_header(self) -> dict[str, Any]:
        d = {"type": self.TYPE}
        for f in fields(self):
            value = getattr(self, f.name)
            # Optional fields at their default stay off the wire (a plain forward carries no relay lists).
            if (f.default is not MISSING and value == f.default) or (f.default_factory is not MISSING and not value):
                continue
            d[f.name] = value
        return d


@dataclass
class Hello(Message):
    """client -> worker, first frame."""
    TYPE: ClassVar[str] = "hello"
    proto: str
    version: int
    nonce: bytes


@dataclass
class Welcome(Message):
    """worker -> client. With `auth` (a cluster key) the client must prove it knows the key first."""
    TYPE: ClassVar[str] = "welcome"
    version: int
    nonce: bytes
    auth: bool


@dataclass
class Auth(Message):
    """With a cluster key: client -> worker, the client's proof; then worker -> client, the worker's."""
    TYPE: ClassVar[str] = "auth"
    proof: bytes


@dataclass
class Info(Message):
    """worker -> client, once the handshake is done: who it is and what it serves."""
    TYPE: ClassVar[str] = "info"
    name: str
    layers: list[int]
    device: str
    dtype: str
    hidden_size: int
    num_layers: int
    capacity: int
    memory: int
    conn: str = ""  # this connection's token: a relayed forward naming it is answered on this connection
    # The most a forward may carry: rows of hidden states (batch x tokens, counted in f32) and sessions.
    # 0: not said (a worker of an earlier version); the master then sends requests as they come.
    max_rows: int = 0
    max_batch: int = 0
    topology: str = ""  # the digest of the worker's topology file (cake.topology.Topology.digest)
    machine: str = ""  # cake.devices.machine_id() of the worker's machine ("": not said)
    unit: str = ""  # cake.devices.compute_unit(): its GPU's UUID, or mps or cpu ("": not said)
    quantization: str = ""  # how its matrices are kept: none, int8, int4 (group N) ("": not said)
    weight_bytes: int = 0  # what its layers' weights take on its device (0: not said)
    arch: str = ""  # the model's family (cake.model.config.ARCHITECTURES; "": not said)
    # Placement (cake.placement): what a worker whose topology entry lists no layers measured and offers
    placed: bool = True  # False: it waits for an Assign
    layer_us: int = 0  # one decode step through one layer of this model, at its dtype and quantization
    chunk_us: int = 0  # one prompt chunk (cake.placement.CHUNK tokens) through one layer (0: not said)
    room: int = 0  # bytes it offers for layers (free memory, at most --max-memory)
    layer_bytes: int = 0  # what one layer takes there (weights + a session's KV cache for the context)
    fetches: bool = False  # no model folder: it takes the model's config and its layers from the master


@dataclass
class Forward(Message):
    """Run layers [start, end) on hidden [B, T, H]; row b is session sessions[b] at positions[b].

    A position below the session's cached length truncates its cache first (replay or rollback).

    Relay: with `relay_workers`, the worker passes its output straight on to the first of them (layers
    relay_starts[0]..relay_ends[0]-1, answering on the connection relay_conns[0] names), with the rest
    of the lists and its compute time appended to `upstream_us`, and answers its own sender nothing
    (an `error` if it could not). A forward with `reply_conn` came from another worker: it uses the
    sessions of, and answers on, the connection with that token.
    """
    TYPE: ClassVar[str] = "forward"
    id: int
    start: int
    end: int
    sessions: list[str]
    positions: list[int]
    relay_workers: list[str] = field(default_factory=list)
    relay_starts: list[int] = field(default_factory=list)
    relay_ends: list[int] = field(default_factory=list)
    relay_conns: list[str] = field(default_factory=list)
    reply_conn: str = ""
    upstream_us: list[int] = field(default_factory=list)

    def check_rows(self, x: torch.Tensor | None, hidden_size: int, max_batch: int) -> None:
        """Its hidden states against its lists: a float tensor [B, T, hidden_size] with 0 < B <= max_batch
        rows and T > 0 tokens, and B distinct sessions with a position each. Malformed if not."""
        if x is None:
            raise Malformed("bad_request", "forward carries no hidden-state tensor")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise Malformed("bad_tensor", f"hidden states must be f32/f16/bf16, not {x.dtype}")
        if x.dim() != 3 or x.shape[2] != hidden_size:
            raise Malformed("bad_tensor", f"hidden states must be [batch, tokens, {hidden_size}], got {list(x.shape)}")
        B, T, _ = x.shape
        if B == 0 or T == 0 or B > max_batch:
            raise Malformed("bad_tensor", f"batch {B} x tokens {T} is empty or over {max_batch} rows")
        if len(self.sessions) != B or len(self.positions) != B or len(set(self.sessions)) != B:
            raise Malformed("bad_request", f"need {B} distinct sessions and {B} positions for a batch of {B}")

    def relay_hops(self, sender: str, most: int) -> list[tuple[str, int, int, str]]:
        """The workers to pass the output on to, as (name, start, end, reply connection): lists of one
        length, naming at most `most` distinct workers other than `sender`, and a positive id (the answer
        comes back by id, from another worker). Malformed if not."""
        hops = (self.relay_workers, self.relay_starts, self.relay_ends, self.relay_conns)
        if len({len(h) for h in hops}) != 1:
            raise Malformed("bad_request", "'forward.relay_*' lists must have the same length")
        names = self.relay_workers
        if len(set(names)) != len(names) or sender in names or len(names) > most:
            raise Malformed("bad_request", "a relay must go on to distinct other workers")
        if names and self.id <= 0:
            raise Malformed("bad_request", "a relayed forward needs a positive id")
        return list(zip(*hops))


@dataclass
class Result(Message):
    """The hidden states after the layers; `upstream_us`: the compute times of the workers that relayed."""
    TYPE: ClassVar[str] = "result"
    id: int
    compute_us: int
    upstream_us: list[int] = field(default_factory=list)


@dataclass
class End(Message):
    """Free these sessions' KV caches."""
    TYPE: ClassVar[str] = "end"
    sessions: list[str]


@dataclass
class Ping(Message):
    TYPE: ClassVar[str] = "ping"


@dataclass
class Assign(Message):
    """master -> worker: the plan. Worker names[i] runs layers [starts[i], ends[i]); the worker loads its
    own (from its model folder) and answers with its new Info. Refused while another master's sessions
    are open there."""
    TYPE: ClassVar[str] = "assign"
    names: list[str]
    starts: list[int]
    ends: list[int]


@dataclass
class ModelConfig(Message):
    """master -> worker that fetches its weights (info.fetches): the model's config.json (the payload, u8),
    the folder of the worker's cache it goes in, and how the shipped matrices are stored. Answered with
    the worker's Info, measured as for a placed worker (cake.weight_cache)."""
    TYPE: ClassVar[str] = "config"
    bundle: str
    quantization: str = "none"
    group: int = 0


@dataclass
class Manifest(Message):
    """master -> worker: the files that hold its layers (names, sizes, and their digests, 32 bytes each, one
    after the other: the SHA-256 of the XXH3-128s of its 1 MiB blocks, cake.content_hash).
    Answered with Have, or an error (a name it refuses, no room on its disk)."""
    TYPE: ClassVar[str] = "manifest"
    names: list[str]
    sizes: list[int]
    digests: bytes


@dataclass
class Have(Message):
    """worker -> master: the bytes of each manifest file it holds, checked against the digest (its size:
    the whole file, less: the whole blocks of one to resume), and the largest chunk it reads (whole blocks)."""
    TYPE: ClassVar[str] = "have"
    held: list[int]
    max_chunk: int


@dataclass
class Chunk(Message):
    """master -> worker: bytes [offset, offset + n) of manifest file number `file` (the payload, u8), whole
    blocks of 1 MiB from a block's start (the file's last may be shorter), and the XXH3-128 of each block,
    16 bytes each, one after the other. Answered with Ok once written."""
    TYPE: ClassVar[str] = "chunk"
    file: int
    offset: int
    sums: bytes


@dataclass
class Ok(Message):
    TYPE: ClassVar[str] = "ok"


@dataclass
class Error(Message):
    """A request failed; the connection stays usable. `id`: the forward's, when a forward failed;
    `cached` is set with code 'cache_behind', `peer` (the worker that could not be reached) with 'relay'
    and 'relay_lost' (the connection to it broke after a relayed forward went out: its sessions there may
    be gone, so the master replays)."""
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    cached: int = 0
    peer: str = ""
    id: int = 0

    def __post_init__(self) -> None:
        # Whatever a sender puts in (an exception's text, a long worker name), the message must pass the
        # reader's string limit, or the reader drops the connection instead of showing it.
        self.message = one_line(self.message)


MESSAGES: dict[str, type[Message]] = {
    m.TYPE: m for m in (Hello, Welcome, Auth, Info, Forward, Result, End, Ping, Assign, ModelConfig, Manifest,
                        Have, Chunk, Ok, Error)
}

_ELEMENT_TYPES = {"list[int]": int, "list[str]": str}
_SCALAR_TYPES = {"int": int, "str": str, "bytes": bytes, "bool": bool}
MAX_LIST = 4096
MAX_STR = 256


def one_line(text: str, limit: int = MAX_STR) -> str:
    """`text` as one line of at most `limit` characters (cut short with '…'): what a string field carries."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


def parse_message(header: Any) -> Message:
    """Validate a decoded header against the schema; raise ProtocolError naming the bad field."""
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    kind = header.get("type")
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {str(kind)[:40]!r}")
    values = {}
    for f in fields(cls):
        if f.name in header:
            values[f.name] = _check_field(kind, f.name, str(f.type), header[f.name])
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ProtocolError(f"'{kind}' message is missing field '{f.name}'")
    return cls(**values)


def _check_field(kind: str, name: str, type_name: str, value: Any) -> Any:
    if type_name in _SCALAR_TYPES:
        want = _SCALAR_TYPES[type_name]
        # bool is an int subclass: keep them apart so True is not a position.
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ProtocolError(f"'{kind}.{name}' must be {type_name}, got {type(value).__name__}")
        if want is str and len(value) > MAX_STR:
            raise ProtocolError(f"'{kind}.{name}' is longer than {MAX_STR} characters")
        if want is int and not -(2**62) < value < 2**62:
            raise ProtocolError(f"'{kind}.{name}' is out of range")
        return value
    elem = _ELEMENT_TYPES[type_name]
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise ProtocolError(f"'{kind}.{name}' must be a list of at most {MAX_LIST} {elem.__name__}")
    for v in value:
        _check_field(kind, name, elem.__name__, v)
    return value


# ---- tensors ------------------------------------------------------------------------------------------

def tensor_desc(t: torch.Tensor) -> dict[str, Any]:
    if t.dtype not in _DTYPE_NAMES:
        raise ProtocolError(f"dtype {t.dtype} cannot go on the wire")
    return {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a packing copy (one copy from GPU memory when it lives there)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")


def tensor_from(desc: Any, payload: bytes | bytearray | torch.Tensor) -> torch.Tensor:
    dtype, shape, nbytes = tensor_size(desc)
    if nbytes != len(payload):
        raise ProtocolError(f"tensor {desc['dtype']}{shape} needs {nbytes} bytes but the frame carries {len(payload)}")
    if isinstance(payload, torch.Tensor):  # a u8 buffer of streams.Buffers
        return payload.view(dtype).view(shape)
    if not payload:
        return torch.empty(shape, dtype=dtype)
    buf = payload if isinstance(payload, bytearray) else bytearray(payload)
    return torch.frombuffer(buf, dtype=dtype).view(shape)


def tensor_size(desc: Any) -> tuple[torch.dtype, list[int], int]:
    """A tensor description checked: its dtype, shape and the bytes its payload must have."""
    if not isinstance(desc, dict):
        raise ProtocolError("'tensor' must be a map with dtype and shape")
    dtype_name, shape = desc.get("dtype"), desc.get("shape")
    if not isinstance(dtype_name, str) or dtype_name not in WIRE_DTYPES:
        raise ProtocolError(f"tensor dtype {str(dtype_name)[:20]!r} is not one of {', '.join(WIRE_DTYPES)}")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**31 for s in shape)):
        raise ProtocolError(f"tensor shape must be a list of 1 to {MAX_RANK} non-negative ints")
    dtype = WIRE_DTYPES[dtype_name]
    return dtype, shape, math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def tune_socket(writer: asyncio.StreamWriter) -> None:
    """No Nagle delay (it adds tens of ms to small messages), and keepalive probes so a peer that
    vanished without closing (a pulled cable, a sleeping laptop) is noticed and its sessions freed.

    A peer that reset the connection as it was accepted leaves no socket to tune (the transport closed
    it: EBADF, or EINVAL on macOS): ConnectionError, as for any connection that broke."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, name):  # Linux; macOS has only some of these
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:
        # Not the errno's text: "Bad file descriptor" reads as a bug in cake, when the peer reset it.
        raise ConnectionError("the connection was reset as it opened") from None


# ---- frames -------------------------------------------------------------------------------------------

def encode(msg: Message, tensor: torch.Tensor | None = None) -> list[bytes | memoryview]:
    if tensor is None:
        return [frame_head(msg), b""]
    payload = tensor_bytes(tensor)
    return [frame_head(msg, tensor_desc(tensor), len(payload)), payload]


def frame_head(msg: Message, desc: dict[str, Any] | None = None, size: int = 0) -> bytes:
    """An unsealed frame up to its payload of `size` bytes (a tensor `desc` describes), for a sender that
    writes the payload itself: cake.shipping sends it from the file with os.sendfile."""
    header = msg.to_header()
    if desc is not None:
        header["tensor"] = desc
    head = msgpack.packb(header, use_bin_type=True)
    return _U32.pack(4 + len(head) + size) + _U32.pack(len(head)) + head


SMALL_PAYLOAD = 256 * 1024


def encode_sealed(msg: Message, tensor: torch.Tensor | None, seal: Seal) -> bytearray:
    """A sealed frame (see read_frame), built in one buffer: the hidden states are copied once, by the AEAD
    as it seals them, straight to where they go out from."""
    header = msg.to_header()
    payload: bytes | memoryview = b""
    if tensor is not None:
        header["tensor"] = tensor_desc(tensor)
        payload = tensor_bytes(tensor)
    head = msgpack.packb(header, use_bin_type=True)
    n = 4 + len(head) + TAG
    frame = bytearray(4 + n + (len(payload) + TAG if len(payload) else 0))
    _U32.pack_into(frame, 0, n)
    out = memoryview(frame)
    seal.seal_into(_U32.pack(len(payload)) + head, bytes(out[:4]), out[4:4 + n])
    if len(payload):
        seal.seal_into(payload, b"", out[4 + n:])
    return frame


async def write_message(writer: asyncio.StreamWriter, msg: Message, tensor: torch.Tensor | None = None,
                        seal: Seal | None = None) -> None:
    """Write one frame; with `seal` (a keyed connection past its handshake) a sealed one."""
    if seal is not None:
        writer.write(encode_sealed(msg, tensor, seal))
        await writer.drain()
        return
    head, payload = encode(msg, tensor)
    if len(payload) <= SMALL_PAYLOAD:
        # One segment: with TCP_NODELAY two writes are two packets, and the reader wakes up twice.
        writer.write(head + payload if len(payload) else head)
    else:
        writer.write(head)
        writer.write(payload)  # large: the copy would cost more than the extra wake-up
    await writer.drain()


async def read_frame(reader: asyncio.StreamReader, max_frame: int, seal: Seal | None = None,
                     stall: float = 0.0, buffers: streams.Buffers | None = None) -> tuple[dict, bytes | torch.Tensor]:
    """One frame as (header dict, payload). FrameError for a frame that breaks the framing: the caller
    closes the connection, since the byte stream can no longer be trusted. The header is read and
    checked first: a payload the message may not carry (none, or not the size its tensor description
    gives) is skipped unread into memory and refused (ProtocolError: the stream stays in step).

    With `seal`, the frame is sealed: u32 N (clear) | N bytes sealing (u32 P | msgpack header), with the
    4 bytes of N as associated data | when P > 0, P + 16 bytes sealing the payload. A piece that fails
    its tag (changed, replayed, reordered, injected) is a FrameError.

    With `stall` (seconds): once a frame has begun, the rest must come within it, else FrameError (a peer
    that starts a frame and stops holds its connection's buffers no longer than that)."""
    prefix = await reader.readexactly(4)  # waiting for a frame to begin: as long as it takes
    timer = asyncio.get_running_loop().call_later(
        stall, reader.set_exception, FrameError(f"a frame stalled: its rest did not come within {stall:g}s")
    ) if stall else None
    try:
        return await _read_rest(reader, prefix, max_frame, seal, buffers)
    finally:
        if timer is not None:
            timer.cancel()


async def _read_rest(reader: asyncio.StreamReader, prefix: bytes, max_frame: int,
                     seal: Seal | None, buffers: streams.Buffers | None) -> tuple[dict, bytes | torch.Tensor]:
    if seal is not None:
        head, size = await _read_sealed_head(reader, prefix, max_frame, seal)
    else:
        (n,) = _U32.unpack(prefix)
        if n < 4 or n > max_frame:
            raise _oversized(n, max_frame, f"frame of {n} bytes is outside the limit of 4..{max_frame}")
        (h,) = _U32.unpack(await reader.readexactly(4))
        if h > MAX_HEADER or h > n - 4:
            raise FrameError(f"header of {h} bytes does not fit the frame (limit {MAX_HEADER})")
        head, size = await reader.readexactly(h), n - 4 - h
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises a zoo of types for garbage
        if _msgpack_with_other_keys(head):  # intact, only not our schema: the connection can go on
            await _skip_payload(reader, size, seal)
            raise _refused({}, "the header has a map key that is not a string") from None
        raise FrameError(f"header is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise FrameError("header is not a map")
    problem = _payload_problem(header, size)
    if problem:
        await _skip_payload(reader, size, seal)
        raise _refused(header, problem)
    return header, await _read_payload(reader, size, seal, buffers) if size else b""


def _payload_problem(header: dict, size: int) -> str:
    """'' when a payload of `size` bytes is what this header says comes; else why not."""
    if "tensor" not in header:
        return "frame carries a payload but no 'tensor' description" if size else ""
    try:
        _, shape, nbytes = tensor_size(header["tensor"])
    except ProtocolError as e:
        return str(e)
    if nbytes != size:
        return f"tensor {header['tensor']['dtype']}{shape} needs {nbytes} bytes but the frame carries {size}"
    return ""


async def _skip_payload(reader: asyncio.StreamReader, size: int, seal: Seal | None) -> None:
    """Read past a payload that is refused, a piece at a time (it is never held whole)."""
    left = size + (TAG if seal is not None and size else 0)
    while left:
        left -= len(await reader.readexactly(min(left, 1 << 16)))
    if seal is not None and size:
        seal.count += 1  # its piece had a nonce of its own


def _refused(header: dict, message: str) -> ProtocolError:
    """A ProtocolError for an intact frame, naming the request it refuses (its readable `id`), if any."""
    e = ProtocolError(message)
    rid = header.get("id")
    e.request_id = rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 < rid < 2**62 else 0
    return e


def _oversized(n: int, max_frame: int, message: str) -> FrameError:
    e = FrameError(message)
    e.oversized = n > max_frame
    return e


BROKEN_SEAL = "a sealed frame failed its check (changed, replayed, reordered or injected on the way)"


async def _read_sealed_head(reader: asyncio.StreamReader, prefix: bytes, max_frame: int,
                            seal: Seal) -> tuple[bytes, int]:
    (n,) = _U32.unpack(prefix)
    if n < 4 + TAG or n > 4 + MAX_HEADER + TAG:
        raise FrameError(f"sealed header of {n} bytes is outside the limit of {4 + TAG}..{4 + MAX_HEADER + TAG}")
    try:
        plain = seal.open(await reader.readexactly(n), prefix)
    except SealBroken:
        raise FrameError(BROKEN_SEAL) from None
    (size,) = _U32.unpack_from(plain)
    n = len(plain) + size  # the length an unsealed frame of the same message would have
    if n > max_frame:
        raise _oversized(n, max_frame, f"frame of {n} bytes is outside the limit of 4..{max_frame}")
    return plain[4:], size


async def _read_payload(reader: asyncio.StreamReader, size: int, seal: Seal | None,
                        buffers: streams.Buffers | None) -> bytearray | torch.Tensor:
    def buffer(n: int) -> tuple[bytearray | torch.Tensor, bytearray | memoryview]:
        if buffers is None or n < buffers.SMALLEST:
            b = bytearray(n)
            return b, b
        t = buffers.take(n)
        return t, memoryview(t.numpy())

    payload, into = buffer(size)  # the buffer the tensor is made on: bytes are copied once, into it
    if seal is None:
        await streams.read_into(reader, into)
        return payload
    sealed, sealed_into = buffer(size + TAG)  # the AEAD's copy is the only one
    try:
        await streams.read_into(reader, sealed_into)
        seal.open_into(sealed_into, b"", into)
    except SealBroken:
        raise FrameError(BROKEN_SEAL) from None
    finally:
        if isinstance(sealed, torch.Tensor):
            buffers.give(sealed)
    return payload


def _msgpack_with_other_keys(head: bytes) -> bool:
    """Whether `head` is valid msgpack after all, with map keys other than strings (strict_map_key refuses
    them: hashing keys an attacker picks can be made slow). Decoded as lists of pairs: nothing is hashed."""
    try:
        msgpack.unpackb(head, raw=False, strict_map_key=False, object_pairs_hook=list)
        return True
    except Exception:
        return False


async def read_message(reader: asyncio.StreamReader, max_frame: int, seal: Seal | None = None,
                       stall: float = 0.0, buffers: streams.Buffers | None = None) -> tuple[Message, torch.Tensor | None]:
    """One message (see read_frame). A well-framed message that breaks the schema raises ProtocolError
    with `request_id` set to its readable `id`, so the error answer can name the request it refuses.
    With `buffers`, a large payload is read into one of theirs (the tensor is a view of it)."""
    header, payload = await read_frame(reader, max_frame, seal, stall, buffers)
    try:
        msg = parse_message(header)
        tensor = tensor_from(header["tensor"], payload) if "tensor" in header else None
    except ProtocolError as e:
        raise _refused(header, str(e)) from None
    return msg, tensor
