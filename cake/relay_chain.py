"""Consecutive remote stages on distinct workers run as one relayed request: the master sends the hidden
states to the first worker, each worker passes its output straight on to the next, and the last answers
the master. Per token that is one message per worker plus one, instead of two per worker."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import torch

from cake import wire
from cake.client import Awaited, RelayTimedOut, SessionsLost, WorkerLink
from cake.errors import WorkerError

if TYPE_CHECKING:
    from cake.master import RemoteStage


class RelayChain:
    """A worker that cannot do its part answers with an error carrying the forward's id instead (and
    nothing goes further), so the master waits on every link of the chain for that id."""

    def __init__(self, stages: list[RemoteStage]):
        self.stages = stages

    @property
    def pairs(self) -> list[tuple[str, str]]:
        names = [st.link.worker.name for st in self.stages]
        return list(zip(names, names[1:]))

    async def forward(self, sessions: list[str], positions: list[int], hidden: torch.Tensor) -> torch.Tensor:
        links = [st.link for st in self.stages]
        for _ in range(3):  # connecting one link takes time, in which another may drop
            for link in links:
                await link.ensure_connected()
            if all(link.connected for link in links):
                break
        first, rest = self.stages[0], self.stages[1:]
        msg = wire.Forward(next(WorkerLink.ids), first.stage.start, first.stage.end, sessions, positions,
                           [st.link.worker.name for st in rest], [st.stage.start for st in rest],
                           [st.stage.end for st in rest], [st.link.info.conn for st in rest])
        answers = [link.awaiting(msg.id) for link in links]
        t0 = time.perf_counter()
        try:
            await answers[0].send(msg, hidden)
            # Each hop gets the whole timeout: a long prompt takes its time on every worker.
            await asyncio.wait([a.answer for a in answers], timeout=first.link.opt.request_timeout * len(links),
                               return_when=asyncio.FIRST_COMPLETED)
        except ConnectionError as e:  # the send failed: nothing reached anyone
            self._forget(answers)
            await answers[0].reconnect(e)
            raise SessionsLost(first.link.worker.name) from None
        except BaseException:  # cancelled: answers that still come are dropped by id
            self._forget(answers)
            raise
        answered = [i for i, a in enumerate(answers) if a.answer.done()]
        self._forget(answers)
        if not answered:  # nobody answered in time and it is not known who is stuck: start afresh
            for a in answers:
                await a.reconnect(asyncio.TimeoutError())
            raise RelayTimedOut(links[-1].worker.name, self.pairs)
        i = answered[0]
        if answers[i].answer.exception() is not None:  # that connection broke (a late answer after it is dropped)
            await answers[i].reconnect(answers[i].answer.exception())
            raise SessionsLost(links[i].worker.name)
        reply, out = answers[i].answer.result()
        last = i == len(links) - 1
        links[i].raise_for_error(reply, "" if last else links[i + 1].worker.name)  # nothing went further
        if not last or not isinstance(reply, wire.Result) or out is None or out.shape != hidden.shape \
                or len(reply.upstream_us) != i:
            links[i].close()
            raise WorkerError(f"{links[i].label} answered a relayed forward with a malformed "
                              f"'{reply.TYPE}'; restart it")
        computes = [us / 1e6 for us in (*reply.upstream_us, reply.compute_us)]
        # One wall time for the chain: each stage gets its own compute and an equal share of the rest.
        share = max(0.0, time.perf_counter() - t0 - sum(computes)) / len(computes)
        for st, c in zip(self.stages, computes):
            st.stats.add(c + share, c, hidden.shape[1])
        return out

    @staticmethod
    def _forget(answers: list[Awaited]) -> None:
        for a in answers:
            a.forget()
