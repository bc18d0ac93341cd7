"""Framing, schema validation and tensor codec, through real asyncio streams on loopback."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest
import torch

from cake import streams, wire
from cake.errors import ProtocolError


def roundtrip(msg, tensor=None, max_frame=1 << 24):
    async def go():
        received = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            try:
                received.set_result(await wire.read_message(reader, max_frame))
            except Exception as e:
                received.set_exception(e)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        if isinstance(msg, bytes):
            writer.write(msg)
            await writer.drain()
        else:
            await wire.write_message(writer, msg, tensor)
        writer.close()
        try:
            return await asyncio.wait_for(received, 5)
        finally:
            server.close()

    return asyncio.run(go())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_roundtrip_is_exact(dtype):
    x = torch.randn(2, 3, 16).to(dtype)
    msg, t = roundtrip(wire.Forward(7, 0, 2, ["a", "b"], [0, 5]), x)
    assert msg == wire.Forward(7, 0, 2, ["a", "b"], [0, 5])
    assert t.dtype == dtype and torch.equal(t, x)


def test_message_without_tensor():
    msg, t = roundtrip(wire.Error("cache_behind", "behind", cached=3))
    assert msg == wire.Error("cache_behind", "behind", 3) and t is None


def frame(header: dict, payload: bytes = b"") -> bytes:
    head = msgpack.packb(header)
    return struct.pack(">I", 4 + len(head) + len(payload)) + struct.pack(">I", len(head)) + head + payload


@pytest.mark.parametrize("data, needle", [
    (struct.pack(">I", 2**31) + b"xxxx", "outside the limit"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "outside the limit"),
    (struct.pack(">I", 20) + struct.pack(">I", 100) + b"x" * 16, "does not fit the frame"),
    (struct.pack(">I", 8) + struct.pack(">I", 4) + b"\xc1\xc1\xc1\xc1", "not valid msgpack"),
    (frame([1, 2]), "not a map"),
])
def test_broken_frames(data, needle):
    with pytest.raises(wire.FrameError, match=needle):
        roundtrip(data)


@pytest.mark.parametrize("header, payload, needle", [
    ({"type": "nope"}, b"", "unknown message type"),
    ({"type": "end"}, b"", "missing field 'sessions'"),
    ({"type": "end", "sessions": "abc"}, b"", "must be a list"),
    ({"type": "end", "sessions": [1]}, b"", "must be str"),
    ({"type": "forward", "id": 1, "start": True, "end": 2, "sessions": ["a"], "positions": [0]}, b"", "must be int"),
    ({"type": "forward", "id": 1, "start": 0, "end": 2, "sessions": ["a"], "positions": [0],
      "tensor": {"dtype": "f32", "shape": [1, 1, 4]}}, b"\0" * 12, "needs 16 bytes but the frame carries 12"),
    ({"type": "forward", "id": 1, "start": 0, "end": 2, "sessions": ["a"], "positions": [0],
      "tensor": {"dtype": "f32", "shape": [2**30, 2**30, 4]}}, b"\0" * 16, "needs"),
    ({"type": "forward", "id": 1, "start": 0, "end": 2, "sessions": ["a"], "positions": [0],
      "tensor": {"dtype": "object", "shape": [1]}}, b"\0" * 8, "not one of"),
    ({"type": "forward", "id": 1, "start": 0, "end": 2, "sessions": ["a"], "positions": [0],
      "tensor": {"dtype": "f32", "shape": [-1]}}, b"", "non-negative"),
    ({"type": "ping"}, b"junk", "payload but no 'tensor'"),
])
def test_invalid_messages(header, payload, needle):
    with pytest.raises(ProtocolError, match=needle) as e:
        roundtrip(frame(header, payload))
    assert not isinstance(e.value, wire.FrameError)  # the framing is intact: the connection can go on


def test_frame_limit_is_checked_before_reading():
    big = frame({"type": "ping"}, b"")
    with pytest.raises(wire.FrameError):
        roundtrip(big, max_frame=8)


def test_sockets_get_nodelay_and_keepalive():
    import socket

    async def go():
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        wire.tune_socket(writer)
        sock = writer.get_extra_info("socket")
        got = (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
               sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
        writer.close()
        server.close()
        return got

    nodelay, keepalive = asyncio.run(go())
    assert nodelay and keepalive


def test_a_header_whose_map_keys_are_not_strings_is_refused_but_the_stream_stays_in_step():
    """Valid msgpack with an int key: not our schema (a ProtocolError the worker answers), not a broken
    byte stream (a FrameError that closes the connection)."""
    with pytest.raises(ProtocolError, match="map key that is not a string") as e:
        roundtrip(frame({"type": "ping", 7: "x"}))
    assert not isinstance(e.value, wire.FrameError)


OOM = ("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 11.91 GiB total capacity; 3.12 GiB already "
       "allocated; 7.62 GiB free; 3.20 GiB reserved in total by PyTorch) If reserved memory is >> allocated memory "
       "try setting max_split_size_mb to avoid fragmentation. See documentation for Memory Management")


def test_an_error_message_always_fits_the_wire_as_one_line():
    """A worker's internal error names the worker and the exception: with a long name and message it was
    over MAX_STR, so the reader refused it and dropped the connection instead of showing it."""
    long = f"worker 'linux_server_1' failed (OutOfMemoryError: {OOM[:200]}); see its log"
    assert len(long) > wire.MAX_STR
    got, _ = roundtrip(wire.Error("internal", long, id=3))
    assert len(got.message) == wire.MAX_STR and got.message.endswith("…")
    assert got.message[:-1] == long[:wire.MAX_STR - 1] and got.id == 3
    got, _ = roundtrip(wire.Error("internal", "first line\n  second\tline"))
    assert got.message == "first line second line"


def test_tuning_a_connection_the_peer_already_reset_is_a_connection_error():
    """A peer that resets the connection as it is accepted leaves the transport closed, its socket gone:
    setting options on it fails (EBADF), which must read as a broken connection (retried), not a crash."""
    async def go():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.transport.abort()  # what a reset read does: the transport closes its socket
        await asyncio.sleep(0)
        try:
            wire.tune_socket(writer)
        finally:
            server.close()

    with pytest.raises(ConnectionError, match="the connection was reset as it opened"):
        asyncio.run(go())


# ---- sealed frames ----------------------------------------------------------------------------------------

def sealed_frames(key: bytes, *messages) -> list[bytes]:
    """Each (message, tensor) sealed in turn, as one direction of one connection would send them."""
    from cake.seal import Seal

    seal = Seal(key)
    return [bytes(wire.encode_sealed(m, t, seal)) for m, t in messages]


def read_sealed(data: bytes, key: bytes, count: int):
    """Feed `data` to a reader that opens `count` sealed messages with `key`, as the receiving side does."""
    from cake.seal import Seal

    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        opener = Seal(key)
        return [await wire.read_message(reader, 1 << 24, opener) for _ in range(count)]

    return asyncio.run(go())


KEY_A, KEY_B = b"a" * 32, b"b" * 32
STEP = (wire.Forward(1, 0, 2, ["s"], [0]), torch.randn(1, 3, 16))
PING = (wire.Ping(), None)


def test_sealed_frames_round_trip_and_show_no_field_names():
    frames = sealed_frames(KEY_A, STEP, PING, (wire.Result(1, 5), torch.randn(1, 3, 16).to(torch.bfloat16)))
    got = read_sealed(b"".join(frames), KEY_A, 3)
    assert got[0][0] == STEP[0] and torch.equal(got[0][1], STEP[1]) and got[1][0] == wire.Ping()
    assert got[2][1].dtype == torch.bfloat16
    for name in (b"forward", b"sessions", b"positions", b"tensor", b"result"):
        assert not any(name in f for f in frames)


@pytest.mark.parametrize("case", ["changed", "replayed", "reordered", "dropped", "injected", "other key"])
def test_a_sealed_frame_that_was_tampered_with_breaks_the_stream(case):
    one, two, three = sealed_frames(KEY_A, STEP, PING, STEP)
    stranger = sealed_frames(KEY_B, PING)[0]  # well formed, sealed with a key this connection does not use
    data = {
        "changed": one[:40] + bytes([one[40] ^ 1]) + one[41:] + two,
        "replayed": one + one,
        "reordered": two + one,
        "dropped": one + three,
        "injected": one + stranger + two,
        "other key": stranger,
    }[case]
    count = 1 if case == "other key" else 2
    with pytest.raises(wire.FrameError, match="sealed frame failed its check"):
        read_sealed(data, KEY_A, count)


def test_a_sealed_frame_over_the_limit_is_refused_before_its_payload_is_read():
    frame = sealed_frames(KEY_A, (wire.Forward(1, 0, 2, ["s"], [0]), torch.randn(1, 64, 64)))[0]

    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(frame[:200])  # the header and only the start of the payload
        from cake.seal import Seal

        return await wire.read_message(reader, 1024, Seal(KEY_A))

    with pytest.raises(wire.FrameError, match="outside the limit") as e:
        asyncio.run(go())
    assert e.value.oversized


def test_a_payload_arriving_in_pieces_is_read_whole_into_a_writable_tensor_and_a_cut_one_is_incomplete():
    """Unsealed payloads are read straight from the stream's buffer into the tensor's (streams.read_into):
    pieces of any size make the same tensor, it can be written, and a stream that ends midway is an
    IncompleteReadError as readexactly gave."""
    x = torch.randn(3, 5, 64)
    data = b"".join(bytes(p) for p in wire.encode(wire.Forward(3, 0, 2, ["s"], [0]), x))

    async def read(pieces: list[int], eof_at: int | None = None):
        reader = asyncio.StreamReader(limit=1 << 10)
        got = asyncio.ensure_future(wire.read_message(reader, 1 << 24))
        at = 0
        end = len(data) if eof_at is None else eof_at
        for n in pieces:
            reader.feed_data(data[at:min(at + n, end)])
            at = min(at + n, end)
            await asyncio.sleep(0)  # the reader takes what has come before the next piece
        if eof_at is not None:
            reader.feed_eof()
        return await got

    for pieces in ([len(data)], [1] * 64 + [len(data) - 64], [700] * (len(data) // 700 + 1)):
        msg, t = asyncio.run(read(pieces))
        assert msg == wire.Forward(3, 0, 2, ["s"], [0]) and torch.equal(t, x)
        t += 1  # writable: the frame's own buffer, not a read-only bytes object
    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(read([500] * 20, eof_at=len(data) - 100))


def test_frames_of_every_size_over_a_socket_arrive_exact_in_order_and_a_cut_one_is_incomplete():
    """Over a real loopback connection (cake.streams: a large payload is read from the socket straight into
    its tensor's buffer, the rest through the stream's buffer), frames from 4 bytes to 4 MiB of payload,
    written in pieces of odd sizes, arrive exact and in order; a peer that stops midway is an
    IncompleteReadError."""
    gen = torch.Generator().manual_seed(5)
    tensors = [torch.randn(n, generator=gen) for n in (1, 17_000, 3 << 18, 7, 1 << 20, 40_000)]
    frames = [b"".join(bytes(p) for p in wire.encode(wire.Forward(i + 1, 0, 1, ["s"], [0]), t))
              for i, t in enumerate(tensors)]
    cut = frames[2][:len(frames[2]) // 2]

    async def go():
        got, done = [], asyncio.Event()

        async def serve(reader, writer):
            assert isinstance(writer.transport.get_protocol(), streams.DirectProtocol)
            try:
                while True:
                    got.append(await wire.read_message(reader, 1 << 26))
            except asyncio.IncompleteReadError as e:
                got.append(e)
            finally:
                done.set()

        server = await streams.start_server(serve, "127.0.0.1", 0, limit=1 << 16)
        _, writer = await streams.open_connection("127.0.0.1", server.sockets[0].getsockname()[1], limit=1 << 16)
        blob = b"".join(frames) + cut
        at, sizes = 0, [1, 3, 100_000, 5, 1 << 20, 65_536, 777_777]
        for k in range(10_000):
            if at >= len(blob):
                break
            writer.write(blob[at:at + sizes[k % len(sizes)]])
            at += sizes[k % len(sizes)]
            await writer.drain()
        writer.close()
        await done.wait()
        server.close()
        return got

    got = asyncio.run(go())
    assert len(got) == len(tensors) + 1 and isinstance(got[-1], asyncio.IncompleteReadError)
    for i, ((msg, t), x) in enumerate(zip(got, tensors)):
        assert msg.id == i + 1 and torch.equal(t, x)


@pytest.mark.parametrize("sealed", [False, True])
def test_payload_buffers_given_back_are_used_again_and_hold_only_the_next_frame(sealed):
    """With streams.Buffers (as a worker receiving its weights), a large payload given back is the buffer
    the next one of its size lands in, and holds that frame's bytes alone; one not given back is not
    touched again; a small one never comes from the pool."""
    from cake.seal import Seal

    gen = torch.Generator().manual_seed(9)
    chunks = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for n in (1 << 20, 1 << 20, 1 << 20, 5, 1 << 20)]
    messages = [(wire.Chunk(0, i, b""), c) for i, c in enumerate(chunks)]
    blob = b"".join(sealed_frames(KEY_A, *messages)) if sealed else \
        b"".join(b"".join(bytes(p) for p in wire.encode(m, t)) for m, t in messages)

    async def go():
        got, done, pool = [], asyncio.Event(), streams.Buffers(keep=2, largest=2 << 20)

        async def serve(reader, writer):
            opener = Seal(KEY_A) if sealed else None
            for i in range(len(chunks)):
                _, t = await wire.read_message(reader, 1 << 24, opener, buffers=pool)
                got.append((t.data_ptr(), t.clone(), t))
                if i == 0:
                    pool.give(t)  # the first is given back; the second is kept by its holder
            done.set()

        server = await streams.start_server(serve, "127.0.0.1", 0, limit=1 << 16)
        _, writer = await streams.open_connection("127.0.0.1", server.sockets[0].getsockname()[1], limit=1 << 16)
        writer.write(blob)
        await writer.drain()
        await done.wait()
        writer.close()
        server.close()
        return got

    got = asyncio.run(go())
    assert [torch.equal(copy, c) for (_, copy, _), c in zip(got, chunks)] == [True] * len(chunks)
    assert got[1][0] == got[0][0]  # the first frame's buffer, given back, took the second
    assert got[2][0] != got[0][0] and torch.equal(got[1][2], chunks[1])  # kept: never written again
    assert got[3][2].numel() == 5 and got[4][0] != got[1][0]
