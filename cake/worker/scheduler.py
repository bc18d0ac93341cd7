"""What a worker computes when. A decode step of sessions it already caches runs at once, between two
steps of a prompt in progress; anything else (a prompt, a step that makes a new KV cache) waits for the
one compute lock, on a task of its own, so its connection goes on reading. A connection with too many
forwards waiting, or too many bytes of hidden states, waits before it is read again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import torch

from cake import eventloop, wire
from cake.model.kv_cache import Row
from cake.worker.connection import Conn
from cake.worker.errors import RequestError, gone
from cake.worker.sessions import Key, SessionStore

log = logging.getLogger("cake.worker")

MAX_QUEUED_FORWARDS = 16  # forwards of one connection on tasks (waiting for the compute lock, computing, answering)
QUEUED_BYTES = 1 << 30  # their hidden states, all connections together (at least one frame); past it a connection waits


class Scheduler:
    def __init__(self, store: SessionStore, queue_budget: int):
        self.store = store
        self.queue_budget = queue_budget  # bytes of hidden states of forwards not yet computed
        self._computing = asyncio.Lock()
        self.queued: dict[asyncio.Task, Conn] = {}  # every queued forward's task -> the connection it answers
        self.queued_bytes = 0
        self._computed: dict[asyncio.Task, Callable[[asyncio.Task], None]] = {}  # see queue
        self._freed = asyncio.Event()  # set whenever a queued forward frees its slot or its bytes
        self._aside_s = 0.0  # seconds of decode steps run between a prompt's steps (not the prompt's compute)

    def runs_now(self, dest: Conn, msg: wire.Forward, x: torch.Tensor | None) -> bool:
        """A decode step of sessions `dest` already holds, none of them computing or waiting to: it needs
        no new cache, so no lock, and it runs at once (between two steps of a prompt, if one is running)
        without overtaking an earlier forward of its sessions. Anything else (malformed ones too: they
        get their error in turn) waits for the compute lock."""
        return (x is not None and x.dim() == 3 and x.shape[1] == 1
                and all((k := (dest.id, s)) in self.store.sessions and not self.store.busy(k) for s in msg.sessions))

    async def queue(self, conn: Conn, dest: Conn, msg: wire.Forward, tensor: torch.Tensor | None,
                    serve: Callable[[], Awaitable[None]], peer: str) -> None:
        """Serve a forward (read on `conn`, answered on `dest`) on a task of its own. Its sessions count
        as waiting from now (an `end` for them must find them, see SessionStore.end). This connection
        waits first while it has MAX_QUEUED_FORWARDS on tasks (one answered here holds its place until
        the answer is written, so a master that does not read stops being read), or, for a master's own
        forward, while the hidden states of forwards not yet computed would pass queue_budget. A relayed
        forward (answered elsewhere, or passed on) frees its place once computed: two workers relaying to
        each other must never wait for each other to read (RELAY_BACKLOG and MAX_PENDING_ANSWERS bound
        what it holds after)."""
        keys = {(dest.id, s) for s in msg.sessions}
        size = tensor.nbytes if tensor is not None and dest is conn else 0
        early = dest is not conn or bool(msg.relay_workers)
        self.store.wait(keys)
        try:
            while len(conn.queued) >= MAX_QUEUED_FORWARDS or (
                    size and self.queued_bytes and self.queued_bytes + size > self.queue_budget):
                if self._freed.is_set():
                    self._freed = asyncio.Event()
                await self._freed.wait()
        except BaseException:  # this connection closed meanwhile
            self.store.unwait(keys)
            raise
        task = asyncio.ensure_future(self._serve_queued(serve, peer))
        conn.queued.add(task)
        self.queued[task] = dest
        self.queued_bytes += size

        def computed(t: asyncio.Task) -> None:  # once only; also for a task cancelled before it started
            if self.queued.pop(t, None) is not None:
                self.queued_bytes -= size
                self.store.unwait(keys)
                if early:
                    conn.queued.discard(t)
                self._freed.set()

        def done(t: asyncio.Task) -> None:
            self._computed.pop(t, computed)(t)
            if t in conn.queued:
                conn.queued.discard(t)
                self._freed.set()

        self._computed[task] = computed
        task.add_done_callback(done)

    @staticmethod
    async def _serve_queued(serve: Callable[[], Awaitable[None]], peer: str) -> None:
        try:
            await serve()
        except (ConnectionError, OSError) as e:  # the connection broke; its own task cleans up
            log.debug("could not answer %s: %s", peer, e)
        except Exception:
            log.exception("internal error serving %s", peer)

    def drop(self, conn: Conn) -> int:
        """`conn` closed: nobody is left to answer its queued forwards. They stop (a prompt at its next
        step) and free their hidden states; how many."""
        dropped = [t for t, dest in self.queued.items() if dest is conn and not t.done()]
        for task in dropped:
            task.cancel()
        return len(dropped)

    async def compute(self, dest: Conn, msg: wire.Forward, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Run a checked forward for `dest`'s sessions: the output, and the µs it computed (less the
        decode steps of other sessions run between its steps)."""
        stack = self.store.stack
        eventloop.note_rows(x.shape[0])  # busy-polling pays for one stream, not for batches
        # One computation in steps at a time (a prompt; the loop serves others in between). Caches are
        # made and evicted only under the lock, so none changes hands while a prompt uses it. A decode
        # step of cached sessions (runs_now) needs none: it runs whole, between two steps of a prompt.
        now = self.runs_now(dest, msg, x)
        batch = {(dest.id, s) for s in msg.sessions}  # never evicted to make room for each other
        async with contextlib.nullcontext() if now else self._locked(batch):
            if dest.closed:  # its master left while this waited (a relayed forward): no caches for the dead
                raise gone()
            rows = [Row(self.store.cache(dest.id, s, p, msg.start, msg.end, batch), p)
                    for s, p in zip(msg.sessions, msg.positions)]
            t0, aside = time.perf_counter(), self._aside_s
            if stack.device.type == "cpu" and not now:
                # A prompt runs in steps, serving pings, handshakes, relay connections and other sessions'
                # decode steps in between, and stops if the master it is for goes or ends its sessions.
                # (A GPU only queues kernels in a step: no point.)
                out = await self._in_steps(x, rows, msg, batch, dest)
            else:
                out = stack.forward(x, rows, msg.start, msg.end).cpu()  # also the sync, so compute_us is real
            spent = time.perf_counter() - t0
            us = int((spent - (self._aside_s - aside)) * 1e6)  # less the decode steps run in between
            if now:
                self._aside_s += spent
        task = asyncio.current_task()
        if task in self._computed:  # a queued forward: its slot goes before it relays or answers
            self._computed.pop(task)(task)
        return out, us

    @contextlib.asynccontextmanager
    async def _locked(self, keys: set[Key]):
        """Hold the compute lock. Sessions whose master sent `end` while this forward waited (see
        SessionStore.end) are freed when it is done; a forward all of whose sessions were ended is refused
        instead of computed: nobody wants its answer."""
        async with self._computing:
            ended = keys & self.store.ended_waiting  # the marks stay for any later forward of these (unwait)
            try:
                if ended == keys:
                    raise RequestError("gone", "the sessions of this forward were ended while it waited")
                yield
            finally:
                for k in ended:
                    self.store.end_session(k)

    async def _in_steps(self, x: torch.Tensor, rows: list[Row], msg: wire.Forward, keys: set[Key],
                        dest: Conn) -> torch.Tensor:
        with self.store.using(keys) as use:
            try:
                return await eventloop.run_steps(self.store.stack.forward_steps(x, rows, msg.start, msg.end),
                                                 lambda: dest.closed or use.ended == keys)
            except eventloop.Abandoned:
                if dest.closed:
                    raise gone() from None
                raise RequestError("gone", "the sessions of this forward were ended while it computed") from None
