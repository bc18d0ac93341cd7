"""The figures of one model: what each child measured (Measured), speeds, the project's targets, and the
JSON every figure goes to."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

from .children import Run, StageSplit
from .models import ModelSpec
from .pinning import Placement
from .weights import MB, StepBytes, WeightBytes

SESSIONS = (1, 2, 4)
# Issue 5's targets, per model size (of every family).
VS_TRANSFORMERS = {"tiny": 1.5}  # cake all-local decode tok/s / transformers generate
VS_BANDWIDTH = {"big": 0.93}  # cake all-local decode tok/s / the memory-bandwidth limit
WORKERS_KEEP = {"tiny": 0.85, "big": 0.95}  # decode tok/s with 2 loopback workers / all-local
MAX_HOP_US = 150  # network overhead per worker round trip
RSS_SLACK = 400 * MB  # what a node may hold beyond its weights
CONCURRENCY_GAIN = {"big": 2.5}  # aggregate decode tok/s of 4 sessions / 1 session


@dataclass
class Measured:
    """What the parent collected from one child."""
    runs: list[Run] = field(default_factory=list)
    matvec_s: list[float] = field(default_factory=list)
    kernel: str = ""  # the matvec's: the faster of F.linear and torch.mv
    concurrency: dict[int, list[float]] = field(default_factory=dict)  # sessions -> aggregate tok/s per round
    stage_runs: list[list[StageSplit]] = field(default_factory=list)  # each run's split, for cake
    peak_rss: int | None = None
    threads: int = 0
    cpus: str | None = None  # the CPUs the process could use, as the kernel lists them
    products: list[dict[str, float]] = field(default_factory=list)  # cake: one decode step's products, per kind
    weight_bytes: int | None = None  # cake: what its layers and head hold, as the master counts them
    kernels: list[str] = field(default_factory=list)  # cake: the quantized products' kernels
    reads_s: list[list[float]] = field(default_factory=list)  # reads: per round, a time per size
    read_kernels: list[str] = field(default_factory=list)
    read_dtype: str = ""
    read_bytes: list[int] = field(default_factory=list)
    model_class: str = ""  # transformers: the class generate ran on

    def add_run(self, answer: dict) -> None:
        if "reads_s" in answer:
            self.reads_s.append(answer["reads_s"])
            self.read_kernels, self.read_dtype, self.read_bytes = (answer["read_kernels"], answer["read_dtype"],
                                                                   answer["read_bytes"])
        elif "matvec_s" in answer:
            self.matvec_s.append(answer["matvec_s"])
            self.kernel = answer.get("kernel", "")
        else:
            self.stage_runs.append([StageSplit(**s) for s in answer.pop("stages", [])])
            self.runs.append(Run(**answer))

    @property
    def stages(self) -> list[StageSplit]:
        """The stage split of the median run (by decode time), so that it adds up to the reported figure;
        a sum over runs would let one slow run skew every row."""
        if not self.runs:
            return []
        order = sorted(range(len(self.runs)), key=lambda i: self.runs[i].decode_ms)
        return self.stage_runs[order[(len(order) - 1) // 2]]

    def add_finish(self, answer: dict) -> None:
        self.peak_rss, self.threads, self.cpus = answer["peak_rss"], answer["threads"], answer.get("cpus")
        self.weight_bytes, self.kernels = answer.get("weight_bytes"), answer.get("kernels", [])
        self.model_class = answer.get("model_class", "")

    def product_s(self, kind: str | None = None) -> float:
        """Median over rounds of one decode step's products of `kind` (None: all kinds)."""
        return statistics.median(sum(p.values()) if kind is None else p[kind] for p in self.products)


@dataclass
class Speed:
    decode_ms: float
    ttft_ms: float
    prefill_tps: float
    peak_rss: int | None

    @property
    def decode_tps(self) -> float:
        return 1e3 / self.decode_ms

    @classmethod
    def of(cls, m: Measured, prompt_tokens: int) -> Speed:
        ttft = statistics.median(r.ttft_s for r in m.runs)
        return cls(statistics.median(r.decode_ms for r in m.runs), 1e3 * ttft, prompt_tokens / ttft, m.peak_rss)


@dataclass
class Target:
    check: str
    measured: float
    goal: float
    unit: str
    at_least: bool  # True: measured >= goal passes; False: measured <= goal passes

    @property
    def passed(self) -> bool:
        return self.measured >= self.goal if self.at_least else self.measured <= self.goal

    def show(self, value: float) -> str:
        return f"{value:.3f}x" if self.unit == "x" else f"{value:.0f} {self.unit}"


@dataclass
class ModelResult:
    spec: ModelSpec
    weights: WeightBytes
    prompt_tokens: int
    tokens: int
    repeats: int
    bandwidth: Measured
    transformers: Measured
    local: Measured
    workers: Measured
    worker_rss: dict[str, int | None]
    device: str = "cpu"
    dtype: str = "f32"
    no_relay: Measured | None = None  # the workers, every hidden state through the master
    no_poll: Measured | None = None  # workers and master not busy-polling (measured when the others do)
    busy_poll_us: int = 0
    link_delay_ms: float = 0.0  # each way, on every connection to a worker (an emulated network)
    local_server: Measured | None = None  # all-local, computing as the API server's master does
    placement: Placement = Placement()
    worker_cpus: dict[str, str | None] = field(default_factory=dict)  # as each worker's kernel entry said
    step: StepBytes | None = None  # what a decode step reads (the matvec's bytes); None: weights.decode_step

    @property
    def step_bytes(self) -> int:
        return self.step.total if self.step is not None else self.weights.decode_step

    @property
    def matvec_s(self) -> float:
        return statistics.median(self.bandwidth.matvec_s)

    @property
    def bound_tps(self) -> float:
        return 1 / self.matvec_s

    @property
    def hops(self) -> int:
        return len(self.workers.stages)

    def speed(self, m: Measured) -> Speed:
        return Speed.of(m, self.prompt_tokens)

    @property
    def hop_overhead_us(self) -> float:
        extra_ms = self.speed(self.workers).decode_ms - self.speed(self.local).decode_ms
        return 1e3 * extra_ms / self.hops

    def aggregate(self, sessions: int, m: Measured | None = None) -> float:
        return statistics.median((m or self.workers).concurrency[sessions])

    def targets(self) -> list[Target]:
        name, local, workers = self.spec.name, self.speed(self.local), self.speed(self.workers)
        ts = []
        if name in VS_TRANSFORMERS:
            hf = self.speed(self.transformers)
            ts.append(Target("cake all-local decode / transformers", local.decode_tps / hf.decode_tps,
                             VS_TRANSFORMERS[name], "x", True))
        if name in VS_BANDWIDTH:
            ts.append(Target("cake all-local decode / bandwidth limit", local.decode_tps / self.bound_tps,
                             VS_BANDWIDTH[name], "x", True))
        if name in WORKERS_KEEP:
            ts.append(Target(f"{self.placement.label} decode / all-local", workers.decode_tps / local.decode_tps,
                             WORKERS_KEEP[name], "x", True))
        ts.append(Target("per-hop overhead", self.hop_overhead_us, MAX_HOP_US, "us", False))
        for worker, (start, end) in self.placement.ranges(self.spec.layers).items():
            rss = self.worker_rss.get(worker)
            if rss is not None:
                ts.append(Target(f"{worker} peak RSS (layers {start}-{end - 1} + 400 MB)", rss / MB,
                                 (self.weights.layer_range(start, end) + RSS_SLACK) / MB, "MB", False))
        if workers.peak_rss is not None:
            ts.append(Target("master peak RSS (embed + head + 400 MB)", workers.peak_rss / MB,
                             (self.weights.master + RSS_SLACK) / MB, "MB", False))
        if name in CONCURRENCY_GAIN:
            ts.append(Target(f"{max(SESSIONS)} sessions aggregate decode / 1 session",
                             self.aggregate(max(SESSIONS)) / self.aggregate(1), CONCURRENCY_GAIN[name], "x", True))
        return ts

    def to_json(self) -> dict:
        measured = [("transformers", self.transformers), ("cake_local", self.local), ("cake_workers", self.workers)]
        if self.local_server is not None:
            measured.append(("cake_local_server", self.local_server))
        if self.no_relay is not None:
            measured.append(("cake_workers_no_relay", self.no_relay))
        if self.no_poll is not None:
            measured.append(("cake_workers_no_poll", self.no_poll))
        speeds = {k: asdict(self.speed(m)) for k, m in measured}
        return {
            "spec": asdict(self.spec), "arch": self.spec.arch, "transformers_class": self.transformers.model_class,
            "prompt_tokens": self.prompt_tokens, "tokens": self.tokens,
            "repeats": self.repeats, "link_delay_ms": self.link_delay_ms, "busy_poll_us": self.busy_poll_us,
            "workers": self.placement.workers, "cores_per_node": [list(c) for c in self.placement.cores],
            "cpus": {"worker": self.worker_cpus, "master": self.workers.cpus, "all_local": self.local.cpus},
            "weights": {"total": self.weights.total, "decode_step": self.weights.decode_step,
                        "master": self.weights.master, "layers": self.weights.layers},
            "speed": speeds,
            "step_bytes": {**(asdict(self.step) if self.step is not None else {}), "total": self.step_bytes},
            "bandwidth": {"matvec_s": self.matvec_s, "gb_per_s": self.step_bytes / self.matvec_s / 1e9,
                          "bound_tps": self.bound_tps,
                          # what cake all-local reads a second, and its share of what the matvec reads
                          "achieved_gb_per_s": self.step_bytes * self.speed(self.local).decode_tps / 1e9,
                          "fraction": self.speed(self.local).decode_tps / self.bound_tps},
            "hop_overhead_us": self.hop_overhead_us,
            "worker_rss": self.worker_rss,
            "aggregate_tps": {n: self.aggregate(n) for n in self.workers.concurrency},
            **({"aggregate_tps_no_poll": {n: self.aggregate(n, self.no_poll) for n in self.no_poll.concurrency}}
               if self.no_poll is not None and self.no_poll.concurrency else {}),
            "targets": [{**asdict(t), "passed": t.passed} for t in self.targets()],
            "raw": {k: asdict(m) for k, m in [("bandwidth", self.bandwidth), *measured]},
        }
