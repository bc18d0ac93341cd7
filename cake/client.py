"""The master's side of one worker connection: connect, handshake, requests, reconnect.

One connection per worker, shared by all its stages and sessions. A request that fails because the
connection broke (worker killed, restarted, network blip) reconnects with backoff for up to
`retry_timeout` seconds and raises `SessionsLost`: the worker's KV caches are gone and the caller
replays. A worker that stays away raises a WorkerError naming it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass

import torch

from cake import auth, wire
from cake.errors import CakeError, ProtocolError, WorkerError
from cake.topology import Worker, format_layers

log = logging.getLogger("cake.master")


class RelayFailed(CakeError):
    """A worker could not pass its output on to the next worker; the step goes through the master."""

    def __init__(self, message: str, pair: tuple[str, str]):
        super().__init__(message)
        self.pair = pair


class SessionsLost(Exception):
    """The worker no longer holds (part of) a session's KV cache; replay from `cached`."""

    def __init__(self, worker: str, cached: int = 0):
        super().__init__(worker)
        self.worker, self.cached = worker, cached


@dataclass
class Options:
    key: str | None = None
    connect_timeout: float = 10.0
    request_timeout: float = 300.0
    retry_timeout: float = 30.0
    max_frame: int = 1 << 31
    relay: bool = True  # consecutive workers pass hidden states to each other (see cake.worker)


def stale(reply: wire.Message, want_id: int) -> bool:
    """An answer to another forward than the one awaited (one a relay chain gave up on)."""
    rid = getattr(reply, "id", 0)
    if rid and rid != want_id:
        log.debug("dropped a late answer to forward %d", rid)
        return True
    return False


class WorkerLink:
    # One id sequence for all links: a relayed forward's answer arrives on another link than the one
    # it was sent on, and an answer that comes too late (from a chain that was given up) must never
    # match another request's id.
    ids = itertools.count(1)

    def __init__(self, worker: Worker, options: Options):
        self.worker = worker
        self.opt = options
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.info: wire.Info | None = None
        self.lock = asyncio.Lock()
        # The read of the next reply, once started: a relay chain waits on several links at once and
        # leaves the reads it did not need running, to serve the next request on their links.
        self._read: asyncio.Task | None = None

    @property
    def label(self) -> str:
        return f"worker '{self.worker.name}' at {self.worker.address}"

    async def connect(self, timeout: float | None = None) -> None:
        """One attempt: open, handshake, check the worker serves what the topology says."""
        w = self.worker
        timeout = timeout or self.opt.connect_timeout
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(w.host, w.port, limit=1 << 20), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise ConnectionError(f"cannot connect: {getattr(e, 'strerror', None) or type(e).__name__}") from None
        wire.tune_socket(writer)
        try:
            info = await asyncio.wait_for(self._handshake(reader, writer), timeout)
        except asyncio.TimeoutError:
            writer.close()
            raise ConnectionError("no handshake reply (is the worker stuck?)") from None
        except BaseException:
            writer.close()
            raise
        want = list(w.layers)
        if info.layers != want:
            writer.close()
            raise WorkerError(
                f"{self.label} serves layers {format_layers(info.layers)} but the topology gives it {format_layers(want)}; "
                f"start it with the same topology file")
        self.reader, self.writer, self.info = reader, writer, info

    async def _handshake(self, reader, writer) -> wire.Info:
        mine = auth.nonce()
        await wire.write_message(writer, wire.Hello(wire.PROTOCOL, wire.VERSION, mine))
        try:
            msg = await self._expect(reader, wire.Welcome)
            if msg.auth:
                if not self.opt.key:
                    raise WorkerError(f"{self.label} requires a cluster key; pass --cluster-key or set "
                                      f"{auth.ENV_KEY}")
                if not auth.verify(self.opt.key, "worker", mine, msg.nonce, msg.proof):
                    raise WorkerError(f"{self.label} does not know our cluster key; give every node the "
                                      f"same --cluster-key")
                await wire.write_message(writer, wire.Auth(auth.proof(self.opt.key, "client", mine, msg.nonce)))
            elif self.opt.key:
                # It cannot prove it knows the key, so it could be anyone: hidden states carry the prompt.
                raise WorkerError(f"{self.label} runs without a cluster key, so it cannot prove who it is; "
                                  f"start it with the same --cluster-key")
            return await self._expect(reader, wire.Info)
        except (asyncio.IncompleteReadError, ProtocolError) as e:
            raise WorkerError(f"{self.label} broke the handshake ({type(e).__name__}); is it a cake worker "
                              f"of the same version?") from None

    async def _expect(self, reader, cls):
        msg, _ = await wire.read_message(reader, wire.MAX_HEADER + 8)
        if isinstance(msg, wire.Error):
            raise WorkerError(f"{self.label}: {msg.message}")
        if not isinstance(msg, cls):
            raise ProtocolError(f"expected {cls.TYPE}, got {msg.TYPE}")
        return msg

    async def ensure_connected(self, deadline: float | None = None) -> None:
        """Connect, retrying with backoff until `deadline` (monotonic); WorkerError after it."""
        if self.writer is not None:
            return
        deadline = deadline or time.monotonic() + self.opt.retry_timeout
        delay, reason = 0.1, ""
        while True:
            try:
                # Never let one attempt run far past the deadline (a stuck worker accepts but never answers).
                await self.connect(max(0.5, min(self.opt.connect_timeout, deadline - time.monotonic())))
                return
            except ConnectionError as e:
                reason = str(e)
            if time.monotonic() + delay > deadline:
                raise WorkerError(f"{self.label} is unreachable ({reason}) after {self.opt.retry_timeout:g}s; "
                                  f"start it, or check its address in the topology file")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def close(self) -> None:
        if self._read is not None:
            if self._read.done() and not self._read.cancelled():
                self._read.exception()  # seen: a dead connection's read needs no "never retrieved" warning
            self._read.cancel()
            self._read = None
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    def read_task(self) -> asyncio.Task:
        """The read of the next reply on this connection (started if need be)."""
        if self._read is None:
            self._read = asyncio.ensure_future(wire.read_message(self.reader, self.opt.max_frame))
        return self._read

    async def request(self, msg: wire.Message, tensor: torch.Tensor | None = None
                      ) -> tuple[wire.Message, torch.Tensor | None]:
        """Send one request, return its reply. A broken connection reconnects and raises SessionsLost."""
        async with self.lock:
            await self.ensure_connected()
            await self.send(msg, tensor)
            return await self.receive(getattr(msg, "id", 0))

    async def send(self, msg: wire.Message, tensor: torch.Tensor | None = None) -> None:
        """Write one request; the caller holds `lock` and is connected."""
        try:
            await wire.write_message(self.writer, msg, tensor)
        except (ConnectionError, asyncio.TimeoutError, ProtocolError) as e:
            await self._recover(e)
            raise SessionsLost(self.worker.name) from None
        except BaseException:
            self.close()  # cancelled mid-frame: the stream is unusable
            raise

    async def receive(self, want_id: int) -> tuple[wire.Message, torch.Tensor | None]:
        """Read the reply to request `want_id` (0: a request without an id), skipping late answers to
        forwards given up on; an error reply becomes the matching exception. The caller holds `lock`."""
        while True:
            reply, out = await self.receive_raw()
            if not stale(reply, want_id):
                break
        self.raise_for_error(reply)
        return reply, out

    async def receive_raw(self) -> tuple[wire.Message, torch.Tensor | None]:
        """Read one reply as it is; a broken connection reconnects and raises SessionsLost."""
        try:
            # shield: a timeout or a cancelled caller must not cut a frame in half; close() (below, or
            # in _recover) cancels the read with the connection.
            reply, out = await asyncio.wait_for(asyncio.shield(self.read_task()), self.opt.request_timeout)
            self._read = None
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, ProtocolError) as e:
            await self._recover(e)
            raise SessionsLost(self.worker.name) from None
        except BaseException:
            # Cancelled mid-request: the reply may still arrive and would be read as the answer to
            # the next request. Drop the connection; the next request reconnects and replays.
            self.close()
            raise
        return reply, out

    def raise_for_error(self, reply: wire.Message) -> None:
        if isinstance(reply, wire.Error):
            if reply.code == "cache_behind":
                raise SessionsLost(self.worker.name, reply.cached)
            if reply.code == "relay":
                raise RelayFailed(f"{self.label} {reply.message}", (self.worker.name, reply.peer))
            raise WorkerError(f"{self.label}: {reply.message}")

    async def _recover(self, cause: BaseException) -> None:
        what = "timed out" if isinstance(cause, asyncio.TimeoutError) else "connection lost"
        self.close()
        log.warning("%s: %s; reconnecting for up to %gs", self.label, what, self.opt.retry_timeout)
        t0 = time.monotonic()
        await self.ensure_connected(t0 + self.opt.retry_timeout)
        log.warning("%s is back after %.1fs; replaying lost sessions", self.label, time.monotonic() - t0)

    async def forward(self, start: int, end: int, sessions: list[str], positions: list[int],
                      hidden: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Run layers [start, end) on the worker: the hidden states out, and the worker's compute seconds."""
        msg = wire.Forward(next(self.ids), start, end, sessions, positions)
        reply, out = await self.request(msg, hidden)
        if not isinstance(reply, wire.Result) or reply.id != msg.id or out is None or out.shape != hidden.shape:
            self.close()
            raise WorkerError(f"{self.label} answered a forward with a malformed result; restart it")
        return out, reply.compute_us / 1e6

    async def end(self, sessions: list[str]) -> None:
        """Free sessions on the worker; best effort (a dead worker has freed them already)."""
        if self.writer is None or not sessions:
            return
        try:
            await self.request(wire.End(sessions))
        except (CakeError, SessionsLost):
            pass
