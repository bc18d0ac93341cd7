"""What the cluster looks like now, for `GET /api/cluster` and the /cluster page: each node's layers,
device, memory, status and round trip, and where the recent tokens' time went on each stage.

The master's own figures are read directly. Each worker is watched over a connection of its own, never
the master's, so watching cannot reconnect, delay or replay a generation: a ping every PROBE_S seconds
gives the round trip, a connection that breaks or is refused shows the worker down at the next probe, and
a restarted worker is up again at the probe after it listens. The per-token times are the ones the master
measures on each decode step (master.StageStats).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace

from cake import wire
from cake.client import Options, WorkerLink
from cake.devices import dtype_name
from cake.errors import CakeError
from cake.master import LocalStage, Master
from cake.memory import free_memory
from cake.model.config import LlamaConfig
from cake.topology import Stage, Worker

PROBE_S = 1.0  # seconds between two probes of a worker
PROBE_CONNECT_S = 3.0  # the most one connection attempt of a probe waits
SLOW_PING_S = 5.0  # a ping unanswered this long is reported: the worker is busy computing, or stuck
RATE_WINDOW_S = 5.0  # tokens per second are counted over this many seconds

_ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}


# ---- what the endpoint answers --------------------------------------------------------------------------

@dataclass
class Memory:
    """Bytes on a node's device. A worker's KV caches are the sessions open now times one session's cache
    (preallocated for its context); its free memory is what it said when the probe last connected."""

    weights: int
    kv_cache: int
    free: int  # 0: the node cannot tell
    used: int = field(init=False)

    def __post_init__(self) -> None:
        self.used = self.weights + self.kv_cache


@dataclass
class NodeView:
    name: str
    role: str  # master or worker
    address: str
    description: str
    layers: list[list[int]]  # [first, last] ranges, inclusive
    device: str
    dtype: str
    quantize: str
    status: str  # up, down or reconnecting
    error: str  # why it is not up (or what is slow about it); "" when all is well
    memory: Memory
    rtt_ms: float | None  # the last ping's round trip; None for the master or before the first answer
    compute_ms: float | None  # per token over the recent decode steps, all its stages together
    network_ms: float | None


@dataclass
class StageView:
    """One stage's recent decode steps (one token per session each), oldest first, for the chart."""

    node: str
    layers: list[int]  # [first, last]
    steps: int  # decode steps it has run since the server started
    compute_ms: list[float]
    network_ms: list[float]


@dataclass
class ClusterSnapshot:
    model: str
    num_layers: int
    plan: str  # where the layers' placement comes from: "topology" (a file), "planned" (the master placed
    # workers whose entries list no layers) or "master" (no topology: all local)
    topology: str | None  # the topology file
    active_sessions: int
    tokens_per_s: float  # generated over the last rate_window_s seconds
    rate_window_s: float
    nodes: list[NodeView]
    stages: list[StageView]

    def to_json(self) -> dict:
        return asdict(self)


# ---- the arithmetic -------------------------------------------------------------------------------------

def layer_ranges(stages: list[Stage], name: str) -> list[list[int]]:
    """[first, last] of each stage node `name` runs ('master' for the master's own)."""
    return [[s.start, s.end - 1] for s in stages if s.name == name]


def session_cache_bytes(config: LlamaConfig, layers: int, capacity: int, dtype: str) -> int:
    """One session's keys and values over `layers` layers, preallocated for `capacity` positions."""
    return 2 * layers * config.num_key_value_heads * capacity * config.head_dim * _ITEMSIZE.get(dtype, 4)


def per_token_ms(samples: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Mean compute and network milliseconds of (total_s, compute_s) steps; None without any."""
    if not samples:
        return None
    compute = sum(c for _, c in samples) / len(samples)
    total = sum(t for t, _ in samples) / len(samples)
    return 1e3 * compute, 1e3 * max(0.0, total - compute)


class Rate:
    """Events per second over the last `window` seconds."""

    def __init__(self, window: float = RATE_WINDOW_S):
        self.window = window
        self.times: deque[float] = deque()

    def add(self, now: float | None = None) -> None:
        self.times.append(time.monotonic() if now is None else now)

    def per_s(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self.times and self.times[0] <= now - self.window:
            self.times.popleft()
        return len(self.times) / self.window


# ---- watching the workers -------------------------------------------------------------------------------

class WorkerProbe:
    """A connection of its own to one worker, pinged every PROBE_S seconds."""

    def __init__(self, worker: Worker, options: Options):
        self.link = WorkerLink(worker, replace(options, connect_timeout=min(options.connect_timeout,
                                                                            PROBE_CONNECT_S)))
        self.checked = False  # a probe has finished: until then the master's own link says whether it is up
        self.up = False
        self.error = ""
        self.rtt_ms: float | None = None
        self.info: wire.Info | None = None
        self._ping: asyncio.Future | None = None
        self._sent = 0.0

    async def watch(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(PROBE_S)

    async def probe(self) -> None:
        try:
            await self._probe()
        finally:
            self.checked = True

    async def _probe(self) -> None:
        if not self.link.connected:  # never connected, or the connection broke since the last probe
            self._ping = None
            try:
                await self.link.connect()
            except (ConnectionError, CakeError) as e:
                self.up, self.error, self.rtt_ms = False, str(e), None
                return
            self.info = self.link.info
        self.up = True
        if self._ping is not None and not self._ping.done():  # one ping at a time
            waited = time.perf_counter() - self._sent
            self.error = f"no answer to a ping for {waited:.0f}s: busy computing, or stuck" if waited >= SLOW_PING_S else ""
            return
        self.error = ""
        try:
            sent = time.perf_counter()
            ping = await self.link.send(wire.Ping())
        except ConnectionError as e:  # it broke just now: the next probe reconnects
            self.up, self.error, self.rtt_ms = False, f"connection lost ({e})", None
            return
        self._ping, self._sent = ping, sent
        ping.add_done_callback(lambda f: self._answered(f, sent))

    def _answered(self, ping: asyncio.Future, sent: float) -> None:
        if not ping.cancelled() and ping.exception() is None:
            self.rtt_ms = 1e3 * (time.perf_counter() - sent)

    def close(self) -> None:
        self.link.shutdown()


# ---- the view -------------------------------------------------------------------------------------------

class ClusterView:
    """The live state of one master's cluster. `start()` begins watching the workers (after the master
    has reached them), `close()` stops; `opened`/`closed`/`token` are told by the server as answers run."""

    def __init__(self, master: Master, model: str, address: str = "", topology: str | None = None):
        self.master, self.model, self.address, self.topology = master, model, address, topology
        self.probes = {name: WorkerProbe(link.worker, master.options) for name, link in master.links.items()}
        self.active = 0
        self.rate = Rate()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(p.watch()) for p in self.probes.values()]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for p in self.probes.values():
            p.close()

    def opened(self) -> None:
        self.active += 1

    def closed(self) -> None:
        self.active -= 1

    def token(self) -> None:
        self.rate.add()

    def snapshot(self) -> ClusterSnapshot:
        m = self.master
        plan = [st.stage for st in m.stages]
        nodes = [self._master_node(plan)] + [self._worker_node(name, plan) for name in m.links]
        stages = []
        for st in m.stages:
            recent = list(st.stats.recent)
            stages.append(StageView(st.stage.name, [st.stage.start, st.stage.end - 1], st.stats.steps,
                                    [round(1e3 * c, 3) for _, c in recent],
                                    [round(1e3 * max(0.0, t - c), 3) for t, c in recent]))
        source = "planned" if m.topology.planned else "topology" if self.topology else "master"
        return ClusterSnapshot(self.model, m.config.num_hidden_layers, source,
                               self.topology, self.active, round(self.rate.per_s(), 2), self.rate.window, nodes,
                               stages)

    def _times(self, name: str) -> tuple[float | None, float | None]:
        """A node's compute and network ms per token: each of its stages' mean, added up."""
        means = [per_token_ms(list(st.stats.recent)) for st in self.master.stages if st.stage.name == name]
        means = [x for x in means if x is not None]
        if not means:
            return None, None
        return round(sum(c for c, _ in means), 3), round(sum(n for _, n in means), 3)

    def _master_node(self, plan: list[Stage]) -> NodeView:
        m = self.master
        local = [st for st in m.stages if isinstance(st, LocalStage)]
        kv = sum(c.nbytes for st in local for c in st.caches.values()) + sum(c.nbytes for c in m.stack.spares)
        memory = Memory(m.head.weight_bytes + m.stack.weight_bytes, kv, free_memory(m.device))
        compute, network = self._times("master")
        return NodeView("master", "master", self.address, "", layer_ranges(plan, "master"), str(m.device),
                        dtype_name(m.dtype), str(m.quantization or "none"), "up", "", memory, None, compute, network)

    def _worker_node(self, name: str, plan: list[Stage]) -> NodeView:
        link, probe = self.master.links[name], self.probes[name]
        info = probe.info or link.info
        if probe.checked:
            up, error = probe.up, probe.error
        else:
            up, error = link.connected, ""
        # Down while answers are running: they wait for it (up to --retry-timeout) and replay when it is back.
        status = "up" if up else "reconnecting" if self.active else "down"
        ranges = layer_ranges(plan, name)
        n_layers = sum(b - a + 1 for a, b in ranges)
        if info is None:
            memory = Memory(0, 0, 0)
            device = dtype = quantize = ""
        else:
            kv = self.active * session_cache_bytes(self.master.config, n_layers, info.capacity, info.dtype)
            memory = Memory(info.weight_bytes, kv, info.memory)
            device, dtype, quantize = info.device, info.dtype, info.quantization or "none"
        compute, network = self._times(name)
        rtt = None if probe.rtt_ms is None or not up else round(probe.rtt_ms, 3)
        return NodeView(name, "worker", link.worker.address, link.worker.description, ranges, device, dtype,
                        quantize, status, error, memory, rtt, compute, network)
