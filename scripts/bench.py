#!/usr/bin/env python3
"""Benchmark cake against transformers and the memory-bandwidth limit on seeded random-weight models.

    python scripts/bench.py --quick            # about a minute: tiny model, few tokens, one run
    python scripts/bench.py --model both       # the real figures: minutes, on a quiet machine
    python scripts/bench.py --cores-per-node 4 # each node on cores of its own, as on separate machines
    python scripts/bench.py --model big --quantize int8,int4   # int8/int4 beside f32 and bf16

Every measured thing runs in its own fresh process (this script re-invoked with `--child`), so one
measurement's imports and allocations never show in another's timings or peak RSS: the master is
measured without transformers loaded, and the workers are real `cake --mode worker` processes.
Everything runs on the CPU in fp32 unless --device/--dtype say otherwise (every node and transformers
alike). With --quantize int8/int4 the script also measures cake with quantized weights next to the
unquantized model (docs/benchmarks.md, "Quantized weights"). docs/benchmarks.md says what each figure means.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
# Measure this checkout's cake, not whichever one is installed: children and workers inherit this.
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

RUN_ON = "--run-on"  # this script as a launcher: pin, then exec the rest of its command line


def run_on(cpus: str, command: list[str]) -> None:
    """Become `command` on the CPUs `cpus` ("0,1"), with one torch/OpenMP thread per CPU. The affinity
    is set before the command starts, so every thread it ever makes inherits it."""
    cores = {int(c) for c in cpus.split(",")}
    os.sched_setaffinity(0, cores)
    os.environ["OMP_NUM_THREADS"] = str(len(cores))
    os.execv(command[0], command)


if __name__ == "__main__" and len(sys.argv) > 3 and sys.argv[1] == RUN_ON:
    run_on(sys.argv[2], sys.argv[3:])  # before cake is imported: its OpenMP default must not leak into the command

# Importing cake sets its OpenMP spin default (cake/__init__.py) for this process and its children. The
# processes that are not cake (transformers, the matvec) must run as a user would run them: with the
# environment the benchmark was started with, OpenMP's own default unless the user set one.
USER_GOMP_SPINCOUNT = os.environ.get("GOMP_SPINCOUNT")
NATIVE_OMP = "CAKE_BENCH_NATIVE_OMP"

from cake import launch  # noqa: E402  (after the path set-up above; imports no torch)
from cake.errors import CakeError  # noqa: E402

if os.environ.get(NATIVE_OMP) == "1" and USER_GOMP_SPINCOUNT is None:
    del os.environ["GOMP_SPINCOUNT"]  # before torch loads OpenMP: see above
NATIVE_KINDS = ("transformers", "bandwidth", "reads")

MB = 1e6
ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}
SPECIAL_IDS = 128000  # Llama 3 ids from here up are special tokens; prompts avoid them
SESSIONS = (1, 2, 4)
MATVEC_ITERS = 10
WORKER_START_TIMEOUT = 300.0  # seconds: a worker reads its share of a 1.8 GB checkpoint first
# Issue 5's targets, per model size.
VS_TRANSFORMERS = {"tiny": 1.5}  # cake all-local decode tok/s / transformers generate
VS_BANDWIDTH = {"big": 0.93}  # cake all-local decode tok/s / the memory-bandwidth limit
WORKERS_KEEP = {"tiny": 0.85, "big": 0.95}  # decode tok/s with 2 loopback workers / all-local
MAX_HOP_US = 150  # network overhead per worker round trip
RSS_SLACK = 400 * MB  # what a node may hold beyond its weights
CONCURRENCY_GAIN = {"big": 2.5}  # aggregate decode tok/s of 4 sessions / 1 session
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# Issue 16's targets for quantized weights (the big model, on a CPU): decode tok/s against the unquantized
# model at the same dtype (bf16 by default), and each format's decode against its own bandwidth limit.
QUANT_VS_BASE = {"int8": 1.6, "int4": 2.2}
QUANT_OF_LIMIT = 0.8
QUANT_TARGET_MODELS = ("big",)
SCHEMES = ("none", "int8", "int4")
# The matrices --quantize covers (every linear layer of the blocks, and the master's embedding and head).
QUANTIZED_RE = re.compile(r"(_proj|embed_tokens|lm_head)\.weight$")


# ---- models -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 128256
    seed: int = 1234
    stored: str = "f32"  # the dtype the folder's safetensors hold

    @property
    def folder(self) -> str:
        # The shape is in the name, so a changed spec never reuses a stale cached model.
        return (f"{self.name}-h{self.hidden}-i{self.intermediate}-l{self.layers}-a{self.heads}-kv{self.kv_heads}"
                f"-v{self.vocab}-s{self.seed}" + ("" if self.stored == "f32" else f"-{self.stored}"))

    def describe(self) -> str:
        return (f"hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} layers, "
                f"{self.heads}/{self.kv_heads} heads, vocab {self.vocab}")


SPECS = {
    # Small layers, full Llama 3 vocabulary: per-token overheads (Python, asyncio, sockets) dominate.
    "tiny": ModelSpec("tiny", hidden=256, intermediate=704, layers=8, heads=8, kv_heads=2),
    # ~1.8 GB fp32: decode is bound by memory bandwidth.
    "big": ModelSpec("big", hidden=1024, intermediate=2816, layers=16, heads=16, kv_heads=4),
    # Llama 3 8B's shape (16 GB in bf16), for a GPU machine: never part of --model both.
    "8b": ModelSpec("8b", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, stored="bf16"),
}


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    """A fixed prompt of ordinary token ids, so timing needs no tokenizer."""
    rng = random.Random(seed)
    return [rng.randrange(SPECIAL_IDS) for _ in range(n)]


def safetensors_sizes(model_dir: Path) -> dict[str, int]:
    """Bytes of every tensor in a model folder, from the safetensors headers alone (cake's own reader)."""
    from cake.model.weights import WeightFiles

    files = WeightFiles(model_dir)
    return {name: (e := files.entry(name)).end - e.start for name in files.where}


def safetensors_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a model folder, from the safetensors headers alone."""
    from cake.model.weights import WeightFiles

    files = WeightFiles(model_dir)
    return {name: tuple(files.entry(name).shape) for name in files.where}


def held_bytes(name: str, shape: tuple[int, ...], dtype: str, scheme: str = "none", group: int = 32) -> int:
    """Bytes a node holds (and a decode step reads) for one checkpoint tensor. Quantized (issue 16's
    formulas, written out here rather than taken from cake): int8 is one byte a weight and a bf16 scale a
    row; int4 half a byte a weight, the last group of a row padded, and a bf16 scale and zero a group.
    Norms, and every tensor with --quantize none, are held in the node's dtype."""
    if scheme != "none" and len(shape) == 2 and QUANTIZED_RE.search(name):
        out, k = shape
        if scheme == "int8":
            return out * k + 2 * out
        groups = -(-k // group)
        return out * groups * (group // 2 + 2 * 2)
    return math.prod(shape) * ITEMSIZE[dtype]


@dataclass
class WeightBytes:
    layers: dict[int, int]
    embed: int
    head: int  # lm_head; 0 when tied to the embedding
    norm: int

    @classmethod
    def read(cls, model_dir: Path) -> WeightBytes:
        try:
            sizes = safetensors_sizes(model_dir)
        except CakeError as e:
            raise CakeError(f"cannot read the weights in '{model_dir}' ({e}); "
                            f"delete the folder and the benchmark rebuilds it") from None
        return cls.of(sizes)

    @classmethod
    def held(cls, model_dir: Path, dtype: str, scheme: str = "none", group: int = 32) -> WeightBytes:
        """What a node running `--dtype dtype --quantize scheme` holds of each part (see held_bytes)."""
        try:
            shapes = safetensors_shapes(model_dir)
        except CakeError as e:
            raise CakeError(f"cannot read the weights in '{model_dir}' ({e}); "
                            f"delete the folder and the benchmark rebuilds it") from None
        return cls.of({name: held_bytes(name, shape, dtype, scheme, group) for name, shape in shapes.items()})

    @classmethod
    def of(cls, sizes: dict[str, int]) -> WeightBytes:
        """Sum tensor sizes (name -> bytes) into layers, embedding, head and norm."""
        layers: dict[int, int] = {}
        for name, n in sizes.items():
            m = LAYER_RE.match(name)
            if m:
                layers[int(m[1])] = layers.get(int(m[1]), 0) + n
        return cls(layers, sizes["model.embed_tokens.weight"], sizes.get("lm_head.weight", 0),
                   sizes["model.norm.weight"])

    def in_dtype(self, dtype: str, stored: str = "f32") -> WeightBytes:
        """The same weights held in another dtype (the tiny and big models are stored in f32)."""
        k = ITEMSIZE[dtype] / ITEMSIZE[stored]
        return WeightBytes({i: int(n * k) for i, n in self.layers.items()}, int(self.embed * k), int(self.head * k),
                           int(self.norm * k))

    def layer_range(self, start: int, end: int) -> int:
        return sum(self.layers[i] for i in range(start, end))

    @property
    def total(self) -> int:
        return sum(self.layers.values()) + self.embed + self.head + self.norm

    @property
    def decode_step(self) -> int:
        """What one decode step reads: every layer and the output projection (one embedding row is noise)."""
        return sum(self.layers.values()) + self.norm + (self.head or self.embed)

    @property
    def master(self) -> int:
        """What a master with no layers holds."""
        return self.embed + self.head + self.norm


# ---- the child processes: one measured thing each -----------------------------------------------------
#
# The parent starts every child at once, then asks each in turn for one run, round after round, so a
# change in machine load hits every figure alike and the ratios between them hold. A child answers on
# a private copy of its stdout, one JSON line per command: "run", "concurrent N", "finish".

@dataclass
class Job:
    kind: str  # a key of SUBJECTS
    model: str  # a key of SPECS
    model_dir: str
    prompt_tokens: int = 0
    tokens: int = 0
    topology: str | None = None
    nbytes: int = 0  # bandwidth: bytes the matvec reads
    device: str = "cpu"
    dtype: str = "f32"
    relay: bool = True  # cake with workers: workers pass hidden states to each other
    busy_poll: str = "auto"  # cake: the master's --busy-poll
    server: bool = False  # cake: compute as the API server's master does (compute_in_thread)
    quantize: str = "none"  # cake: the master's --quantize
    group: int = 32  # cake: the master's --group-size
    sizes: list[int] = field(default_factory=list)  # reads: the byte counts to time a read of


@dataclass
class Run:
    ttft_s: float
    decode_s: float
    decode_tokens: int

    @property
    def decode_ms(self) -> float:
        return 1e3 * self.decode_s / self.decode_tokens


@dataclass
class StageSplit:
    """One stage's decode steps as the master's StageStats saw them (prefill excluded)."""
    name: str
    calls: int
    total_s: float
    compute_s: float

    def __add__(self, other: StageSplit) -> StageSplit:
        return StageSplit(self.name, self.calls + other.calls, self.total_s + other.total_s,
                          self.compute_s + other.compute_s)

    def __sub__(self, other: StageSplit) -> StageSplit:
        return StageSplit(self.name, self.calls - other.calls, self.total_s - other.total_s,
                          self.compute_s - other.compute_s)


def proc_status(field: str, pid: int | None = None) -> str | None:
    """A field of /proc/<pid>/status (of this process by default), as the kernel writes it; None where
    there is no such file or field."""
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def peak_rss(pid: int | None = None) -> int | None:
    """Peak resident set size in bytes (VmHWM) of a process, or of this one; None where unknown."""
    hwm = proc_status("VmHWM", pid)  # "123456 kB"
    if hwm is not None:
        return int(hwm.split()[0]) * 1024
    if pid is None:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux
    return None


def steady_rate(stamps: list[list[float]]) -> float:
    """Tokens per second while every session is decoding.

    `stamps[i]` holds the times session i produced its tokens. The window runs from the last session's
    first token to the first session's last token, so prefills and stragglers are left out.
    """
    start = max(s[0] for s in stamps)
    end = min(s[-1] for s in stamps)
    count = sum(start < t <= end for s in stamps for t in s)
    if end <= start or not count:
        raise CakeError(f"the {len(stamps)} concurrent sessions never decoded at the same time; raise --tokens")
    return count / (end - start)


class Subject:
    """One measured thing: set up (and warmed up) in __init__, then measured one run at a time."""

    def run(self) -> dict:
        raise CakeError(f"{type(self).__name__} has no runs")

    def concurrent(self, sessions: int) -> dict:
        raise CakeError(f"{type(self).__name__} does not run concurrent sessions")

    def products(self) -> dict:
        raise CakeError(f"{type(self).__name__} has no matrix products to time")

    def finish(self) -> dict:
        return {}


class Build(Subject):
    def __init__(self, job: Job):
        from cake.synthetic import make_model

        s = SPECS[job.model]
        final = Path(job.model_dir)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        make_model(tmp, hidden=s.hidden, intermediate=s.intermediate, layers=s.layers, heads=s.heads,
                   kv_heads=s.kv_heads, vocab=s.vocab, seed=s.seed,
                   dtype={"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[s.stored])
        tmp.rename(final)  # a half-written folder is never mistaken for a cached model


class Bandwidth(Subject):
    """One matrix-vector product over as many bytes as a decode step reads, on the nodes' device and dtype."""

    def __init__(self, job: Job):
        import torch

        from cake.devices import DTYPES

        hidden = SPECS[job.model].hidden
        dtype, self.device = DTYPES[job.dtype], torch.device(job.device)
        # Written, not torch.empty: untouched pages all map the one shared zero page, which reads from cache.
        self.w = torch.full((-(-job.nbytes // (ITEMSIZE[job.dtype] * hidden)), hidden), 1e-3, dtype=dtype,
                            device=self.device)
        self.x = torch.ones(1, hidden, dtype=dtype, device=self.device)
        # The faster of torch's two kernels for it: F.linear, or torch.mv (faster for bf16 on a CPU).
        kernels = {"F.linear": lambda: torch.nn.functional.linear(self.x, self.w),
                   "torch.mv": lambda: torch.mv(self.w, self.x[0])}
        best = {}
        for name, kernel in kernels.items():
            for _ in range(3):
                self._matvec(kernel)
            best[name] = min(self._matvec(kernel) for _ in range(5))
        self.kernel_name = min(best, key=best.get)
        self.kernel = kernels[self.kernel_name]

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _matvec(self, kernel) -> float:
        self._sync()
        t0 = time.perf_counter()
        kernel()
        self._sync()
        return time.perf_counter() - t0

    def run(self) -> dict:
        return {"matvec_s": statistics.median(self._matvec(self.kernel) for _ in range(MATVEC_ITERS)),
                "kernel": self.kernel_name}


class Reads(Subject):
    """The memory-bandwidth limit for each of several byte counts (one per weight format): the time a
    matrix-vector product over exactly that many bytes takes, with the fastest plain read torch has here.
    The dtype is the faster per byte of f32 and the job's (on an AVX2 CPU bf16's kernels read slower than
    f32's: see docs/benchmarks.md), chosen once on the largest size; the kernel (F.linear or torch.mv) per
    size. One matrix of the largest size is held; a smaller size reads its first rows."""

    def __init__(self, job: Job):
        import torch

        from cake.devices import DTYPES

        self.device, hidden, top = torch.device(job.device), SPECS[job.model].hidden, max(job.sizes)
        per_byte = {}
        for name in dict.fromkeys(("f32", job.dtype)):  # one matrix at a time: a GPU shares its memory
            self._make(DTYPES[name], -(-top // (ITEMSIZE[name] * hidden)), hidden)
            per_byte[name] = self._fastest(self.w)[1] / self.w.nbytes
            self.w = None
        self.dtype = min(per_byte, key=per_byte.get)
        self._make(DTYPES[self.dtype], -(-top // (ITEMSIZE[self.dtype] * hidden)), hidden)
        self.views = [self.w[:-(-n // (ITEMSIZE[self.dtype] * hidden))] for n in job.sizes]
        self.kernels = [self._fastest(v)[0] for v in self.views]

    def _make(self, dtype, rows: int, hidden: int) -> None:
        import torch

        # Written, not torch.empty: untouched pages all map the one shared zero page, which reads from cache.
        self.w = torch.full((rows, hidden), 1e-3, dtype=dtype, device=self.device)
        self.x = torch.ones(1, hidden, dtype=dtype, device=self.device)

    def _kernels(self, w) -> dict:
        import torch

        return {"F.linear": lambda: torch.nn.functional.linear(self.x, w), "torch.mv": lambda: torch.mv(w, self.x[0])}

    def _fastest(self, w) -> tuple[str, float]:
        best = {}
        for name, kernel in self._kernels(w).items():
            for _ in range(2):
                self._read(kernel)
            best[name] = min(self._read(kernel) for _ in range(3))
        name = min(best, key=best.get)
        return name, best[name]

    def _read(self, kernel) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        kernel()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def run(self) -> dict:
        return {"reads_s": [statistics.median(self._read(self._kernels(v)[k]) for _ in range(MATVEC_ITERS))
                            for v, k in zip(self.views, self.kernels)],
                "read_kernels": self.kernels, "read_dtype": self.dtype,
                "read_bytes": [v.nbytes for v in self.views]}


class Transformers(Subject):
    """`LlamaForCausalLM.generate`, greedy, on the same weights, device and dtype."""

    def __init__(self, job: Job):
        import torch
        from transformers import LlamaForCausalLM

        self.tokens = job.tokens
        from cake.devices import DTYPES

        self.model = LlamaForCausalLM.from_pretrained(job.model_dir, dtype=DTYPES[job.dtype]).to(job.device).eval()
        self.ids = torch.tensor([prompt_ids(job.prompt_tokens)], device=job.device)
        self._generate(self.tokens)  # a full run: on a GPU a shorter one leaves kernels for later lengths cold

    def _generate(self, tokens: int) -> Run:
        import torch
        from transformers.generation.streamers import BaseStreamer

        from cake.synthetic import END_OF_TEXT

        class TokenClock(BaseStreamer):
            """Notes when generate hands over each token; its first call carries the prompt."""

            def __init__(self) -> None:
                self.stamps: list[float] = []

            def put(self, value) -> None:
                self.stamps.append(time.perf_counter())

            def end(self) -> None:
                pass

        clock = TokenClock()
        t0 = time.perf_counter()
        # min_new_tokens keeps an EOS from ending a run early: every run decodes exactly `tokens`.
        self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=tokens,
                            min_new_tokens=tokens, do_sample=False, streamer=clock, pad_token_id=END_OF_TEXT)
        out = clock.stamps[1:]
        return Run(out[0] - t0, out[-1] - out[0], len(out) - 1)

    def run(self) -> dict:
        return asdict(self._generate(self.tokens))


class Cake(Subject):
    """An in-process Master (all layers local, or none with a topology) driven by `cake.generate`."""

    def __init__(self, job: Job):
        from cake import eventloop
        from cake.client import Options
        from cake.master import Master
        from cake.topology import load_topology

        self.job = job
        self.loop = eventloop.new_loop(eventloop.busy_poll_us(job.device, job.busy_poll))
        # Short timeouts: a stuck worker should fail the benchmark in seconds, not after minutes.
        self.master = Master(job.model_dir, load_topology(job.topology), device=job.device, dtype=job.dtype,
                             options=Options(retry_timeout=10.0, request_timeout=120.0, relay=job.relay),
                             compute_in_thread=job.server,
                             quantize=None if job.quantize == "none" else job.quantize, group_size=job.group)
        self.loop.run_until_complete(self.master.connect())
        self.prompt = prompt_ids(job.prompt_tokens)
        self.loop.run_until_complete(self._generate(self.prompt, job.tokens))  # warm-up, as measured

    def _totals(self) -> list[StageSplit]:
        return [StageSplit(str(st.stage), st.stats.calls, st.stats.total_s, st.stats.compute_s)
                for st in self.master.stages]

    async def _generate(self, prompt: list[int], tokens: int) -> tuple[Run, list[StageSplit]]:
        """One greedy generation of exactly `tokens` tokens (no EOS stops it); the stage split covers
        its decode steps only."""
        from cake.generate import GenerationStats, generate
        from cake.sampling import SamplingParams

        stats = GenerationStats()
        before: list[StageSplit] | None = None
        async for _ in generate(self.master, prompt, SamplingParams(temperature=0.0), tokens, (), stats):
            if before is None:  # the prefill step is done and no decode step has started
                before = self._totals()
        split = [a - b for a, b in zip(self._totals(), before or [])]
        return Run(stats.ttft_s, stats.decode_s, stats.generated - 1), split

    def run(self) -> dict:
        run, split = self.loop.run_until_complete(self._generate(self.prompt, self.job.tokens))
        return {**asdict(run), "stages": [asdict(s) for s in split]}

    def concurrent(self, sessions: int) -> dict:
        """Aggregate decode tok/s of `sessions` generations gathered on this one master."""
        import asyncio

        from cake.generate import generate
        from cake.sampling import SamplingParams

        stamps: list[list[float]] = [[] for _ in range(sessions)]

        async def one(i: int) -> None:
            prompt = prompt_ids(self.job.prompt_tokens, seed=i)
            async for _ in generate(self.master, prompt, SamplingParams(temperature=0.0), self.job.tokens, ()):
                stamps[i].append(time.perf_counter())

        async def gathered() -> None:
            await asyncio.gather(*(one(i) for i in range(sessions)))

        self.loop.run_until_complete(gathered())
        return {"tok_s": steady_rate(stamps)}

    def _matrices(self) -> dict[str, list]:
        """The matrices this master multiplies in a decode step, by kind: its layers' and the head."""
        layers = [self.master.stack.layers[i] for i in self.master.stack.indices]
        out = {kind: [w for layer in layers if (w := getattr(layer, kind, None)) is not None]
               for kind in ("wqkv", "wo", "w13", "w2")}  # a Llama decoder layer's four (fused) matrices
        return {**{k: v for k, v in out.items() if v}, "head": [self.master.head.lm_head]}

    def products(self, passes: int = 3) -> dict:
        """One decode step's matrix products alone, with cake's own kernels on the weights this master
        holds (a one-row input, as a decode step has): seconds per kind, the median of `passes`."""
        import torch

        from cake.model.kernels import linear

        dev, dtype = self.master.device, self.master.dtype
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        times: dict[str, list[float]] = {}
        with torch.inference_mode():
            for _ in range(passes):
                for kind, ws in self._matrices().items():
                    k = getattr(ws[0], "in_features", None) or ws[0].shape[1]
                    x = torch.ones(1, k, dtype=dtype, device=dev)
                    sync()
                    t0 = time.perf_counter()
                    for w in ws:
                        linear(x, w)
                    sync()
                    times.setdefault(kind, []).append(time.perf_counter() - t0)
        return {"products_s": {kind: statistics.median(t) for kind, t in times.items()}}

    def finish(self) -> dict:
        from cake.model.quant import QuantLinear

        self.loop.run_until_complete(self.master.close())
        chosen = sorted({w.kernel_name for ws in self._matrices().values() for w in ws if isinstance(w, QuantLinear)})
        return {"weight_bytes": self.master.stack.weight_bytes + self.master.head.weight_bytes, "kernels": chosen}


SUBJECTS: dict[str, type[Subject]] = {
    "build": Build,
    "bandwidth": Bandwidth,
    "reads": Reads,
    "transformers": Transformers,
    "cake-local": Cake,
    "cake-local-server": Cake,
    "cake-workers": Cake,
    "cake-workers-no-relay": Cake,
    "cake-workers-no-poll": Cake,
}


def child_main(job_json: str) -> None:
    """Serve one measured thing to the parent: a JSON line per command read from stdin."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever a library prints goes to the log, never into the answers
    job = Job(**json.loads(job_json))

    def answer(d: dict) -> None:
        answers.write(json.dumps(d) + "\n")

    try:
        subject = SUBJECTS[job.kind](job)
        answer({"ready": True})
        for line in sys.stdin:
            command, *arg = line.split()
            if command == "run":
                answer(subject.run())
            elif command == "concurrent":
                answer(subject.concurrent(int(arg[0])))
            elif command == "products":
                answer(subject.products())
            elif command == "finish":
                torch = sys.modules.get("torch")
                answer({**subject.finish(), "peak_rss": peak_rss(),
                        "threads": torch.get_num_threads() if torch else 0, "cpus": cpu_list()})
                return
    except CakeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


# ---- the parent: processes ----------------------------------------------------------------------------

def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.exists() else []
    return lines[-1].strip() if lines else "no output"


class Child:
    """A child process serving one Subject; its stderr goes to `<logs>/<name>.log` (name: the job's kind
    unless given)."""

    def __init__(self, job: Job, logs: Path, wrap: list[str] | None = None, name: str | None = None):
        self.kind, self.log = name or job.kind, logs / f"{name or job.kind}.log"
        env = dict(os.environ)
        if job.kind in NATIVE_KINDS:
            env[NATIVE_OMP] = "1"
            if USER_GOMP_SPINCOUNT is None:
                env.pop("GOMP_SPINCOUNT", None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([*(wrap or []), sys.executable, str(SCRIPT), "--child", json.dumps(asdict(job))],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                         env=env)

    def ask(self, command: str | None = None) -> dict:
        """Send a command (None: just wait for the ready line) and return the answer."""
        try:
            if command:
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            rc = self.proc.wait()
            raise CakeError(f"{self.kind} measurement failed (exit {rc}): {last_line(self.log)} [log: {self.log}]")
        return json.loads(line)

    def stop(self) -> None:
        launch.stop(self.proc)


@contextmanager
def child(job: Job, logs: Path, wrap: list[str] | None = None, name: str | None = None) -> Iterator[Child]:
    c = Child(job, logs, wrap, name)
    try:
        yield c
    finally:
        c.stop()


def ensure_model(spec: ModelSpec, workdir: Path) -> Path:
    path = workdir / "models" / spec.folder
    if not (path / "config.json").exists():
        progress(f"building the {spec.name} model in {path} (once; reused by later runs)")
        path.parent.mkdir(parents=True, exist_ok=True)
        with child(Job("build", spec.name, str(path)), path.parent) as c:
            c.ask()
            c.ask("finish")
    return path


@dataclass
class Cluster:
    topology: Path
    procs: dict[str, subprocess.Popen]

    def peak_rss(self) -> dict[str, int | None]:
        return {name: peak_rss(p.pid) for name, p in self.procs.items()}

    def cpus(self) -> dict[str, str | None]:
        return {name: cpu_list(p.pid) for name, p in self.procs.items()}


def worker_ranges(layers: int, count: int = 2) -> dict[str, tuple[int, int]]:
    """The layers of `count` workers (worker-a, worker-b, ...) in contiguous ranges as even as can be."""
    bounds = [layers * i // count for i in range(count + 1)]
    return {f"worker-{chr(ord('a') + i)}": (bounds[i], bounds[i + 1]) for i in range(count)}


def physical_order(cpus: list[int], siblings: dict[int, set[int]] | None = None) -> list[int]:
    """`cpus` with the hardware threads of one physical core side by side (Linux numbers a core's two
    hyperthreads i and i + n/2, say), so that consecutive slices give nodes whole cores of their own.
    `siblings`: CPU -> the CPUs of its physical core (default: as /sys lists them)."""
    if siblings is None:
        siblings = {}
        for c in cpus:
            try:
                text = Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text()
            except OSError:
                continue
            siblings[c] = {int(x) for part in text.strip().split(",") if part
                           for x in (range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))}
    order: list[int] = []
    for c in sorted(cpus):
        if c not in order:
            order += sorted(({c} | siblings.get(c, set())) & set(cpus))
    return order


def core_sets(nodes: int, per_node: int, available: list[int] | None = None) -> tuple[tuple[int, ...], ...]:
    """Disjoint sets of `per_node` CPUs, one per node, from the CPUs this process may use (a physical
    core's hardware threads together: see physical_order)."""
    if available is None:
        if not hasattr(os, "sched_getaffinity"):
            raise CakeError("--cores-per-node pins processes to CPUs, which needs Linux")
        available = physical_order(sorted(os.sched_getaffinity(0)))
    need = nodes * per_node
    if need > len(available):
        raise CakeError(f"--cores-per-node {per_node} needs {need} CPU cores (a master and {nodes - 1} worker(s)), "
                        f"but this machine lets the benchmark use {len(available)}; lower --cores-per-node or --workers")
    return tuple(tuple(available[i * per_node:(i + 1) * per_node]) for i in range(nodes))


def cpu_list(pid: int | None = None) -> str | None:
    """The CPUs a process may run on, as the kernel lists them ("0-3"); None where unknown."""
    return proc_status("Cpus_allowed_list", pid)


@dataclass(frozen=True)
class Placement:
    """How many loopback workers the benchmark runs, and where each node runs. Unpinned (no `cores`),
    every process shares every core, as on one machine. Pinned, node 0 (the master, and each all-local,
    transformers and matvec process, which run one at a time) and each worker get CPUs of their own, with
    a thread per CPU: what separate machines would give each node, but one memory bus for all."""
    workers: int = 2
    cores: tuple[tuple[int, ...], ...] = ()

    @property
    def label(self) -> str:
        return f"{self.workers} worker{'s' if self.workers != 1 else ''}"

    def ranges(self, layers: int) -> dict[str, tuple[int, int]]:
        return worker_ranges(layers, self.workers)

    def wrap(self, node: int) -> list[str]:
        """The launcher that pins node `node` (0: the master's set; i: worker i), or nothing."""
        if not self.cores:
            return []
        return [sys.executable, str(SCRIPT), RUN_ON, ",".join(map(str, self.cores[node]))]

    def describe(self, layers: int) -> str:
        """The report's line for a pinned run (one with `cores`)."""
        show = lambda cpus: ",".join(map(str, cpus))  # noqa: E731
        workers = "; ".join(f"{name} on {show(cpus)}" for name, cpus in zip(self.ranges(layers), self.cores[1:]))
        return (f"PINNED: each node on {len(self.cores[0])} CPU core(s) of its own, a thread per core "
                f"(--cores-per-node): the master and the all-local, transformers and matvec processes on "
                f"{show(self.cores[0])}; {workers}; OMP_NUM_THREADS set to match")


def write_topology(path: Path, ranges: dict[str, tuple[int, int]], ports: dict[str, int]) -> None:
    launch.write_topology(path, {name: (ports[name], [f"model.layers.{start}-{end - 1}"])
                                 for name, (start, end) in ranges.items()}, "benchmark worker")


async def proxy_main(spec: dict) -> None:
    """Forward each route's listen port to its target port on 127.0.0.1, holding every chunk of bytes
    `delay_ms` in each direction: a network's latency on loopback, for --link-delay-ms."""
    import asyncio
    import socket

    loop = asyncio.get_running_loop()
    delay = spec["delay_ms"] / 1e3

    def nodelay(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:  # in order, each chunk once its delay is up
            while (item := await queue.get())[1]:
                wait = item[0] - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(item[1])
                await writer.drain()

        task = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(1 << 20):
                queue.put_nowait((loop.time() + delay, data))
        except ConnectionError:
            pass
        finally:
            queue.put_nowait((0.0, b""))
            try:
                await task
            except Exception:  # the other side went away: nothing left to deliver
                pass
            writer.close()

    async def connection(listen_reader, listen_writer, target: int) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            listen_writer.close()  # the worker is down: so is the emulated link
            return
        nodelay(listen_writer)
        nodelay(target_writer)
        await asyncio.gather(pipe(listen_reader, target_writer), pipe(target_reader, listen_writer),
                             return_exceptions=True)

    for listen, target in spec["routes"]:
        await asyncio.start_server(lambda r, w, t=target: connection(r, w, t), "127.0.0.1", listen)
    print("ready", flush=True)
    await asyncio.Event().wait()


@contextmanager
def running_workers(model_dir: Path, layers: int, logs: Path, device: str, dtype: str,
                    link_delay_ms: float = 0.0, busy_poll_us: int = 0, suffix: str = "",
                    placement: Placement = Placement(), extra: tuple[str, ...] = (),
                    timeout: float = WORKER_START_TIMEOUT) -> Iterator[Cluster]:
    """`cake --mode worker` processes on loopback (two unless `placement` says otherwise), each serving
    a contiguous share of the layers, on the CPUs `placement` gives them; always stopped. With a link
    delay, the topology sends everyone (master and workers) through a delaying proxy. `suffix` names a
    second set's topology and logs; `extra` is added to each worker's command line (--quantize)."""
    ranges = placement.ranges(layers)
    ports = {name: launch.free_port() for name in ranges}
    reached = {name: launch.free_port() for name in ranges} if link_delay_ms > 0 else ports
    topology = logs / f"topology{suffix}.yml"
    write_topology(topology, ranges, reached)
    procs: dict[str, subprocess.Popen] = {}
    try:
        if link_delay_ms > 0:
            spec = {"delay_ms": link_delay_ms, "routes": [[reached[n], ports[n]] for n in ranges]}
            procs["proxy"] = subprocess.Popen([sys.executable, str(SCRIPT), "--proxy", json.dumps(spec)],
                                              stdout=subprocess.PIPE, text=True)
            if procs["proxy"].stdout.readline().strip() != "ready":
                raise CakeError("the --link-delay-ms proxy failed to start")
        for node, name in enumerate(ranges, start=1):
            log = logs / f"{name}{suffix}.log"
            log.unlink(missing_ok=True)
            procs[name] = launch.start_worker(model_dir, name, topology, ports[name], "--device", device,
                                              "--dtype", dtype, "--busy-poll", str(busy_poll_us), *extra, log=log,
                                              wrap=placement.wrap(node))
        for name in ranges:
            try:
                launch.wait_ready(ports[name], procs[name], timeout)
            except CakeError as e:
                log = logs / f"{name}{suffix}.log"
                raise CakeError(f"{name} failed to start ({e}): {last_line(log)} [log: {log}]") from None
        yield Cluster(topology, {name: procs[name] for name in ranges})
    finally:
        for proc in procs.values():
            launch.stop(proc)


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

    def product_s(self, kind: str | None = None) -> float:
        """Median over rounds of one decode step's products of `kind` (None: all kinds)."""
        return statistics.median(sum(p.values()) if kind is None else p[kind] for p in self.products)


def measure(spec: ModelSpec, model_dir: Path, weights: WeightBytes, prompt_tokens: int, tokens: int, repeats: int,
            logs: Path, device: str, dtype: str, link_delay_ms: float = 0.0, busy_poll_us: int = 0,
            placement: Placement = Placement()) -> tuple[dict[str, Measured], dict[str, int | None], dict]:
    """Every figure of one model, in interleaved rounds; returns what each child measured, and the
    workers' peak RSS and CPUs. With busy-polling on, a second set of workers and a master without it
    too. A master with relay off only where there are two workers or more to relay between."""
    with ExitStack() as stack:
        label = placement.label
        pairs = f"{label} (and {placement.workers} more without busy-polling)" if busy_poll_us > 0 else label
        progress(f"{spec.name}: starting {pairs}, then the transformers, cake and matvec processes")
        cluster = stack.enter_context(running_workers(model_dir, spec.layers, logs, device, dtype, link_delay_ms,
                                                      busy_poll_us, placement=placement))
        base = Job("", spec.name, str(model_dir), prompt_tokens, tokens, device=device, dtype=dtype,
                   busy_poll=str(busy_poll_us))
        jobs = {"bandwidth": replace(base, kind="bandwidth", nbytes=weights.decode_step),
                "transformers": replace(base, kind="transformers"),
                "cake-local": replace(base, kind="cake-local"),
                "cake-local-server": replace(base, kind="cake-local-server", server=True),
                "cake-workers": replace(base, kind="cake-workers", topology=str(cluster.topology))}
        if placement.workers > 1:
            jobs["cake-workers-no-relay"] = replace(base, kind="cake-workers-no-relay", topology=str(cluster.topology),
                                                    relay=False)
        if busy_poll_us > 0:
            plain = stack.enter_context(running_workers(model_dir, spec.layers, logs, device, dtype, link_delay_ms,
                                                        0, suffix="-no-poll", placement=placement))
            jobs["cake-workers-no-poll"] = replace(base, kind="cake-workers-no-poll", topology=str(plain.topology),
                                                   busy_poll="0")
        kids = {kind: stack.enter_context(child(job, logs, placement.wrap(0))) for kind, job in jobs.items()}
        for kid in kids.values():
            kid.ask()  # set up and warmed up
        out = {kind: Measured() for kind in kids}
        for i in range(repeats):
            progress(f"{spec.name}: round {i + 1}/{repeats}")
            for kind, kid in kids.items():
                if kind in ("cake-workers", "cake-workers-no-poll"):
                    # Unmeasured: the workers have been idle through the other processes' turns, and the
                    # first prompt after seconds idle takes longer (measured: 150-190 against ~100 ms on
                    # the big bf16 model), which would fall on whichever master uses them first.
                    kid.ask("run")
                out[kind].add_run(kid.ask("run"))
        progress(f"{spec.name}: {', '.join(map(str, SESSIONS))} concurrent sessions on the {label}")
        pipelines = [k for k in ("cake-workers", "cake-workers-no-poll") if k in kids]
        for _ in range(repeats):
            for n in SESSIONS:  # interleaved too, so load drift hits every level alike
                for kind in pipelines:
                    # The busy-polling set spins for its window after its last message, on the cores the
                    # other set uses when pinned: let it stop first.
                    time.sleep(2 * busy_poll_us / 1e6)
                    out[kind].concurrency.setdefault(n, []).append(kids[kind].ask(f"concurrent {n}")["tok_s"])
        for kind, kid in kids.items():
            out[kind].add_finish(kid.ask("finish"))
        # Read before the workers stop: /proc forgets a process once it exits.
        return out, cluster.peak_rss(), cluster.cpus()


# ---- the parent: figures ------------------------------------------------------------------------------

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
            "spec": asdict(self.spec), "prompt_tokens": self.prompt_tokens, "tokens": self.tokens,
            "repeats": self.repeats, "link_delay_ms": self.link_delay_ms, "busy_poll_us": self.busy_poll_us,
            "workers": self.placement.workers, "cores_per_node": [list(c) for c in self.placement.cores],
            "cpus": {"worker": self.worker_cpus, "master": self.workers.cpus, "all_local": self.local.cpus},
            "weights": {"total": self.weights.total, "decode_step": self.weights.decode_step,
                        "master": self.weights.master, "layers": self.weights.layers},
            "speed": speeds,
            "bandwidth": {"matvec_s": self.matvec_s, "gb_per_s": self.weights.decode_step / self.matvec_s / 1e9,
                          "bound_tps": self.bound_tps},
            "hop_overhead_us": self.hop_overhead_us,
            "worker_rss": self.worker_rss,
            "aggregate_tps": {n: self.aggregate(n) for n in self.workers.concurrency},
            **({"aggregate_tps_no_poll": {n: self.aggregate(n, self.no_poll) for n in self.no_poll.concurrency}}
               if self.no_poll is not None and self.no_poll.concurrency else {}),
            "targets": [{**asdict(t), "passed": t.passed} for t in self.targets()],
            "raw": {k: asdict(m) for k, m in [("bandwidth", self.bandwidth), *measured]},
        }


def bench_model(spec: ModelSpec, workdir: Path, prompt_tokens: int, tokens: int, repeats: int,
                device: str = "cpu", dtype: str = "f32", link_delay_ms: float = 0.0,
                busy_poll_us: int = 0, placement: Placement = Placement()) -> ModelResult:
    model_dir = ensure_model(spec, workdir)
    weights = WeightBytes.read(model_dir).in_dtype(dtype, spec.stored)
    logs = workdir / "runs" / spec.name
    logs.mkdir(parents=True, exist_ok=True)
    m, worker_rss, worker_cpus = measure(spec, model_dir, weights, prompt_tokens, tokens, repeats, logs, device,
                                         dtype, link_delay_ms, busy_poll_us, placement)
    return ModelResult(spec, weights, prompt_tokens, tokens, repeats, m["bandwidth"], m["transformers"],
                       m["cake-local"], m["cake-workers"], worker_rss, device, dtype, m.get("cake-workers-no-relay"),
                       m.get("cake-workers-no-poll"), busy_poll_us, link_delay_ms, m.get("cake-local-server"),
                       placement, worker_cpus)


# ---- quantized weights (issue 16) ----------------------------------------------------------------------

@dataclass(frozen=True)
class Format:
    """One row of the quantized comparison: how the weights are held, and the dtype the products run in."""
    scheme: str  # none, int8 or int4
    dtype: str

    @property
    def label(self) -> str:
        return self.dtype if self.scheme == "none" else self.scheme


def quant_formats(schemes: list[str], dtype: str, quant_dtype: str) -> list[Format]:
    """The rows: the unquantized model at --dtype (unless that is --quant-dtype) and at --quant-dtype, then
    each quantized scheme with --quant-dtype activations."""
    return ([Format("none", d) for d in dict.fromkeys((dtype, quant_dtype))]
            + [Format(s, quant_dtype) for s in schemes if s != "none"])


@dataclass
class QuantResult:
    spec: ModelSpec
    formats: list[Format]
    quant_dtype: str
    group: int
    held: dict[str, WeightBytes]  # format label -> what a node holds, by held_bytes' formulas
    local: dict[str, Measured]  # format label -> cake all-local
    workers: dict[str, Measured]  # quantized format label -> the master of loopback workers, all quantized
    worker_rss: dict[str, dict[str, int | None]]  # quantized format label -> worker -> peak RSS
    reads: Measured  # the bandwidth limit for each format's decode step, in the order of `formats`
    prompt_tokens: int
    tokens: int
    repeats: int
    device: str = "cpu"
    placement: Placement = Placement()

    @property
    def base(self) -> str:
        """The row the quantized ones are compared with: unquantized, at the quantized rows' dtype."""
        return Format("none", self.quant_dtype).label

    @property
    def quantized(self) -> list[Format]:
        return [f for f in self.formats if f.scheme != "none"]

    def speed(self, m: Measured) -> Speed:
        return Speed.of(m, self.prompt_tokens)

    def limit_ms(self, label: str) -> float:
        i = [f.label for f in self.formats].index(label)
        return 1e3 * statistics.median(r[i] for r in self.reads.reads_s)

    def of_limit(self, label: str) -> float:
        return self.limit_ms(label) / self.speed(self.local[label]).decode_ms

    def vs_base(self, label: str, m: Measured | None = None) -> float:
        return self.speed(self.local[self.base]).decode_ms / self.speed(m or self.local[label]).decode_ms

    def targets(self) -> list[Target]:
        ts = []
        if self.spec.name in QUANT_TARGET_MODELS and self.device == "cpu":
            for f in self.quantized:
                ts.append(Target(f"{f.label} decode / {self.base} decode (all-local)", self.vs_base(f.label),
                                 QUANT_VS_BASE[f.scheme], "x", True))
            for f in self.formats:
                ts.append(Target(f"{f.label} decode / its bandwidth limit", self.of_limit(f.label), QUANT_OF_LIMIT,
                                 "x", True))
        for label, rss in self.worker_rss.items():
            held = self.held[label]
            for worker, (start, end) in self.placement.ranges(self.spec.layers).items():
                if rss.get(worker) is not None:
                    ts.append(Target(f"{label} {worker} peak RSS (layers {start}-{end - 1} as {label} + 400 MB)",
                                     rss[worker] / MB, (held.layer_range(start, end) + RSS_SLACK) / MB, "MB", False))
            if self.workers[label].peak_rss is not None:
                ts.append(Target(f"{label} master peak RSS (embed + head as {label} + 400 MB)",
                                 self.workers[label].peak_rss / MB, (held.master + RSS_SLACK) / MB, "MB", False))
        return ts

    def to_json(self) -> dict:
        rows = {}
        for f in self.formats:
            m, held = self.local[f.label], self.held[f.label]
            rows[f.label] = {
                "scheme": f.scheme, "dtype": f.dtype, "speed": asdict(self.speed(m)),
                "weights_held": held.total, "decode_step_bytes": held.decode_step,
                "weight_bytes_reported": m.weight_bytes, "kernels": m.kernels,
                "limit_ms": self.limit_ms(f.label), "of_limit": self.of_limit(f.label),
                "vs_base": self.vs_base(f.label),
                "products_ms": {k: 1e3 * m.product_s(k) for k in m.products[0]} if m.products else {},
            }
        workers = {label: {"speed": asdict(self.speed(m)), "vs_base": self.vs_base(label, m),
                           "worker_rss": self.worker_rss[label], "master_weight_bytes": m.weight_bytes,
                           "layers_held": {w: self.held[label].layer_range(a, b)
                                           for w, (a, b) in self.placement.ranges(self.spec.layers).items()},
                           "master_held": self.held[label].master}
                   for label, m in self.workers.items()}
        return {"quant_dtype": self.quant_dtype, "group": self.group, "base": self.base,
                "formats": [f.label for f in self.formats], "rows": rows, "workers": workers,
                "reads": {"dtype": self.reads.read_dtype, "kernels": self.reads.read_kernels,
                          "bytes": self.reads.read_bytes, "reads_s": self.reads.reads_s},
                "targets": [{**asdict(t), "passed": t.passed} for t in self.targets()]}


def measure_quant(spec: ModelSpec, model_dir: Path, formats: list[Format], held: dict[str, WeightBytes],
                  group: int, prompt_tokens: int, tokens: int, repeats: int, logs: Path, device: str,
                  busy_poll_us: int = 0, placement: Placement = Placement()) -> tuple[dict[str, Measured], dict]:
    """Every format's figures in interleaved rounds, as `measure` takes its own: an all-local master per
    format (its decode, then its matrix products alone), loopback workers and their master per quantized
    format, and one process timing the reads that bound each format. Returns what each child measured
    (keys local-<label>, workers-<label>, reads) and each quantized cluster's workers' peak RSS."""
    timeout = max(WORKER_START_TIMEOUT, 60 * WeightBytes.read(model_dir).total / 1e9)  # an 8B takes minutes
    with ExitStack() as stack:
        quantized = [f for f in formats if f.scheme != "none"]
        progress(f"{spec.name}: starting {placement.label} for each of {', '.join(f.label for f in quantized)}, "
                 f"then cake all-local for each of {', '.join(f.label for f in formats)}, and the reads")
        clusters = {f.label: stack.enter_context(running_workers(
            model_dir, spec.layers, logs, device, f.dtype, 0.0, busy_poll_us, suffix=f"-{f.label}",
            placement=placement, extra=("--quantize", f.scheme, "--group-size", str(group)), timeout=timeout))
            for f in quantized}
        base = Job("", spec.name, str(model_dir), prompt_tokens, tokens, device=device, busy_poll=str(busy_poll_us),
                   group=group)
        jobs = {f"local-{f.label}": replace(base, kind="cake-local", dtype=f.dtype, quantize=f.scheme)
                for f in formats}
        jobs.update({f"workers-{f.label}": replace(base, kind="cake-workers", dtype=f.dtype, quantize=f.scheme,
                                                   topology=str(clusters[f.label].topology)) for f in quantized})
        jobs["reads"] = replace(base, kind="reads", dtype=formats[-1].dtype,
                                sizes=[held[f.label].decode_step for f in formats])
        kids = {key: stack.enter_context(child(job, logs, placement.wrap(0), name=f"quant-{key}"))
                for key, job in jobs.items()}
        for kid in kids.values():
            kid.ask()
        out = {key: Measured() for key in kids}
        for i in range(repeats):
            progress(f"{spec.name}: quantized weights, round {i + 1}/{repeats}")
            for key, kid in kids.items():
                if key.startswith("workers-"):
                    kid.ask("run")  # unmeasured: the workers have been idle (see measure)
                out[key].add_run(kid.ask("run"))
                if key.startswith("local-"):
                    out[key].products.append(kid.ask("products")["products_s"])
        for key, kid in kids.items():
            out[key].add_finish(kid.ask("finish"))
        return out, {label: c.peak_rss() for label, c in clusters.items()}


def bench_quant(spec: ModelSpec, workdir: Path, schemes: list[str], dtype: str, quant_dtype: str, group: int,
                prompt_tokens: int, tokens: int, repeats: int, device: str = "cpu", busy_poll_us: int = 0,
                placement: Placement = Placement()) -> QuantResult:
    model_dir = ensure_model(spec, workdir)
    formats = quant_formats(schemes, dtype, quant_dtype)
    held = {f.label: WeightBytes.held(model_dir, f.dtype, f.scheme, group) for f in formats}
    logs = workdir / "runs" / spec.name
    logs.mkdir(parents=True, exist_ok=True)
    m, worker_rss = measure_quant(spec, model_dir, formats, held, group, prompt_tokens, tokens, repeats, logs, device,
                                  busy_poll_us, placement)
    return QuantResult(spec, formats, quant_dtype, group, held, {f.label: m[f"local-{f.label}"] for f in formats},
                       {f.label: m[f"workers-{f.label}"] for f in formats if f.scheme != "none"}, worker_rss,
                       m["reads"], prompt_tokens, tokens, repeats, device, placement)


# ---- the parent: report -------------------------------------------------------------------------------

def table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned numbers."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / MB:.0f}"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        from importlib.metadata import version
        torch_version = version("torch")
    except Exception:  # an unusual install: the figure is informative only
        torch_version = "?"
    return f"{cpu}, {os.cpu_count()} cores; torch {torch_version}"


def report(r: ModelResult, quick: bool) -> str:
    s, w = r.spec, r.weights
    hf, local, workers = r.speed(r.transformers), r.speed(r.local), r.speed(r.workers)
    label = r.placement.label
    out = [f"== {s.name}: {s.describe()}; {w.total / MB:.0f} MB {r.dtype} on {r.device}, a decode step reads "
           f"{w.decode_step / MB:.0f} MB ==",
           f"prompt {r.prompt_tokens} tokens, {r.tokens} decode tokens, median of {r.repeats} run(s) after a "
           f"warm-up; {r.local.threads} torch thread(s) per process; {machine()}"]
    if quick:
        out.append("QUICK MODE: a check that the benchmark runs (few tokens, few runs); not figures to quote")
    if r.placement.cores:
        out.append(r.placement.describe(s.layers))
    if r.link_delay_ms:
        out.append(f"EMULATED NETWORK: every connection to a worker goes through a local proxy that holds each "
                   f"chunk {r.link_delay_ms:g} ms each way (--link-delay-ms); worker figures include it"
                   + ("; the proxy is not pinned" if r.placement.cores else ""))

    def speed_row(label: str, sp: Speed) -> list[str]:
        return [label, f"{sp.decode_ms:.2f}", f"{sp.decode_tps:.1f}", f"{sp.prefill_tps:.0f}", f"{sp.ttft_ms:.1f}",
                mb(sp.peak_rss)]

    out += ["", table(["speed", "decode ms/tok", "decode tok/s", "prefill tok/s", "TTFT ms", "peak RSS MB"], [
        speed_row("transformers generate", hf),
        speed_row("cake all-local", local),
        *([speed_row("cake all-local, API server", r.speed(r.local_server))] if r.local_server else []),
        speed_row(f"cake {label} (master)", workers),
        *([speed_row(f"cake {label}, no relay", r.speed(r.no_relay))] if r.no_relay else []),
        *([speed_row(f"cake {label}, no busy-poll", r.speed(r.no_poll))] if r.no_poll else []),
        ["bandwidth limit (matvec)", f"{1e3 * r.matvec_s:.2f}", f"{r.bound_tps:.1f}", "-", "-", "-"],
    ])]
    out.append(f"matvec ({r.bandwidth.kernel}) reads {w.decode_step / r.matvec_s / 1e9:.1f} GB/s; "
               f"cake all-local reaches {local.decode_tps / r.bound_tps:.2f} of the limit, "
               f"{label} {workers.decode_tps / r.bound_tps:.2f}; "
               f"cake all-local / transformers {local.decode_tps / hf.decode_tps:.2f}x")

    out += ["", table(["decode time per token", "ms/tok", "compute", "network"],
                      split_rows("all-local", r.local, local) + split_rows(label, r.workers, workers))]
    out.append(f"per-hop overhead: ({workers.decode_ms:.2f} - {local.decode_ms:.2f}) ms / {r.hops} hop(s) = "
               f"{r.hop_overhead_us:.0f} us")
    if r.no_poll:
        plain = r.speed(r.no_poll)
        out.append(f"busy-poll ({r.busy_poll_us} us, workers and master): {workers.decode_ms:.2f} ms/tok against "
                   f"{plain.decode_ms:.2f} without, {1e3 * (plain.decode_ms - workers.decode_ms):.0f} us a token saved")
    if r.no_relay:
        star = r.speed(r.no_relay)
        chain = " -> ".join(name.split("-")[-1] for name in r.placement.ranges(s.layers))
        out.append(f"relay ({chain}, the last answers the master): {workers.decode_ms:.2f} ms/tok against "
                   f"{star.decode_ms:.2f} through the master, {1e3 * (star.decode_ms - workers.decode_ms):.0f} us "
                   f"a token saved")

    mem = [[f"{name} (layers {a}-{b - 1})", mb(r.worker_rss.get(name)), mb(w.layer_range(a, b)),
            mb(w.layer_range(a, b) + RSS_SLACK)] for name, (a, b) in r.placement.ranges(s.layers).items()]
    mem.append(["master (no layers)", mb(workers.peak_rss), mb(w.master), mb(w.master + RSS_SLACK)])
    out += ["", table(["peak RSS", "MB", "weights MB", "budget MB"], mem)]

    if r.workers.concurrency:
        columns = [(r.workers, "aggregate decode tok/s")]
        if r.no_poll is not None and r.no_poll.concurrency:
            columns.append((r.no_poll, "no busy-poll tok/s"))
        out += ["", table([f"concurrent sessions ({label})", *(h for _, head in columns for h in (head, "x one session"))],
                          [[str(n), *(c for m, _ in columns
                                      for c in (f"{r.aggregate(n, m):.1f}", f"{r.aggregate(n, m) / r.aggregate(1, m):.2f}"))]
                           for n in sorted(r.workers.concurrency)])]

    out += ["", table(["target", "measured", "goal", ""],
                      [[t.check, t.show(t.measured), f"{'>=' if t.at_least else '<='} {t.show(t.goal)}",
                        "PASS" if t.passed else "MISS"] for t in r.targets()])]
    return "\n".join(out)


def quant_report(q: QuantResult, quick: bool) -> str:
    s, base = q.spec, q.base
    schemes = [f.label for f in q.quantized]
    out = [f"== {s.name}: quantized weights; {s.describe()}; on {q.device}; {'/'.join(schemes)} products with "
           f"{q.quant_dtype} activations" + (f", int4 in groups of {q.group}" if "int4" in schemes else "") + " ==",
           f"prompt {q.prompt_tokens} tokens, {q.tokens} decode tokens, median of {q.repeats} run(s) after a warm-up; "
           f"{machine()}"]
    if quick:
        out.append("QUICK MODE: a check that the benchmark runs (few tokens, few runs); not figures to quote")
    if q.placement.cores:
        out.append(q.placement.describe(s.layers))

    rows = []
    for f in q.formats:
        m, held = q.local[f.label], q.held[f.label]
        sp = q.speed(m)
        rows.append([f"{f.label}, all-local", f"{sp.decode_ms:.2f}", f"{sp.decode_tps:.1f}", f"{sp.prefill_tps:.0f}",
                     mb(sp.peak_rss), mb(m.weight_bytes), mb(held.decode_step), f"{q.limit_ms(f.label):.2f}",
                     f"{q.of_limit(f.label):.2f}", f"{q.vs_base(f.label):.2f}", ",".join(m.kernels) or "-"])
    for label, m in q.workers.items():
        sp = q.speed(m)
        rows.append([f"{label}, {q.placement.label} (master)", f"{sp.decode_ms:.2f}", f"{sp.decode_tps:.1f}",
                     f"{sp.prefill_tps:.0f}", mb(sp.peak_rss), mb(m.weight_bytes), "-", "-", "-",
                     f"{q.vs_base(label, m):.2f}", ",".join(m.kernels) or "-"])
    out += ["", table(["format", "decode ms/tok", "decode tok/s", "prefill tok/s", "peak RSS MB", "weights MB",
                       "step reads MB", "limit ms/tok", "of limit", f"x {base}", "quantized kernel"], rows)]
    r = q.reads
    out.append(f"limit: a {r.read_dtype} matrix-vector product over exactly the bytes each format's decode step "
               f"reads ({', '.join(f'{f.label} {k}' for f, k in zip(q.formats, r.read_kernels))}): "
               + ", ".join(f"{f.label} {q.held[f.label].decode_step / q.limit_ms(f.label) / 1e6:.1f} GB/s"
                           for f in q.formats))
    if base in q.local:
        out.append("; ".join(f"{f.label} / {base} decode {q.vs_base(f.label):.2f}x for "
                             f"{q.held[base].decode_step / q.held[f.label].decode_step:.2f}x fewer bytes"
                             for f in q.quantized))

    kinds = list(next((m.products[0] for m in q.local.values() if m.products), {}))
    if kinds:
        prod = []
        for f in q.formats:
            m = q.local[f.label]
            total = m.product_s()
            prod.append([f.label, *(f"{1e3 * m.product_s(k):.2f}" for k in kinds), f"{1e3 * total:.2f}",
                         f"{q.held[f.label].decode_step / total / 1e9:.1f}", f"{q.limit_ms(f.label) / 1e3 / total:.2f}",
                         f"{q.local[base].product_s() / total:.2f}" if base in q.local else "-"])
        out += ["", table(["products alone, ms", *kinds, "all", "GB/s", "of limit", f"x {base}"], prod)]
        out.append("a decode step's matrix products alone, with cake's kernels on the weights the all-local "
                   "master holds (a one-row input), median of 3 passes a round")

    mem = []
    for label, rss in q.worker_rss.items():
        held = q.held[label]
        mem += [[f"{label} {name} (layers {a}-{b - 1})", mb(rss.get(name)), mb(held.layer_range(a, b)),
                 mb(held.layer_range(a, b) + RSS_SLACK)] for name, (a, b) in q.placement.ranges(s.layers).items()]
        mem.append([f"{label} master (no layers)", mb(q.workers[label].peak_rss), mb(held.master),
                    mb(held.master + RSS_SLACK)])
    if mem:
        out += ["", table(["peak RSS, quantized", "MB", "weights MB", "budget MB"], mem)]

    ts = q.targets()
    if ts:
        out += ["", table(["target", "measured", "goal", ""],
                          [[t.check, t.show(t.measured), f"{'>=' if t.at_least else '<='} {t.show(t.goal)}",
                            "PASS" if t.passed else "MISS"] for t in ts])]
    return "\n".join(out)


def split_rows(label: str, m: Measured, sp: Speed) -> list[list[str]]:
    """Each stage's share of a decode token, and what is left for the master's own work."""
    rows, staged = [], 0.0
    for st in m.stages:
        per = 1e3 / st.calls if st.calls else 0.0
        staged += st.total_s * per
        rows.append([f"{label}: {st.name}", f"{st.total_s * per:.2f}", f"{st.compute_s * per:.2f}",
                     f"{max(0.0, st.total_s - st.compute_s) * per:.2f}"])
    rows.append([f"{label}: master embed, head, sampling, loop", f"{sp.decode_ms - staged:.2f}", "", ""])
    return rows


# ---- command line -------------------------------------------------------------------------------------

def default_workdir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cake-bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark cake (all-local and loopback workers) against "
                                            "transformers and the memory-bandwidth limit.")
    p.add_argument("--model", choices=["tiny", "big", "both", "8b"], default=None,
                   help="model size (default: both, which is tiny and big; 8b is Llama 3 8B's shape, 16 GB in bf16, "
                        "for a GPU machine)")
    p.add_argument("--tokens", type=int, default=None, help="decode tokens per run (default: 64)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="prompt length for prefill (default: 128)")
    p.add_argument("--repeats", type=int, default=None, help="measured runs per figure, median reported (default: 3)")
    p.add_argument("--workdir", type=Path, default=default_workdir(),
                   help="models (built once, reused) and per-run logs (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="check the benchmark works: tiny model, 16 tokens, 32-token prompt, 1 run")
    p.add_argument("--json", type=Path, default=None, help="also write every figure and raw timing here")
    p.add_argument("--device", default="cpu", help="every node's and transformers' device: cpu, cuda, cuda:N, mps "
                                                   "(default: cpu); on a GPU, peak RSS counts host memory only")
    p.add_argument("--dtype", choices=list(ITEMSIZE), default="f32", help="every node's and transformers' dtype "
                                                                        "(default: f32)")
    p.add_argument("--link-delay-ms", type=float, default=0.0,
                   help="emulate a network: reach the workers (from the master and from each other) through a "
                        "local proxy that holds every chunk this long each way (default: 0, direct)")
    p.add_argument("--busy-poll", default=None, metavar="US|auto",
                   help="every cake node's --busy-poll (default: $CAKE_BUSY_POLL_US, else auto: on for cuda); "
                        "when on, the workers without it are measured too")
    p.add_argument("--workers", type=int, default=2, help="loopback workers, 1 to 8, each a contiguous share of the "
                                                           "layers (default: 2)")
    p.add_argument("--cores-per-node", type=int, default=0, metavar="N",
                   help="pin the master and each worker to N CPU cores of their own, a thread per core, as on "
                        "separate machines (the all-local, transformers and matvec processes run on the master's; "
                        "OMP_NUM_THREADS is set to N for each); needs N x (workers + 1) cores (default: 0, every "
                        "process shares every core)")
    p.add_argument("--quantize", default="none", metavar="LIST",
                   help="weight formats, comma-separated: none (the benchmark above, at --dtype), int8, int4. A "
                        "quantized one adds a comparison per model: cake all-local unquantized at --dtype and "
                        "--quant-dtype, and quantized, each against the bandwidth limit for the bytes it reads, "
                        "and with --workers quantized workers (default: none)")
    p.add_argument("--quant-dtype", choices=list(ITEMSIZE), default="bf16",
                   help="the dtype of the quantized rows' activations, and of the unquantized row they are compared "
                        "with (default: bf16, the fast path real checkpoints take)")
    p.add_argument("--group-size", type=int, default=32, help="int4: weights per scale and zero (default: 32)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--proxy", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = {"model": "tiny", "tokens": 16, "prompt_tokens": 32, "repeats": 1}
    full = {"model": "both", "tokens": 64, "prompt_tokens": 128, "repeats": 3}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:  # an explicit option wins over --quick
            setattr(args, key, value)
    if args.tokens < 2 or args.prompt_tokens < 1 or args.repeats < 1:
        p.error("--tokens must be at least 2, --prompt-tokens and --repeats at least 1")
    if not 0 <= args.link_delay_ms <= 10_000:
        p.error("--link-delay-ms must be between 0 and 10000")
    if not 1 <= args.workers <= 8:
        p.error("--workers must be between 1 and 8")
    if args.cores_per_node < 0:
        p.error("--cores-per-node must be 0 (off) or more")
    args.quantize = [x.strip().lower() for x in args.quantize.split(",") if x.strip()]
    if not args.quantize or any(x not in SCHEMES for x in args.quantize):
        p.error(f"--quantize takes a comma-separated list of {', '.join(SCHEMES)}")
    if args.group_size < 2 or args.group_size % 2:
        p.error("--group-size must be an even number of 2 or more")
    if not args.child:
        from cake import eventloop

        try:
            args.busy_poll = eventloop.busy_poll_us(args.device, args.busy_poll)
            cores = core_sets(args.workers + 1, args.cores_per_node) if args.cores_per_node else ()
        except CakeError as e:
            p.error(str(e))
        args.placement = Placement(args.workers, cores)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return
    if args.proxy:
        import asyncio

        asyncio.run(proxy_main(json.loads(args.proxy)))
        return
    # A plain `kill` unwinds like Ctrl-C, so the workers started here are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = ["tiny", "big"] if args.model == "both" else [args.model]
    quantized = [x for x in args.quantize if x != "none"]
    results: dict[str, ModelResult] = {}
    quant: dict[str, QuantResult] = {}
    try:
        for n in names:
            if "none" in args.quantize:
                results[n] = bench_model(SPECS[n], args.workdir, args.prompt_tokens, args.tokens, args.repeats,
                                         args.device, args.dtype, args.link_delay_ms, args.busy_poll, args.placement)
            if quantized:
                quant[n] = bench_quant(SPECS[n], args.workdir, quantized, args.dtype, args.quant_dtype,
                                       args.group_size, args.prompt_tokens, args.tokens, args.repeats, args.device,
                                       args.busy_poll, args.placement)
    except CakeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sections = []
    for n in names:
        sections += [report(results[n], args.quick)] if n in results else []
        sections += [quant_report(quant[n], args.quick)] if n in quant else []
    print("\n\n".join(sections))
    if args.json:
        models = {n: {**(results[n].to_json() if n in results else {}),
                      **({"quantized": quant[n].to_json()} if n in quant else {})} for n in names}
        args.json.write_text(json.dumps({"machine": machine(), "quick": args.quick, "models": models}, indent=2))


if __name__ == "__main__":
    main()
