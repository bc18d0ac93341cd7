"""One client connection of a worker: a master's, or a relaying worker's. Answers reach it from its own
task and, for forwards relayed by other workers, from theirs."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import torch

from cake import wire
from cake.seal import Seal

log = logging.getLogger("cake.worker")

MAX_PENDING_ANSWERS = 64  # relayed answers queued for one connection that does not read them: then it is closed


@dataclass
class Conn:
    """One client connection: its id (the key of its sessions), the token a relayed forward names it
    by, and a write lock (relayed answers arrive from other connections' tasks)."""

    id: int
    token: str
    writer: asyncio.StreamWriter
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: int = 0  # answers from relaying workers' connections waiting to be written here
    closed: bool = False  # its sessions were freed: nothing may create new ones for it
    queued: set[asyncio.Task] = field(default_factory=set)  # forwards read here that run on tasks (Scheduler)
    seal: Seal | None = None  # with a cluster key: the sealing of what this side sends (set by the handshake)
    last_read: float = field(default_factory=time.monotonic)  # when its last frame came (see Worker._close_idle)
    answering: set[asyncio.Task] = field(default_factory=set)  # answer_later's tasks, held until written

    async def send(self, msg: wire.Message, tensor: torch.Tensor | None = None) -> None:
        async with self.lock:
            await wire.write_message(self.writer, msg, tensor, self.seal)

    def answer_later(self, reply: wire.Message, out: torch.Tensor | None) -> None:
        """An answer from another connection's task (a relaying worker's): sent on its own task, so a slow
        master does not hold up the relays to this worker for everyone else (the lock keeps the order). A
        connection that lets answers pile up unread is closed: its master is gone or hostile, and each
        answer holds its hidden states."""
        if self.closed:  # its master has gone: nobody to answer
            return
        if self.pending >= MAX_PENDING_ANSWERS:
            log.warning("closed a connection that left %d relayed answers unread", self.pending)
            self.writer.close()
            return
        self.pending += 1
        task = asyncio.ensure_future(self._answer(reply, out))
        self.answering.add(task)
        task.add_done_callback(self.answering.discard)

    async def _answer(self, reply: wire.Message, out: torch.Tensor | None) -> None:
        try:
            await self.send(reply, out)
        except (ConnectionError, OSError) as e:  # that master's connection broke; its own task cleans up
            log.warning("could not answer a relayed forward: %s", e)
        finally:
            self.pending -= 1
