"""`python scripts/bench.py`'s options, and the run: every model (and family) asked for, measured, reported
and written to --json."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from cake.errors import CakeError

from .figures import ModelResult
from .measure import bench_model
from .models import FAMILIES, SPECS, default_workdir
from .pinning import Placement, core_sets
from .quant import SCHEMES, QuantResult, bench_quant
from .report import machine, quant_report, report
from .weights import ITEMSIZE


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
    p.add_argument("--arch", default="llama", metavar="LIST",
                   help=f"model families, comma-separated ({', '.join(FAMILIES)}): each is built with transformers' own "
                        f"class for it in --model's shape (a mixture of experts with experts of its own), and measured "
                        f"against that class (default: llama)")
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
    args.arch = [x.strip().lower() for x in args.arch.split(",") if x.strip()]
    if not args.arch or any(x not in FAMILIES for x in args.arch):
        p.error(f"--arch takes a comma-separated list of {', '.join(FAMILIES)}")
    if args.arch != ["llama"] and args.quantize != ["none"]:
        p.error("--quantize is measured on the Llama models only; leave out --arch or --quantize")
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
        from .subjects import child_main

        child_main(args.child)
        return
    if args.proxy:
        import asyncio

        from .proxy import proxy_main

        asyncio.run(proxy_main(json.loads(args.proxy)))
        return
    # A plain `kill` unwinds like Ctrl-C, so the workers started here are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = ["tiny", "big"] if args.model == "both" else [args.model]
    specs = [SPECS[n].as_family(arch) for n in names for arch in args.arch]
    quantized = [x for x in args.quantize if x != "none"]
    results: dict[str, ModelResult] = {}
    quant: dict[str, QuantResult] = {}
    try:
        for spec in specs:
            if "none" in args.quantize:
                results[spec.label] = bench_model(spec, args.workdir, args.prompt_tokens, args.tokens, args.repeats,
                                                  args.device, args.dtype, args.link_delay_ms, args.busy_poll,
                                                  args.placement)
            if quantized:
                quant[spec.label] = bench_quant(spec, args.workdir, quantized, args.dtype, args.quant_dtype,
                                                args.group_size, args.prompt_tokens, args.tokens, args.repeats,
                                                args.device, args.busy_poll, args.placement)
    except CakeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    labels = [spec.label for spec in specs]
    sections = []
    for n in labels:
        sections += [report(results[n], args.quick)] if n in results else []
        sections += [quant_report(quant[n], args.quick)] if n in quant else []
    print("\n\n".join(sections))
    if args.json:
        models = {n: {**(results[n].to_json() if n in results else {}),
                      **({"quantized": quant[n].to_json()} if n in quant else {})} for n in labels}
        args.json.write_text(json.dumps({"machine": machine(), "quick": args.quick, "models": models}, indent=2))
