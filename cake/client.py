"""The client side of one worker connection (the master's, and a relaying worker's to the next
worker): connect, handshake, requests, reconnect.

One connection per worker, shared by all its stages and sessions; requests may overlap on it. A request
that fails because the connection broke (worker killed, restarted, network blip) reconnects with backoff
for up to `retry_timeout` seconds and raises `SessionsLost`: the worker's KV caches are gone and the
caller replays. A worker that stays away raises a WorkerError naming it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from cake import auth, eventloop, streams, wire
from cake.layer_ranges import format_layers
from cake.seal import Seal
from cake.errors import CakeError, ProtocolError, WorkerError
from cake.topology import Worker

log = logging.getLogger("cake.master")

END_TIMEOUT = 5.0  # seconds a master waits for a worker to confirm it freed sessions
REVIVE_EVERY = 1.0  # seconds between the background attempts to reach a worker known to be down


class RelayFailed(CakeError):
    """A worker could not pass its output on to the next worker; the step goes through the master."""

    def __init__(self, message: str, pair: tuple[str, str]):
        super().__init__(message)
        self.pair = pair


class SessionsLost(Exception):
    """The worker no longer holds (part of) a session's KV cache; replay from `cached`."""

    def __init__(self, worker: str, cached: int = 0, timed_out: bool = False):
        super().__init__(worker)
        self.worker, self.cached, self.timed_out = worker, cached, timed_out


class RelayTimedOut(SessionsLost):
    """No worker of a relay chain answered in time: replay, with these (worker, next worker) pairs going
    through the master for a while, so a stuck relay cannot stall every retry and the next failure names
    the worker."""

    def __init__(self, worker: str, pairs: list[tuple[str, str]]):
        super().__init__(worker, timed_out=True)
        self.pairs = pairs


@dataclass
class Options:
    key: str | None = None
    connect_timeout: float = 10.0
    request_timeout: float = 300.0
    retry_timeout: float = 30.0
    max_frame: int = 1 << 31
    relay: bool = True  # consecutive workers pass hidden states to each other (see cake.worker)
    pipeline: str = "auto"  # a long prompt's chunks flow through the stages one behind another (Master)
    plan: wire.Assign | None = None  # the master's placement, for a worker that restarted without its layers
    supply: Callable | None = None  # gives a worker without model files its config and layers (cake.shipping)
    look: bool = False  # --check, --plan: connect to look, not to serve: a worker without model files gets the
    # config (so it measures a layer) but no layers, and may not hold the layers its entry lists yet


def discard(writer: asyncio.StreamWriter) -> None:
    """Close a connection that may have broken. A reset leaves its exception on the stream's closed-future
    too, which nobody awaits: awaited here, so asyncio does not print it ('Future exception was never
    retrieved', with a traceback, on a --check whose worker reset a handshake)."""
    writer.close()
    asyncio.ensure_future(writer.wait_closed()).add_done_callback(lambda t: t.cancelled() or t.exception())


class WorkerDown(WorkerError):
    """The worker stayed unreachable for --retry-timeout: requests through it fail at once with this, until
    a background reconnect finds it back (WorkerLink.down)."""


def answer_limit(info: wire.Info, most: int) -> int:
    """The largest frame this side reads from a worker: the answer to the largest request it may send
    there (info.max_rows rows of f32 hidden states, the widest dtype on the wire, and a header), at most
    `most`; `most` from a worker that does not say. A longer frame is refused before its payload is read."""
    if info.max_rows > 0 and info.hidden_size > 0:
        return min(most, info.max_rows * info.hidden_size * 4 + wire.FORWARD_OVERHEAD)
    return most


class LinkBroken(ConnectionError):
    """The connection under a request broke (or was closed) before its answer came."""


@dataclass
class Awaited:
    """The answer to forward `rid` awaited on one connection of a link (its `generation`): a relayed
    forward's answer may come on any link of its chain (cake.relay_chain)."""

    link: WorkerLink
    rid: int
    generation: int
    answer: asyncio.Future

    async def send(self, msg: wire.Message, tensor: torch.Tensor | None = None) -> None:
        """Send the request on the connection the answer is awaited on (LinkBroken if it is gone)."""
        await self.link.send(msg, tensor, self.generation)

    def forget(self) -> None:
        """Stop waiting: an answer that comes later is dropped."""
        if not self.answer.done():
            self.link.forget(self.rid, self.answer)

    async def reconnect(self, cause: BaseException) -> None:
        """That connection failed (`cause`): drop it, unless a newer one replaced it, and reconnect."""
        await self.link.recover(self.generation, cause)


class WorkerLink:
    """One connection to a worker. Requests are written one frame at a time and may overlap; a reader
    task hands each answer to its request: by id for forwards (a relayed forward's answer arrives on
    another link than the one it was sent on, and one from a chain given up on is dropped), in order
    for the rest."""

    # One id sequence for all links, so an answer can never match another link's request.
    ids = itertools.count(1)

    def __init__(self, worker: Worker, options: Options):
        self.worker = worker
        self.opt = options
        self.writer: asyncio.StreamWriter | None = None
        self.seal: Seal | None = None  # this connection's sealing of what it sends (with a cluster key)
        self.info: wire.Info | None = None
        self.generation = 0  # counts connections: a failure is recovered once per connection
        self._write = asyncio.Lock()
        self._connecting = asyncio.Lock()
        self._waiting: dict[int, asyncio.Future] = {}  # forward id -> its answer
        self._in_order: deque[asyncio.Future] = deque()  # answers without an id, in request order
        self._reading: asyncio.Task | None = None
        self._reported = 0  # the generation whose loss was logged
        self.closed = False  # shut down for good: nothing reconnects
        self.down: WorkerDown | None = None  # it stayed unreachable: requests fail at once until _revive reaches it
        self._reviving: asyncio.Task | None = None
        self.on_drop: Callable[[], None] | None = None  # called when an open connection is dropped
        if options.key:
            auth.stretch(options.key)  # once per process (a second or so), here rather than mid-connect

    @property
    def label(self) -> str:
        return f"worker '{self.worker.name}' at {self.worker.address}"

    @property
    def connected(self) -> bool:
        return self.writer is not None

    async def connect(self, timeout: float | None = None) -> None:
        """One attempt: open, handshake, check the worker serves what the topology says."""
        w = self.worker
        timeout = timeout or self.opt.connect_timeout
        try:
            reader, writer = await eventloop.wait_for(
                streams.open_connection(w.host, w.port, limit=1 << 20), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            # asyncio's strerror is "Connect call failed (address)": say what failed ("connection refused").
            reason = (os.strerror(e.errno).lower() if getattr(e, "errno", None) else
                      f"no answer within {timeout:.0f}s" if isinstance(e, asyncio.TimeoutError) else type(e).__name__)
            raise ConnectionError(reason) from None
        try:
            wire.tune_socket(writer)  # a ConnectionError when the worker reset it at once: another attempt follows
            info, seals = await eventloop.wait_for(self._handshake(reader, writer), timeout)
        except asyncio.TimeoutError:
            discard(writer)
            raise ConnectionError("no handshake reply (is the worker stuck?)") from None
        except BaseException:
            discard(writer)
            raise
        if info.fetches and self.opt.supply is not None:  # no model files there: the master supplies them first
            try:
                info = await self.opt.supply(self, reader, writer, seals, info)  # cake.shipping.Supplier
            except BaseException:
                writer.close()
                raise
        want = list(w.layers)
        if not info.placed and want and self.opt.plan is not None:
            try:  # a worker the master placed came back without its layers: tell it again
                await wire.write_message(writer, self.opt.plan, None, seals[0])
                info, _ = await eventloop.wait_for(wire.read_message(reader, self.opt.max_frame, seals[1]),
                                                   self.opt.request_timeout)
            except BaseException:
                writer.close()
                raise
            if not isinstance(info, wire.Info):
                writer.close()
                raise WorkerError(f"{self.label} refused its layers: {getattr(info, 'message', info)}")
        # Looking, a worker the master places may serve an earlier plan's layers, and one without model
        # files may not hold its layers yet.
        if info.layers != want and not (self.opt.look and (info.fetches or not w.placed)):
            writer.close()
            raise WorkerError(
                f"{self.label} serves layers {format_layers(info.layers)} but the topology gives it {format_layers(want)}; "
                f"start it with the same topology file")
        self.writer, self.info = writer, info  # the reader belongs to the read loop
        self.seal, opener = seals
        self.generation += 1
        self._reading = asyncio.ensure_future(self._read_loop(reader, self.generation, opener,
                                                              answer_limit(info, self.opt.max_frame)))

    async def _read_loop(self, reader: asyncio.StreamReader, generation: int, opener: Seal | None,
                         limit: int) -> None:
        try:
            while True:
                try:
                    reply, out = await wire.read_message(reader, limit, opener)
                except wire.FrameError as e:  # a broken (or, sealed, tampered-with) frame: the link is done for
                    log.warning("%s sent a broken frame: %s; dropping the connection", self.label, e)
                    raise
                except ProtocolError as e:  # framed intact but unreadable: its request fails, the link goes on
                    log.warning("%s sent an answer that breaks the protocol: %s", self.label, e)
                    waiter = self._waiter(e.request_id)
                    if waiter is not None and not waiter.done():
                        waiter.set_exception(WorkerError(f"{self.label} sent an answer this master cannot read "
                                                         f"({e}); run the same cake version on every node"))
                    continue
                if isinstance(reply, wire.Error) and reply.code == "bad_frame":  # the close follows
                    log.warning("%s: %s", self.label, reply.message)
                    continue
                rid = getattr(reply, "id", 0)
                waiter = self._waiter(rid)
                if waiter is None:
                    log.debug("%s: dropped an answer nobody waits for (%s %d)", self.label, reply.TYPE, rid)
                elif not waiter.done():
                    waiter.set_result((reply, out))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # EOF, a reset, a broken frame: the connection is done for
            if not isinstance(e, (ConnectionError, asyncio.IncompleteReadError, ProtocolError, OSError)):
                log.exception("%s: reading answers failed", self.label)
            if generation == self.generation:
                self._drop(LinkBroken(f"{type(e).__name__}: {e}"))

    def _waiter(self, rid: int) -> asyncio.Future | None:
        """Who an answer is for: the forward with its id, else the oldest request without one."""
        if rid:
            return self._waiting.pop(rid, None)
        return self._in_order.popleft() if self._in_order else None

    def _drop(self, cause: BaseException) -> None:
        """Close the connection; every request waiting on it gets `cause`."""
        if self.writer is not None and self.on_drop is not None:
            self.on_drop()
        waiters = [*self._waiting.values(), *self._in_order]
        self._waiting.clear()
        self._in_order.clear()
        for w in waiters:
            if not w.done():
                w.set_exception(cause)
                w.exception()  # a waiter that was given up on must not warn "never retrieved"
        if self._reading is not None and self._reading is not asyncio.current_task():
            self._reading.cancel()
        self._reading = None
        if self.writer is not None:
            discard(self.writer)
        self.writer, self.seal = None, None

    async def _handshake(self, reader, writer) -> tuple[wire.Info, tuple[Seal | None, Seal | None]]:
        """Hello, proofs, then the worker's info: sealed, with everything after, when there is a key.
        Returns the info and (the seal of what this side sends, the one of what it receives)."""
        mine = auth.nonce()
        seals: tuple[Seal | None, Seal | None] = (None, None)
        await wire.write_message(writer, wire.Hello(wire.PROTOCOL, wire.VERSION, mine))
        try:
            msg = await self._expect(reader, wire.Welcome)
            if msg.auth:
                if not self.opt.key:
                    raise WorkerError(f"{self.label} requires a cluster key; pass --cluster-key or set "
                                      f"{auth.ENV_KEY}")
                secret = auth.stretch(self.opt.key)
                # This side proves first; a worker that refuses it answers error{auth} (a WorkerError here).
                await wire.write_message(writer, wire.Auth(auth.proof(secret, "client", mine, msg.nonce)))
                theirs = await self._expect(reader, wire.Auth)
                if not auth.verify(secret, "worker", mine, msg.nonce, theirs.proof):
                    raise WorkerError(f"{self.label} does not know our cluster key; give every node the "
                                      f"same --cluster-key")
                out, back = auth.link_keys(secret, mine, msg.nonce)
                seals = (Seal(out), Seal(back))
            elif self.opt.key:
                # It cannot prove it knows the key, so it could be anyone: hidden states carry the prompt.
                raise WorkerError(f"{self.label} runs without a cluster key, so it cannot prove who it is; "
                                  f"start it with the same --cluster-key")
            return await self._expect(reader, wire.Info, seals[1]), seals
        except asyncio.IncompleteReadError:  # closed on us: restarting, or shedding a flood; try again
            raise ConnectionError("closed the connection during the handshake") from None
        except ProtocolError as e:
            raise WorkerError(f"{self.label} broke the handshake ({type(e).__name__}); is it a cake worker "
                              f"of the same version?") from None

    async def _expect(self, reader, cls, opener: Seal | None = None):
        try:
            msg, _ = await wire.read_message(reader, wire.MAX_HEADER + 8, opener)
        except wire.FrameError as e:
            if opener is None:
                raise
            raise ConnectionError(f"its first sealed frame was broken on the way ({e})") from None
        if isinstance(msg, wire.Error):
            raise WorkerError(f"{self.label}: {msg.message}")
        if not isinstance(msg, cls):
            raise ProtocolError(f"expected {cls.TYPE}, got {msg.TYPE}")
        return msg

    async def ensure_connected(self, deadline: float | None = None) -> None:
        """Connect, retrying with backoff until `deadline` (monotonic); WorkerError after it."""
        if self.closed:
            raise WorkerError(f"{self.label}: the connection was shut down")
        if self.writer is not None:
            return
        if self.down is not None:
            raise WorkerDown(str(self.down))
        async with self._connecting:  # one connection, however many requests are waiting for it
            if self.writer is not None:
                return
            if self.down is not None:  # known while this request waited for the lock
                raise WorkerDown(str(self.down))
            try:
                await self._connect_until(deadline)
            except WorkerDown as e:
                if self.generation:  # it was up once (a server goes on): at start-up the master just fails
                    self._went_down(e)
                raise

    def _went_down(self, e: WorkerDown) -> None:
        """It stayed away for the whole --retry-timeout: from now on requests fail at once (a 503 naming it,
        not another wait each), while a background task tries to reach it again."""
        self.down = e
        log.warning("%s is down: requests through it fail at once until it is back (trying again every %gs)",
                    self.label, REVIVE_EVERY)
        if self._reviving is None or self._reviving.done():
            self._reviving = asyncio.ensure_future(self._revive())

    async def _revive(self) -> None:
        while not self.closed and self.writer is None:
            await asyncio.sleep(REVIVE_EVERY)
            async with self._connecting:
                if self.closed or self.writer is not None:
                    break
                try:
                    await self.connect()
                except (ConnectionError, WorkerError) as e:  # still away, or not yet right: keep trying
                    log.debug("%s: still down (%s)", self.label, e)
        if self.writer is not None:
            self.down = None
            log.warning("%s is back; requests go through it again", self.label)

    async def connect_once(self) -> None:
        """Connect if not connected, in one attempt (ConnectionError or WorkerError when it fails)."""
        async with self._connecting:
            if self.writer is None:
                await self.connect()

    async def _connect_until(self, deadline: float | None) -> None:
        deadline = deadline or time.monotonic() + self.opt.retry_timeout
        delay, reason = 0.1, ""
        while True:
            try:
                # Never let one attempt run far past the deadline (a stuck worker accepts but never answers).
                await self.connect(max(0.5, min(self.opt.connect_timeout, deadline - time.monotonic())))
                return
            except ConnectionError as e:
                if not reason and self.generation == 0:  # at start-up: say what is awaited, not 30 s of silence
                    log.warning("%s: %s; retrying for up to %.0fs (is it started, at that address?)", self.label, e,
                                max(0.0, deadline - time.monotonic()))
                reason = str(e)
            if time.monotonic() + delay > deadline:
                raise WorkerDown(f"{self.label} is unreachable ({reason}) after {self.opt.retry_timeout:g}s; "
                                  f"start it, or check its address in the topology file")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def close(self) -> None:
        """Drop this connection; the next request reconnects."""
        self._drop(LinkBroken("closed"))

    def shutdown(self) -> None:
        """Drop this connection for good: requests in flight fail instead of reconnecting."""
        self.closed = True
        if self._reviving is not None:
            self._reviving.cancel()
        self._drop(LinkBroken("shut down"))

    def expect(self, rid: int) -> asyncio.Future:
        """Register for the answer to forward `rid` before sending it (on another link too, for a relay
        chain). On a link that is down the answer will never come: the waiter fails at once."""
        waiter = asyncio.get_running_loop().create_future()
        if self.writer is None:
            waiter.set_exception(LinkBroken("not connected"))
            waiter.exception()
        else:
            self._waiting[rid] = waiter
        return waiter

    def awaiting(self, rid: int) -> Awaited:
        """expect(rid), remembering the connection it was registered on."""
        return Awaited(self, rid, self.generation, self.expect(rid))

    def forget(self, rid: int, waiter: asyncio.Future) -> None:
        """Stop waiting: a late answer with this id is dropped. (One without an id keeps its place in
        the order, so the answers after it still reach their requests.)"""
        if rid and self._waiting.get(rid) is waiter:
            del self._waiting[rid]
        waiter.cancel()

    async def send(self, msg: wire.Message, tensor: torch.Tensor | None = None,
                   generation: int | None = None) -> asyncio.Future | None:
        """Write one frame (whole: writes are queued synchronously, so a cancelled caller cannot cut it),
        on connection `generation` if given. A request without an id gets its place in the order of
        answers here, under the write lock, so only frames really written hold a place; its waiter is
        returned."""
        async with self._write:
            if self.writer is None or generation not in (None, self.generation):
                raise LinkBroken("not connected")
            waiter = None
            if not getattr(msg, "id", 0):
                waiter = asyncio.get_running_loop().create_future()
                self._in_order.append(waiter)
            await wire.write_message(self.writer, msg, tensor, self.seal)
            return waiter

    async def request(self, msg: wire.Message, tensor: torch.Tensor | None = None
                      ) -> tuple[wire.Message, torch.Tensor | None]:
        """Send one request, return its answer. A broken connection reconnects and raises SessionsLost;
        an error answer raises the matching exception."""
        await self.ensure_connected()
        rid, generation = getattr(msg, "id", 0), self.generation
        waiter = self.expect(rid) if rid else None
        try:
            waiter = await self.send(msg, tensor, generation) or waiter
            reply, out = await eventloop.wait_for(waiter, self.opt.request_timeout)  # never loses a cancel
        except (ConnectionError, asyncio.TimeoutError, ProtocolError) as e:
            if waiter is not None:
                self.forget(rid, waiter)
            await self.recover(generation, e)
            raise SessionsLost(self.worker.name, timed_out=isinstance(e, asyncio.TimeoutError)) from None
        except BaseException:
            if waiter is not None:
                self.forget(rid, waiter)  # cancelled: the answer, when it comes, is dropped
            raise
        self.raise_for_error(reply)
        return reply, out

    def raise_for_error(self, reply: wire.Message, next_worker: str = "") -> None:
        if isinstance(reply, wire.Error):
            if reply.code == "cache_behind":
                raise SessionsLost(self.worker.name, reply.cached)
            if reply.code == "relay" and next_worker:
                raise RelayFailed(f"{self.label} {reply.message}", (self.worker.name, next_worker))
            if reply.code == "relay_lost":  # the next worker may have lost these sessions: replay
                raise SessionsLost(reply.peer or next_worker or self.worker.name)
            raise WorkerError(f"{self.label}: {reply.message}")

    async def recover(self, generation: int, cause: BaseException) -> None:
        """After a request on connection `generation` failed: drop that connection (unless another
        request already did) and reconnect, for up to --retry-timeout."""
        if self.closed:
            raise WorkerError(f"{self.label}: the connection was shut down")
        report = generation == self.generation and self._reported != generation
        if report:
            self._reported = generation
            what = "timed out" if isinstance(cause, asyncio.TimeoutError) else "connection lost"
            log.warning("%s: %s; reconnecting for up to %gs", self.label, what, self.opt.retry_timeout)
        if generation == self.generation and self.writer is not None:
            self._drop(LinkBroken(f"{type(cause).__name__}"))
        t0 = time.monotonic()
        await self.ensure_connected(t0 + self.opt.retry_timeout)
        if report:
            log.warning("%s is back after %.1fs; replaying lost sessions", self.label, time.monotonic() - t0)

    async def forward(self, start: int, end: int, sessions: list[str], positions: list[int],
                      hidden: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Run layers [start, end) on the worker: the hidden states out, and the worker's compute seconds."""
        msg = wire.Forward(next(self.ids), start, end, sessions, positions)
        reply, out = await self.request(msg, hidden)
        if not isinstance(reply, wire.Result) or out is None or out.shape != hidden.shape:
            self.close()
            raise WorkerError(f"{self.label} answered a forward with a malformed result; restart it")
        return out, reply.compute_us / 1e6

    async def end(self, sessions: list[str]) -> None:
        """Free sessions on the worker; best effort (a dead worker has freed them already, and a stuck one
        must not hold up the end of an answer for --request-timeout: its next request finds it stuck)."""
        if self.writer is None or not sessions:
            return
        try:
            await eventloop.wait_for(self.request(wire.End(sessions)), min(END_TIMEOUT, self.opt.request_timeout))
        except (CakeError, SessionsLost, asyncio.TimeoutError):
            pass
