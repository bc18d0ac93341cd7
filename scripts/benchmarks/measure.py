"""Every figure of one model in interleaved rounds: the bandwidth limit, transformers, cake all-local (as the
CLI and as the API server computes), cake through loopback workers (relay on and off, with and without
busy-polling) and concurrent sessions through them."""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from .children import Job, child, progress
from .cluster import running_workers
from .figures import SESSIONS, Measured, ModelResult
from .models import ModelSpec, ensure_model
from .pinning import Placement
from .weights import StepBytes, WeightBytes, kv_read_bytes


def measure(spec: ModelSpec, model_dir: Path, step_bytes: int, prompt_tokens: int, tokens: int, repeats: int,
            logs: Path, device: str, dtype: str, link_delay_ms: float = 0.0, busy_poll_us: int = 0,
            placement: Placement = Placement()) -> tuple[dict[str, Measured], dict[str, int | None], dict]:
    """Every figure of one model, in interleaved rounds (the matvec over `step_bytes`); returns what each
    child measured, and the workers' peak RSS and CPUs. With busy-polling on, a second set of workers and a master without it
    too. A master with relay off only where there are two workers or more to relay between."""
    with ExitStack() as stack:
        label = placement.label
        pairs = f"{label} (and {placement.workers} more without busy-polling)" if busy_poll_us > 0 else label
        progress(f"{spec.label}: starting {pairs}, then the transformers, cake and matvec processes")
        cluster = stack.enter_context(running_workers(model_dir, spec.layers, logs, device, dtype, link_delay_ms,
                                                      busy_poll_us, placement=placement))
        base = Job("", spec.name, str(model_dir), prompt_tokens, tokens, device=device, dtype=dtype,
                   busy_poll=str(busy_poll_us), arch=spec.arch)
        jobs = {"bandwidth": replace(base, kind="bandwidth", nbytes=step_bytes),
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
            progress(f"{spec.label}: round {i + 1}/{repeats}")
            for kind, kid in kids.items():
                if kind in ("cake-workers", "cake-workers-no-poll"):
                    # Unmeasured: the workers have been idle through the other processes' turns, and the
                    # first prompt after seconds idle takes longer (measured: 150-190 against ~100 ms on
                    # the big bf16 model), which would fall on whichever master uses them first.
                    kid.ask("run")
                out[kind].add_run(kid.ask("run"))
        progress(f"{spec.label}: {', '.join(map(str, SESSIONS))} concurrent sessions on the {label}")
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


def bench_model(spec: ModelSpec, workdir: Path, prompt_tokens: int, tokens: int, repeats: int,
                device: str = "cpu", dtype: str = "f32", link_delay_ms: float = 0.0,
                busy_poll_us: int = 0, placement: Placement = Placement()) -> ModelResult:
    model_dir = ensure_model(spec, workdir)
    weights = WeightBytes.read(model_dir).in_dtype(dtype, spec.stored)
    # A step reads the KV cache too: at the run's middle position, as an average step does.
    kv = kv_read_bytes(spec.layers, spec.kv_heads, spec.head_dim, dtype, prompt_tokens + tokens / 2)
    step = StepBytes.of(weights, spec.experts_per_token, kv)
    logs = workdir / "runs" / spec.label
    logs.mkdir(parents=True, exist_ok=True)
    m, worker_rss, worker_cpus = measure(spec, model_dir, step.total, prompt_tokens, tokens, repeats, logs, device,
                                         dtype, link_delay_ms, busy_poll_us, placement)
    return ModelResult(spec, weights, prompt_tokens, tokens, repeats, m["bandwidth"], m["transformers"],
                       m["cake-local"], m["cake-workers"], worker_rss, device, dtype, m.get("cake-workers-no-relay"),
                       m.get("cake-workers-no-poll"), busy_poll_us, link_delay_ms, m.get("cake-local-server"),
                       placement, worker_cpus, step)

