"""Relay: a forward can ask this worker to pass its output straight on to the next worker instead of
back to the master, which saves the master a round trip per worker per token. The next worker answers
on the master's own connection there, named by the token the master got in its `info`, so sessions and
KV caches stay the master connection's."""

from __future__ import annotations

import logging
from collections import Counter, deque

import torch

from cake import wire
from cake.client import Options, WorkerLink
from cake.errors import CakeError
from cake.topology import Worker as Entry
from cake.worker.connection import Conn
from cake.worker.errors import RequestError

log = logging.getLogger("cake.worker")

RELAYS_REMEMBERED = 8  # per next worker: the last forwards to tell their masters about if that connection breaks
RELAY_BACKLOG = 16  # forwards waiting to be passed on to one next worker; past it they fail over to the master


class Relay:
    """This worker's links to the next workers, opened on first use and shared by every master."""

    def __init__(self, name: str, key: str | None, conns: dict[str, Conn]):
        self.name = name  # this worker's
        self.key = key
        self.conns = conns  # the worker's client connections by token: where relay_lost goes
        self.peers: dict[str, WorkerLink] = {}  # by name
        # Per next worker: (forward id, master connection token) of the last forwards relayed to it.
        self._relayed: dict[str, deque[tuple[int, str]]] = {}
        self._relaying: Counter[str] = Counter()  # next worker -> forwards being passed on to it

    async def send(self, msg: wire.Forward, hops: list[tuple[str, int, int, str]], to: Entry, out: torch.Tensor,
                   us: int, master: str) -> None:
        """Send our output on to the next worker of the chain (`to`, hops[0]), which answers the master
        (connection token `master`) directly, or passes it on to the rest of `hops`."""
        (name, start, end, token), rest = hops[0], hops[1:]
        fwd = wire.Forward(msg.id, start, end, msg.sessions, msg.positions, [h[0] for h in rest],
                           [h[1] for h in rest], [h[2] for h in rest], [h[3] for h in rest], reply_conn=token,
                           upstream_us=[*msg.upstream_us, us])
        link = self.peers.get(name)
        if link is None:
            link = self.peers[name] = WorkerLink(to, Options(key=self.key, connect_timeout=5.0))
            link.on_drop = lambda: self.lost(name)
        if self._relaying[name] >= RELAY_BACKLOG:  # it is not reading them: the master carries these instead
            raise RequestError("relay", f"has {RELAY_BACKLOG} forwards waiting to be passed on to {link.label}, "
                                        f"which is not taking them", peer=name)
        self._relaying[name] += 1
        try:
            # The link's reader notices when the next worker goes away (a restart), so this reconnects
            # rather than writing into a dead socket.
            await link.connect_once()
            await link.send(fwd, out)
        except (ConnectionError, OSError, CakeError) as e:
            link.close()
            raise RequestError("relay", f"cannot pass hidden states on to {link.label} ({e})", peer=name) from None
        finally:
            self._relaying[name] -= 1
        self._relayed.setdefault(name, deque(maxlen=RELAYS_REMEMBERED)).append((msg.id, master))

    def lost(self, name: str) -> None:
        """The connection to worker `name` broke: the forwards relayed on it may never be answered (it
        refused one, or restarted and lost their sessions). Tell each one's master, which replays them,
        rather than leave it waiting for --request-timeout. One already answered is ignored there."""
        for rid, token in self._relayed.pop(name, ()):
            dest = self.conns.get(token)
            if dest is not None:
                dest.answer_later(wire.Error("relay_lost", f"worker '{self.name}' lost its connection to "
                                             f"'{name}' after relaying a forward to it", peer=name, id=rid), None)
