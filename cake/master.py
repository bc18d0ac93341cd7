"""The master: embedding, head, and the ordered stages that hidden states stream through.

A stage is a run of consecutive layers on one node; local stages and remote stages have the same
`forward(sessions, positions, hidden)` contract, so the step logic does not care where layers run.
The master keeps every session's token ids; when a worker loses a session's KV cache (it restarted,
the connection broke, it evicted the session) the step is replayed from the last position that every
stage still holds, and the user sees a pause, never a different answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cake import auth, eventloop, wire
from cake.client import Options, RelayFailed, RelayTimedOut, SessionsLost, WorkerLink
from cake.devices import compute_unit, machine_id
from cake.errors import CakeError, WorkerError
from cake.layer_ranges import format_layers
from cake.memory import gb
from cake.model.config import LlamaConfig, load_config
from cake.model.kv_cache import KVCache, Row
from cake.model.loader import choose_quantization, load_head, load_layers
from cake.model.quant import DEFAULT_GROUP
from cake.model.stack import LayerStack, chunk_spans
from cake.model.weights import WeightFiles
from cake.relay_chain import RelayChain
from cake.topology import Stage, Topology

log = logging.getLogger("cake.master")

MAX_REPLAYS = 20
MAX_TIMEOUTS = 2  # a step that times out again after a reconnect and a replay is not retried further
RELAY_RETRY_S = 30.0  # after a worker could not relay to the next: first wait before trying again
RELAY_RETRY_MAX_S = 3600.0
PIPELINE_CHUNK = 256  # tokens of a prompt per request when its chunks are pipelined (see Master._pipelined)
PIPELINE_CHOICES = ("auto", "on", "off")


@dataclass
class Session:
    id: str
    tokens: list[int] = field(default_factory=list)
    cached: int = 0  # positions whose keys/values every stage holds


class PositionLogits:
    """A step's logits at every new position of each session (for the log-probabilities of a prompt's own
    tokens), filled in as passes compute them: a replay fills in again what it runs again, and positions
    of earlier steps that a replay runs are left out."""

    def __init__(self, sessions: list[Session], n: int):
        self.first = {s.id: len(s.tokens) for s in sessions}  # taken before the step's tokens are added
        self.row = {s.id: i for i, s in enumerate(sessions)}
        self.n = n
        self.logits: torch.Tensor | None = None  # [B, n, vocab] float32

    def put(self, session: str, start: int, logits: torch.Tensor) -> None:
        """One session's logits [k, vocab] of positions start .. start + k - 1."""
        first = self.first[session]
        a, b = max(start, first), min(start + len(logits), first + self.n)
        if a >= b:
            return
        if self.logits is None:
            self.logits = logits.new_empty(len(self.row), self.n, logits.shape[-1])
        self.logits[self.row[session], a - first:b - first] = logits[a - start:b - start]


RECENT_STEPS = 64  # decode steps each stage remembers, for the cluster view (cake.cluster_view)
KV_BUDGET = 2 << 30  # bytes of KV cache the master's own layers keep (a worker's --kv-budget default)


@dataclass
class StageStats:
    calls: int = 0
    total_s: float = 0.0  # as the master saw it
    compute_s: float = 0.0  # of which the node computed; the rest is the network
    steps: int = 0  # decode steps (one token per session)
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))  # their (total_s, compute_s)

    def add(self, total_s: float, compute_s: float, tokens: int = 1) -> None:
        self.calls += 1
        self.total_s += total_s
        self.compute_s += compute_s
        if tokens == 1:
            self.steps += 1
            self.recent.append((total_s, compute_s))


async def compute(fn, *args, in_thread: bool = False, executor: ThreadPoolExecutor | None = None,
                  device: str = "cpu"):
    """Run local maths inline, or (`in_thread`, for servers) off the event loop so it keeps serving
    meanwhile: on `executor`, the one thread that serializes a CUDA master's maths (a CUDA graph capture
    must not meet this process's other GPU work), else on the loop's pool. Except on the CPU, which
    computes inline (see eventloop.run_steps for why not on a thread, and LocalStage for how a long
    prompt still leaves room for the loop)."""
    if not in_thread or device == "cpu":
        return fn(*args)
    with eventloop.no_spin():  # a busy-polling loop would contend for the GIL with the maths thread
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


def worker_hardware(host: str, info: wire.Info | None) -> tuple[str, str]:
    """What a worker computes on: (machine, compute unit), as it reports them in `info`; for one that does
    not say (an earlier version, or not reached yet), its host (loopback: this machine) and device."""
    if info is not None and info.machine and info.unit:
        return info.machine, info.unit
    return machine_id() if auth.is_loopback(host) else host, info.device if info is not None else "cpu"


def pipelines_long_prompts(choice: str, hardware: set[tuple[str, str]]) -> bool:
    """--pipeline `choice` for stages that compute on `hardware` ((machine, compute unit) each): on, or
    auto and more than one machine or GPU (on one machine's CPU the stages would only take turns on the
    same cores, which measured slower: docs/benchmarks.md, The cluster)."""
    return choice == "on" or (choice == "auto" and len(hardware) > 1)


def model_mismatch(info: wire.Info, config: LlamaConfig) -> str:
    """'' when a worker serves the master's model (by its family and shape), else what differs and the fix."""
    if info.arch and info.arch != config.arch:
        return (f"runs a {info.arch} model, the master a {config.arch} one; give every node the same model (a "
                f"bundle split from it)")
    if (info.hidden_size, info.num_layers) == (config.hidden_size, config.num_hidden_layers):
        return ""
    return (f"runs a different model (hidden {info.hidden_size}, {info.num_layers} layers) from the master's "
            f"(hidden {config.hidden_size}, {config.num_hidden_layers} layers); give every node the same model")


class LocalStage:
    def __init__(self, stage: Stage, stack: LayerStack, in_thread: bool = False,
                 executor: ThreadPoolExecutor | None = None):
        self.stage = stage
        self.stack = stack
        self.caches: OrderedDict[str, KVCache] = OrderedDict()  # least recently used first
        self.budget = KV_BUDGET
        self.stats = StageStats()
        self.in_thread = in_thread
        self.executor = executor

    async def forward(self, sessions: list[str], positions: list[int], hidden: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        if self.in_thread and self.stack.device.type == "cpu":  # a CPU server: a prompt in steps
            out = await eventloop.run_steps(self.stack.forward_steps(hidden, self._rows(sessions, positions),
                                                                     self.stage.start, self.stage.end))
        else:
            out = await compute(self._forward, sessions, positions, hidden, in_thread=self.in_thread,
                                executor=self.executor, device=self.stack.device.type)
        dt = time.perf_counter() - t0
        self.stats.add(dt, dt, hidden.shape[1])
        return out

    def _forward(self, sessions: list[str], positions: list[int], hidden: torch.Tensor) -> torch.Tensor:
        # New caches are allocated here too, on the maths thread with the rest of the GPU work.
        return self.stack.forward(hidden, self._rows(sessions, positions), self.stage.start, self.stage.end)

    def _rows(self, sessions: list[str], positions: list[int]) -> list[Row]:
        rows = []
        for s, p in zip(sessions, positions):
            cache = self.caches.get(s)
            if cache is None:
                if p != 0:
                    raise SessionsLost("master", 0)
                self._make_room(set(sessions))
                cache = self.caches[s] = self.stack.new_cache()
            self.caches.move_to_end(s)
            rows.append(Row(cache, p))
        return rows

    def _make_room(self, batch: set[str]) -> None:
        """Evict the least recently used sessions outside `batch` until a new cache fits the budget, as a
        worker does (an evicted session is replayed on its next step)."""
        if self.stack.spares:  # new_cache reuses a kept one: no more memory
            return
        need = self.stack.new_cache_bytes()
        used = sum(c.nbytes for c in self.caches.values())
        for s in [s for s in self.caches if s not in batch]:
            if used + need <= self.budget:
                break
            cache = self.caches.pop(s)
            used -= cache.nbytes
            self.stack.release(cache)
            log.info("evicted session %s from the master's layers to stay under their KV budget", s[:8])

    async def end(self, sessions: list[str]) -> None:
        caches = [c for c in (self.caches.pop(s, None) for s in sessions) if c is not None]
        if not caches:
            return
        try:
            # On the maths thread: a kept cache must not change hands, nor a batched graph be dropped,
            # in the middle of a step running there.
            await compute(self._release, caches, in_thread=self.in_thread, executor=self.executor,
                          device=self.stack.device.type)
        except RuntimeError:
            if self.executor is None:
                raise
            # The master was closed and its maths thread shut down: nothing will reuse these caches.

    def _release(self, caches: list[KVCache]) -> None:
        for cache in caches:
            self.stack.release(cache)


class RemoteStage:
    def __init__(self, stage: Stage, link: WorkerLink):
        self.stage = stage
        self.link = link
        self.stats = StageStats()

    async def forward(self, sessions: list[str], positions: list[int], hidden: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out, compute_s = await self.link.forward(self.stage.start, self.stage.end, sessions, positions, hidden)
        self.stats.add(time.perf_counter() - t0, compute_s, hidden.shape[1])
        return out

    async def end(self, sessions: list[str]) -> None:
        await self.link.end(sessions)


def quantization_said(info) -> str:
    """', int4 (group 32)' for a worker whose matrices are quantized ('' otherwise, or where it does not say)."""
    return f", {info.quantization}" if info.quantization not in ("", "none") else ""


class Master:
    def __init__(self, model_dir: str | Path, topology: Topology, device: str = "auto", dtype: str = "auto",
                 context: int | None = None, options: Options | None = None, compute_in_thread: bool = False,
                 quantize: str | None = None, group_size: int = DEFAULT_GROUP, max_memory: int | None = None):
        """`compute_in_thread` (for servers): keep the event loop serving while local maths runs. On a CUDA
        GPU all of it runs on one maths thread (on Metal, on the loop's pool); on a CPU it runs inline, a
        prompt's local layers in steps (LocalStage.forward)."""
        self.config: LlamaConfig = load_config(model_dir)
        self.compute_in_thread = compute_in_thread
        self.topology = topology
        plan = topology.stages(self.config.num_hidden_layers)
        local_layers = [i for s in plan if s.worker is None for i in range(s.start, s.end)]
        files = WeightFiles(model_dir)
        self.stack, _ = load_layers(model_dir, local_layers, device, dtype, context, self.config, files, quantize,
                                    group_size, max_memory, with_head=True)
        self.device, self.dtype = self.stack.device, self.stack.dtype
        self.capacity = self.stack.capacity
        self.quantization = choose_quantization(files, "model.embed_tokens.weight", quantize, group_size)
        self.head = load_head(model_dir, self.config, self.device, self.dtype, files, self.quantization)
        self._math = (ThreadPoolExecutor(1, thread_name_prefix="cake-math")
                      if compute_in_thread and self.device.type == "cuda" else None)
        self.options = options or Options()
        if self.options.pipeline not in PIPELINE_CHOICES:
            raise CakeError(f"pipeline '{self.options.pipeline}' must be one of {', '.join(PIPELINE_CHOICES)}")
        self._pending: list[tuple[Session, list[int], asyncio.Future]] = []
        # (worker, next worker) pairs that failed to relay -> (monotonic time to try again, backoff seconds)
        self._no_relay: dict[tuple[str, str], tuple[float, float]] = {}
        self.relayed_steps = 0  # steps that went through at least one relay chain
        self._batcher: asyncio.Future | None = None
        self.links: dict[str, WorkerLink] = {}
        self.stages: list[LocalStage | RemoteStage] = []
        for s in plan:
            if s.worker is None:
                self.stages.append(LocalStage(s, self.stack, compute_in_thread, self._math))
            else:
                link = self.links.setdefault(s.worker.name, WorkerLink(s.worker, self.options))
                self.stages.append(RemoteStage(s, link))

    async def connect(self) -> None:
        """Reach every worker before generating: a missing one is a clear error now, not mid-answer."""
        await asyncio.gather(*(link.ensure_connected() for link in self.links.values()))
        for link in self.links.values():
            i = link.info
            problem = model_mismatch(i, self.config)
            if problem:
                raise WorkerError(f"{link.label} {problem}")
            self.capacity = min(self.capacity, i.capacity)
            log.info("%s: layers %s on %s (%s%s)%s", link.label, format_layers(i.layers), i.device, i.dtype,
                     quantization_said(i), f", weights {gb(i.weight_bytes)}" if i.weight_bytes else "")
            if i.topology and i.topology != self.topology.digest:
                log.warning("%s was started with a different topology file from the master's: it relays to the "
                            "workers its own file names; give every node the same file", link.label)
        if self.pipelines:
            log.info("long prompts go through the stages in chunks of %d tokens, one behind another (--pipeline)",
                     PIPELINE_CHUNK)

    def new_session(self) -> Session:
        return Session(uuid.uuid4().hex)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        # The last token generated is never fed back, so it takes no position in the context.
        if prompt_tokens + max(max_tokens, 1) - 1 > self.capacity:
            raise CakeError(
                f"prompt ({prompt_tokens} tokens) + max tokens ({max_tokens}) does not fit the context of "
                f"{self.capacity}; raise --context (on the master and every worker) or ask for fewer tokens")

    async def step(self, session: Session, new_tokens: list[int], every_position: bool = False) -> torch.Tensor:
        """Append tokens to a session, run them through every stage, return the last position's
        float32 logits [vocab]; with `every_position`, those of every new token's position
        [len(new_tokens), vocab] (the head then runs over all of them, not only the last).

        Decode steps (one token) of concurrent sessions are gathered into one batched pass: the weights
        are read once for all of them. A prompt runs on its own.
        """
        if len(new_tokens) != 1 or every_position:
            return (await self.step_batch([session], [new_tokens], every_position))[0]
        self._check_room(session, 1)  # here, so one session's overflow never fails a shared batch
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append((session, new_tokens, done))
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.ensure_future(self._drain())
        return await done

    async def _drain(self) -> None:
        while self._pending:
            await asyncio.sleep(0)  # let every session that is ready to step join this batch
            batch, self._pending = self._pending, []
            live = [(s, t, f) for s, t, f in batch if not f.cancelled()]
            if not live:
                continue
            try:
                logits = await self.step_batch([s for s, _, _ in live], [t for _, t, _ in live])
            except asyncio.CancelledError:  # the loop is shutting down: so are the waiting sessions
                for _, _, f in live:
                    f.cancel()
                raise
            except BaseException as e:  # each waiting session gets the failure, the batcher goes on
                for _, _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            for i, (_, _, f) in enumerate(live):
                if not f.done():
                    f.set_result(logits[i])

    async def step_batch(self, sessions: list[Session], new_tokens: list[list[int]],
                         every_position: bool = False) -> torch.Tensor:
        """One step for several sessions at once (same number of new tokens each): the stages see one
        batched request, so the weights are read once for all of them. Returns logits [B, vocab], or with
        `every_position` those of every new position [B, new tokens, vocab]."""
        for s, toks in zip(sessions, new_tokens):
            self._check_room(s, len(toks))
        eventloop.note_rows(len(sessions))  # busy-polling pays for one stream, not for batches
        every = PositionLogits(sessions, len(new_tokens[0])) if every_position else None
        for s, toks in zip(sessions, new_tokens):
            s.tokens.extend(toks)
        lost, timeouts = "", 0
        for _ in range(MAX_REPLAYS):
            try:
                last = await self._run(sessions, every)
                return last if every is None else every.logits
            except RelayFailed as e:
                self._relay_failed(e)  # nothing is lost: the step runs again without that relay
                lost = e.pair[0]
                continue
            except SessionsLost as e:
                lost = e.worker
                timeouts = timeouts + 1 if e.timed_out else 0
                if timeouts == MAX_TIMEOUTS:
                    raise WorkerError(
                        f"worker '{lost}' did not answer within --request-timeout ({self.options.request_timeout:g}s) "
                        f"{timeouts} times in a row: a long prompt on a slow node needs a larger --request-timeout; "
                        f"otherwise check that worker's log") from None
                if isinstance(e, RelayTimedOut):
                    for pair in e.pairs:
                        self._relay_failed(RelayFailed(f"a relay from worker '{pair[0]}' to '{pair[1]}' timed out", pair))
                for s in sessions:
                    s.cached = min(s.cached, e.cached)
                log.info("replaying %d session(s) from position %d after '%s' lost them",
                         len(sessions), min(s.cached for s in sessions), lost)
        raise WorkerError(f"worker '{lost}' keeps losing sessions: it restarts, its network drops, or its "
                          f"--kv-budget cannot hold this many concurrent sessions; check its log")

    def _check_room(self, session: Session, n: int) -> None:
        if len(session.tokens) + n > self.capacity:
            raise CakeError(f"session {session.id[:8]} would exceed the context of {self.capacity} tokens; "
                            f"raise --context on every node")

    async def _run(self, sessions: list[Session], every: PositionLogits | None = None) -> torch.Tensor:
        """Bring every session's cache up to its tokens; the logits of each one's last token [B, vocab]
        (and, into `every`, those of every position it runs). Work that one request to a worker cannot
        carry goes in several: sessions with different numbers of tokens to run (a replay), more sessions
        or rows than a worker takes (a long prompt, a large replay, hundreds of concurrent sessions)."""
        max_rows, max_batch = self._request_limits()
        counts = {len(s.tokens) - s.cached for s in sessions}
        n = max(counts)
        if len(sessions) > 1 and (len(counts) > 1 or len(sessions) > max_batch or len(sessions) * n > max_rows):
            group = 1 if len(counts) > 1 else max(1, min(max_batch, max_rows // max(n, 1)))
            return torch.cat([await self._run(sessions[i:i + group], every)
                              for i in range(0, len(sessions), group)])
        if len(sessions) == 1 and n >= 2 * PIPELINE_CHUNK and max_rows >= PIPELINE_CHUNK and self.pipelines:
            return await self._pipelined(sessions[0], n, PIPELINE_CHUNK, every)
        while n > max_rows:  # one session: its first tokens in chunks, each through every stage
            await self._pass(sessions, max_rows, logits=False, every=every)
            n -= max_rows
        return await self._pass(sessions, n, every=every)

    @property
    def pipelines(self) -> bool:
        """Whether long prompts go through the stages in pipelined chunks (pipelines_long_prompts)."""
        return pipelines_long_prompts(self.options.pipeline, {self._hardware(st) for st in self.stages})

    def _hardware(self, st) -> tuple[str, str]:
        if isinstance(st, LocalStage):
            return machine_id(), compute_unit(self.device)
        return worker_hardware(st.link.worker.host, st.link.info)

    async def _pipelined(self, session: Session, n: int, size: int,
                         every: PositionLogits | None = None) -> torch.Tensor:
        """Run a session's next `n` tokens in chunks of about `size` that flow through the stages one
        behind another: while a worker computes chunk k, the one before it computes chunk k+1. Each
        stage takes the chunks strictly in order (a chunk attends to the ones before it), one at a
        time; the master carries the hidden states between stages (no relay, so each stage's order is
        its own). Per stage the work is the same as in one request; with the stages on separate
        machines a prompt's time approaches one stage's instead of the sum of all. Logits of the last
        token [1, vocab] (and of every position into `every`)."""
        start = session.cached
        h = await self._embed_rows([session.tokens[start:start + n]])
        chunks = chunk_spans(n, size)
        queues: list[asyncio.Queue] = [asyncio.Queue() for _ in range(len(self.stages) + 1)]
        for a, b in chunks:
            queues[0].put_nowait((a, h[:, a:b]))

        stopped = False

        async def run_stage(i: int, st) -> None:
            for _ in chunks:
                a, x = await queues[i].get()
                out = await st.forward([session.id], [start + a], x)
                if stopped:  # a cancel that did not reach this stage (one a library swallowed): the
                    return   # stage before it stopped, so the next chunk would never come
                # of the last stage only the last chunk's, unless every position's logits are wanted
                if i + 1 < len(self.stages) or a == chunks[-1][0] or every is not None:
                    queues[i + 1].put_nowait((a, out))

        tasks = [asyncio.ensure_future(run_stage(i, st)) for i, st in enumerate(self.stages)]
        try:
            await asyncio.gather(*tasks)
        finally:  # a stage that failed (or a cancel) stops the others; the step replays from `start`
            stopped = True
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if every is None:
            out = await self._compute(self._logits, queues[-1].get_nowait()[1])
        else:
            while not queues[-1].empty():
                a, h = queues[-1].get_nowait()
                out = await self._compute(self._all_logits, h)
                every.put(session.id, start + a, out[0])
            out = out[:, -1]
        session.cached += n
        return out

    def _request_limits(self) -> tuple[int, int]:
        """The most rows (batch x tokens) and sessions one forward may carry: the least any worker takes."""
        infos = [link.info for link in self.links.values() if link.info is not None]
        rows = [i.max_rows for i in infos if i.max_rows > 0] or [1 << 62]
        batch = [i.max_batch for i in infos if i.max_batch > 0] or [1 << 62]
        return min(rows), min(batch)

    async def _pass(self, sessions: list[Session], n: int, logits: bool = True,
                    every: PositionLogits | None = None) -> torch.Tensor | None:
        """Run the next `n` tokens of every session through every stage; the logits of each one's last
        token if `logits`, and those of every position into `every`."""
        starts = [s.cached for s in sessions]
        h = await self._embed_rows([s.tokens[s.cached:s.cached + n] for s in sessions])
        names = [s.id for s in sessions]
        relayed = False
        for hop in self._hops():
            h = await hop.forward(names, starts, h)
            if isinstance(hop, RelayChain):
                relayed = True
                for pair in hop.pairs:  # it works (again): a later failure starts from the first backoff
                    self._no_relay.pop(pair, None)
        self.relayed_steps += relayed
        if every is not None:
            out = await self._compute(self._all_logits, h)
            for s, start, rows in zip(sessions, starts, out):
                every.put(s.id, start, rows)
            out = out[:, -1]
        else:
            out = await self._compute(self._logits, h) if logits else None
        for s in sessions:
            s.cached += n
        return out

    def _hops(self) -> list[LocalStage | RemoteStage | RelayChain]:
        """The stages, with runs of consecutive remote stages on distinct workers joined into relay
        chains (unless relay is off, or a worker could not reach the next)."""
        groups: list[list] = []
        for st in self.stages:
            if groups and self._relays_to(groups[-1], st):
                groups[-1].append(st)
            else:
                groups.append([st])
        return [g[0] if len(g) == 1 else RelayChain(g) for g in groups]

    def _relays_to(self, group: list, st) -> bool:
        """Whether the last stage of `group` can pass its output straight to remote stage `st`."""
        tail = group[-1]
        return (self.options.relay and isinstance(st, RemoteStage) and isinstance(tail, RemoteStage)
                and st.link not in [s.link for s in group]
                and self._may_relay(tail.link.worker.name, st.link.worker.name))

    def _may_relay(self, a: str, b: str) -> bool:
        until, _ = self._no_relay.get((a, b), (0.0, 0.0))
        return time.monotonic() >= until

    def _relay_failed(self, e: RelayFailed) -> None:
        """Go through the master between these two workers for a while (doubling each time it fails
        again): the next worker may be restarting, or unreachable from this one for good."""
        _, backoff = self._no_relay.get(e.pair, (0.0, RELAY_RETRY_S / 2))
        backoff = min(backoff * 2, RELAY_RETRY_MAX_S)
        self._no_relay[e.pair] = (time.monotonic() + backoff, backoff)
        log.warning("%s; for the next %.0fs its output goes to '%s' through the master", e, backoff, e.pair[1])

    async def _compute(self, fn, *args):
        return await compute(fn, *args, in_thread=self.compute_in_thread, executor=self._math,
                             device=self.device.type)

    async def _embed_rows(self, rows: list[list[int]]) -> torch.Tensor:
        # On a CUDA master even the embedding goes through the maths thread (see compute()); elsewhere
        # a lookup is too small to send to a thread.
        return await self._compute(self._embed, rows) if self._math is not None else self._embed(rows)

    def _embed(self, rows: list[list[int]]) -> torch.Tensor:
        return self.head.embed(torch.tensor(rows, device=self.device))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head.logits(h[:, -1].to(self.device))

    def _all_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head.logits(h.to(self.device))

    async def end(self, session: Session) -> None:
        await asyncio.gather(*(stage.end([session.id]) for stage in self.stages))

    async def close(self) -> None:
        for link in self.links.values():
            link.shutdown()
        if self._math is not None:
            self._math.shutdown(wait=False, cancel_futures=True)

    def stage_report(self) -> list[str]:
        lines = []
        for st in self.stages:
            s = st.stats
            if not s.calls:
                continue
            net = max(0.0, s.total_s - s.compute_s)
            lines.append(f"  {st.stage}: {s.calls} calls, {1e3 * s.total_s / s.calls:.2f} ms/call "
                         f"(compute {1e3 * s.compute_s / s.calls:.2f} ms, network {1e3 * net / s.calls:.2f} ms)")
        return lines

