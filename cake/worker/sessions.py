"""A worker's sessions: a KV cache per (connection, session), under a byte budget, evicted when a new
one needs room; and the `end`s that wait for the forwards still using a session."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from cake.model.kv_cache import KVCache
from cake.model.stack import LayerStack
from cake.worker.errors import RequestError

log = logging.getLogger("cake.worker")

Key = tuple[int, str]  # (connection id, session id): a session belongs to the connection that made it


@dataclass
class SessionEntry:
    cache: KVCache
    conn: int
    last_used: float


@dataclass
class InUse:
    """The sessions a computation in steps holds: one ended meanwhile is freed after it (never under it);
    once all are ended, the computation stops at its next step."""

    ended: set[Key] = field(default_factory=set)


class SessionStore:
    """The caches come from `stack` (the layers the worker serves now) and go back to it when freed."""

    def __init__(self, stack: LayerStack | None, budget: int):
        self.stack = stack
        self.budget = budget
        self.sessions: OrderedDict[Key, SessionEntry] = OrderedDict()  # least recently used first
        self.in_use: dict[Key, InUse] = {}  # sessions of the computation in steps, if any
        self.waiting: Counter[Key] = Counter()  # sessions of queued forwards (Scheduler.queue)
        self.ended_waiting: set[Key] = set()  # of those, ended meanwhile: they make no cache

    def cache(self, conn: int, session: str, pos: int, start: int, end: int, batch: set[Key] = frozenset()) -> KVCache:
        """The cache of a session a forward runs at `pos` through layers [start, end): made at position 0
        (room made first), else refused `cache_behind` when it holds fewer positions than `pos`."""
        key = (conn, session)
        entry = self.sessions.get(key)
        if entry is None:
            if pos != 0:
                raise RequestError("cache_behind", f"session {session} is not cached here (worker restarted or "
                                                   f"evicted it); replay from position 0", cached=0)
            if not self.stack.spares:  # else new_cache reuses an ended session's, already counted
                self.make_room(self.stack.new_cache_bytes(), batch)
            entry = SessionEntry(self.stack.new_cache(), conn, 0.0)
            self.sessions[key] = entry
        cached = min(entry.cache.lengths[entry.cache.slot[i]] for i in range(start, end))
        if pos > cached:
            raise RequestError("cache_behind", f"session {session} has {cached} cached positions, request starts "
                                               f"at {pos}; replay from {cached}", cached=cached)
        entry.last_used = time.monotonic()
        self.sessions.move_to_end(key)
        return entry.cache

    def make_room(self, need: int, batch: set[Key] = frozenset()) -> None:
        """Evict sessions until a new cache fits the budget (the caches kept for reuse count: they hold
        memory). Idle sessions go first: the least recently used of the connection that holds the most
        caches, so one master (or a hostile client) opening many sessions evicts its own before another
        master's. Sessions of the request being served (`batch`) go last, and their caches are never kept
        for reuse: their rows still use them in this step (the master replays such a session on its next
        step)."""
        if need > self.budget:
            raise RequestError("memory", f"one session needs {need / (1 << 20):.2f} MiB of KV cache, over this "
                                         f"worker's budget of {self.budget / (1 << 20):.2f} MiB; raise "
                                         f"--kv-budget or lower --context")
        used = sum(e.cache.nbytes for e in self.sessions.values()) + sum(c.nbytes for c in self.stack.spares)
        while used + need > self.budget and self.sessions:
            idle = [k for k in self.sessions if k not in batch]  # least recently used first
            if idle:
                held = Counter(conn for conn, _ in self.sessions)
                key = min(idle, key=lambda k: -held[k[0]])  # the first (LRU) of the heaviest connection's
            else:
                key = next(iter(self.sessions))
            used -= self.sessions[key].cache.nbytes
            if key in batch:
                self.stack.discard(self.sessions.pop(key).cache)
                log.info("evicted session %s (of the batch being served) to stay under the KV budget", key[1])
            else:
                self.end_session(key)  # its cache is kept as a spare (new_cache takes it) or freed
                log.info("evicted idle session %s to stay under the KV budget", key[1])

    def free_connection(self, conn: int) -> int:
        """A connection closed: its sessions go. How many it held."""
        return sum(self.end_session(k) for k in [k for k in self.sessions if k[0] == conn])

    def free_all(self) -> None:
        """The worker takes other layers: every session goes."""
        for key in list(self.sessions):
            self.end_session(key)

    def held_by_others(self, conn: int) -> bool:
        return any(c != conn for c, _ in self.sessions)

    def end(self, conn: int, session: str) -> bool:
        """The master ends a session. One with a forward still queued is ended after that forward (which
        is refused if all its sessions were ended): the master may end a session of a batch in flight,
        and the batch's other sessions must still get their answer. (An eviction, by contrast, frees the
        cache at once, and the queued forward finds none: its master replays.)"""
        key = (conn, session)
        if key not in self.waiting:
            return self.end_session(key)
        self.ended_waiting.add(key)
        held = key in self.sessions
        if key in self.in_use:  # computing now: it stops once all its sessions are ended (end_session)
            self.end_session(key)
        return held

    def end_session(self, key: Key) -> bool:
        """Forget a session; its cache goes back to the stack (kept for another session, or freed). One
        that a prompt computes with is freed when that stops, at its next step."""
        use = self.in_use.get(key)
        if use is not None:
            use.ended.add(key)
            return key in self.sessions
        entry = self.sessions.pop(key, None)
        if entry is not None:
            self.stack.release(entry.cache)
        return entry is not None

    # ---- sessions of forwards not yet computed ------------------------------------------------------

    def busy(self, key: Key) -> bool:
        """Whether a forward of this session computes in steps now, or waits to."""
        return key in self.in_use or key in self.waiting

    def wait(self, keys: set[Key]) -> None:
        """A forward of these sessions is queued: an `end` for them waits for it (see end)."""
        self.waiting.update(keys)

    def unwait(self, keys: set[Key]) -> None:
        """A queued forward has computed, or never will: a session of it ended meanwhile (and not waited on
        by another forward) is freed now."""
        self.waiting.subtract(keys)
        for k in keys:
            if self.waiting[k] <= 0:
                del self.waiting[k]
                if k in self.ended_waiting:
                    self.ended_waiting.discard(k)
                    self.end_session(k)

    @contextlib.contextmanager
    def using(self, keys: set[Key]) -> Iterator[InUse]:
        """While a computation in steps uses these sessions: ending one marks it, and it is freed after."""
        use = InUse()
        for k in keys:
            self.in_use[k] = use
        try:
            yield use
        finally:
            for k in keys:
                del self.in_use[k]
            for k in use.ended:
                self.end_session(k)
