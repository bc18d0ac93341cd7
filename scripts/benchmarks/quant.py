"""Quantized weights (issue 16): cake all-local unquantized and int8/int4, each against the bandwidth limit
for the bytes it reads, its matrix products alone, and quantized loopback workers."""

from __future__ import annotations

import statistics
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .children import Job, child, progress
from .cluster import WORKER_START_TIMEOUT, running_workers
from .figures import RSS_SLACK, Measured, Speed, Target
from .models import ModelSpec, ensure_model
from .pinning import Placement
from .weights import MB, WeightBytes

# Issue 16's targets (the big model, on a CPU): decode tok/s against the unquantized model at the same
# dtype (bf16 by default), and each format's decode against its own bandwidth limit.
QUANT_VS_BASE = {"int8": 1.6, "int4": 2.2}
QUANT_OF_LIMIT = 0.8
QUANT_TARGET_MODELS = ("big",)
SCHEMES = ("none", "int8", "int4")


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
