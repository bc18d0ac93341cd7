"""The text report: each model's figures as tables, next to the targets with PASS or MISS."""

from __future__ import annotations

import os
from pathlib import Path

from .figures import RSS_SLACK, Measured, ModelResult, Speed
from .quant import QuantResult
from .weights import MB


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


def _caveats(quick: bool, placement, layers: int) -> list[str]:
    """What a reader of the figures must know first: a quick run, and the CPU pinning."""
    out = ["QUICK MODE: a check that the benchmark runs (few tokens, few runs); not figures to quote"] if quick else []
    return out + ([placement.describe(layers)] if placement.cores else [])


def report(r: ModelResult, quick: bool) -> str:
    s, w = r.spec, r.weights
    hf, local, workers = r.speed(r.transformers), r.speed(r.local), r.speed(r.workers)
    label = r.placement.label
    out = [f"== {s.label}: {s.describe()}; {w.total / MB:.0f} MB {r.dtype} on {r.device}, a decode step reads "
           f"{r.step_bytes / MB:.1f} MB ==",
           f"prompt {r.prompt_tokens} tokens, {r.tokens} decode tokens, median of {r.repeats} run(s) after a "
           f"warm-up; {r.local.threads} torch thread(s) per process; {machine()}"]
    out += _caveats(quick, r.placement, s.layers)
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
    if r.step is not None:
        moe = (f" + the routed experts {r.step.experts / MB:.1f} MB (of {r.step.experts_all / MB:.1f} MB, "
               f"{s.experts_per_token} of {s.experts} a layer)" if s.experts else "")
        out.append(f"a decode step reads: weights {r.step.weights / MB:.1f} MB{moe} + KV cache {r.step.kv / MB:.2f} MB "
                   f"(at position {r.prompt_tokens + r.tokens // 2})")
    out.append(f"matvec ({r.bandwidth.kernel}) reads {r.step_bytes / r.matvec_s / 1e9:.1f} GB/s; "
               f"cake all-local reads {r.step_bytes * local.decode_tps / 1e9:.2f} GB/s, "
               f"{local.decode_tps / r.bound_tps:.2f} of the limit, "
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
    out += _caveats(quick, q.placement, s.layers)

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


