"""The master's side of a worker connection, against a scripted worker on 127.0.0.1."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest

from cake import auth, wire
from cake.client import Options, WorkerLink
from cake.errors import WorkerError
from cake.topology import Worker


def raw_frame(header: dict) -> bytes:
    head = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">II", 4 + len(head), len(head)) + head


async def scripted_worker(answers: list[bytes]):
    """A worker that does the handshake, then answers each request with the next of `answers` (raw frames)."""
    async def handle(reader, writer):
        await wire.read_message(reader, 1 << 20)  # hello
        await wire.write_message(writer, wire.Welcome(wire.VERSION, auth.nonce(), False))
        await wire.write_message(writer, wire.Info("w", [0], "cpu", "f32", 64, 6, 64, 0))
        for answer in answers:
            await wire.read_message(reader, 1 << 20)
            writer.write(answer)
            await writer.drain()
        await reader.read()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_an_answer_that_breaks_the_schema_fails_its_request_and_the_connection_goes_on():
    """An intact frame the master cannot read (here an error whose message is over the wire's string limit,
    as a worker's long internal error was) fails that request with the field named; the connection stays,
    so the next request is answered on it (it was dropped, and the request replayed as if the worker had
    restarted: 'keeps losing sessions' in the end, the worker's error never shown)."""
    too_long = raw_frame({"type": "error", "code": "internal", "message": "x" * (wire.MAX_STR + 1)})

    async def go():
        server = await scripted_worker([too_long, raw_frame({"type": "ok"})])
        link = WorkerLink(Worker("w", "127.0.0.1", server.sockets[0].getsockname()[1], "", (0,)), Options())
        try:
            with pytest.raises(WorkerError) as e:
                await link.request(wire.Ping())
            reply, _ = await link.request(wire.Ping())
            return str(e.value), reply, link.generation
        finally:
            link.shutdown()
            server.close()

    message, reply, generation = asyncio.run(go())
    assert "'error.message' is longer than 256 characters" in message
    assert isinstance(reply, wire.Ok) and generation == 1  # the same connection answered
