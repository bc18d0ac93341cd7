"""asyncio streams whose large reads land straight in their destination.

asyncio's StreamReader takes each socket read as a new bytes object, appends it to its buffer, and a
reader copies it out again: three copies of every payload byte, in up to 256 KiB pieces, with reading
paused and resumed each time the buffer passes its limit. For a frame of weights or activations that is
most of a node's CPU (the worker's loop thread spent 2.1 ms per MB receiving shipped weights).
`DirectProtocol` is a StreamReaderProtocol that is also a BufferedProtocol: while `read_into` waits for
a large piece, the socket is read into that piece itself; otherwise into a scratch buffer whose bytes join
the StreamReader's buffer, so every other StreamReader call works as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import torch

DIRECT_MIN = 64 << 10  # a piece smaller than this goes through the buffer (one syscall may bring several)


class DirectProtocol(asyncio.StreamReaderProtocol, asyncio.BufferedProtocol):
    """A StreamReaderProtocol the transport reads into (BufferedProtocol): into `target` while read_into
    has one set, else into a scratch buffer fed to the StreamReader."""

    def __init__(self, reader: asyncio.StreamReader, connected: Callable | None = None):
        super().__init__(reader, connected)
        self._scratch = bytearray(64 << 10)
        self.target: memoryview | None = None
        self.filled = 0

    def get_buffer(self, sizehint: int) -> memoryview | bytearray:
        if self.target is not None and self.filled < len(self.target):
            return self.target[self.filled:]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self.target is not None and self.filled < len(self.target):
            self.filled += nbytes
            if (self.filled == len(self.target)) and (reader := self._stream_reader) is not None:
                reader._wakeup_waiter()  # only once full: each wake-up is a trip through the event loop
        else:
            self.data_received(memoryview(self._scratch)[:nbytes])  # StreamReader copies it into its buffer


async def read_into(reader: asyncio.StreamReader, out: bytearray | memoryview) -> None:
    """Fill `out` from the stream: buffered bytes are moved into it, and a large remainder is read from the
    socket straight into it when the connection is a DirectProtocol's. asyncio has no readinto; this uses
    the StreamReader's buffer as readexactly does, else falls back to readexactly."""
    if not (isinstance(getattr(reader, "_buffer", None), bytearray) and hasattr(reader, "_wait_for_data")):
        out[:] = await reader.readexactly(len(out))
        return
    transport = getattr(reader, "_transport", None)
    proto = transport.get_protocol() if transport is not None else None
    direct = proto if isinstance(proto, DirectProtocol) else None
    view, got = memoryview(out).cast("B"), 0
    while got < len(view):
        if reader._buffer:
            n = min(len(reader._buffer), len(view) - got)
            with memoryview(reader._buffer) as buffered:
                view[got:got + n] = buffered[:n]
            del reader._buffer[:n]
            got += n
            reader._maybe_resume_transport()
            continue
        if reader._exception is not None:
            raise reader._exception
        if reader._eof:
            raise asyncio.IncompleteReadError(bytes(view[:got]), len(view))
        if direct is None or len(view) - got < DIRECT_MIN or direct.target is not None:
            await reader._wait_for_data("read_into")
            continue
        direct.target, direct.filled = view[got:], 0
        try:
            await reader._wait_for_data("read_into")
        finally:
            got += direct.filled
            direct.target = None


async def start_server(connected: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                       host: str | None = None, port: int | None = None, *, limit: int, **kwargs) -> asyncio.Server:
    """asyncio.start_server, with DirectProtocol connections."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: DirectProtocol(asyncio.StreamReader(limit=limit, loop=loop), connected),
                                    host, port, **kwargs)


async def open_connection(host: str, port: int, *, limit: int,
                          **kwargs) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio.open_connection, with a DirectProtocol connection."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = DirectProtocol(reader)
    transport, _ = await loop.create_connection(lambda: protocol, host, port, **kwargs)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class Buffers:
    """Payload buffers of large frames, used again once given back: a fresh one costs the kernel a page
    fault and a zeroed page every 4 KiB as the socket fills it, a large share of a worker's CPU while it receives
    its weights (docs/benchmarks.md). Only a buffer whose holder is done with it may be given back."""

    SMALLEST = 1 << 20  # below this a fresh buffer is cheap

    def __init__(self, keep: int, largest: int):
        self.keep, self.largest = keep, largest  # buffers held at most while unused, and their largest size
        self._free: list[torch.Tensor] = []

    def take(self, size: int) -> torch.Tensor:
        """A u8 tensor of `size` bytes, contents undefined."""
        for i, t in enumerate(self._free):
            if t.numel() == size:
                return self._free.pop(i)
        return torch.empty(size, dtype=torch.uint8)

    def give(self, t: torch.Tensor) -> None:
        """Take back a buffer from take() (or any whole u8 tensor) that nothing reads or writes any more."""
        if t.dtype == torch.uint8 and self.SMALLEST <= t.numel() <= self.largest:
            self._free.append(t)
            del self._free[:-self.keep]  # the oldest go first

    def clear(self) -> None:
        self._free.clear()
