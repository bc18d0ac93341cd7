"""Building a master from its settings, shared by the one-prompt run (cake.run_master) and the API server
(cake.api): the settings, the sampling defaults, the plan for unplaced workers, the weights supplied to
workers without model files."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cake import eventloop
from cake.client import Options
from cake.errors import CakeError
from cake.master import Master
from cake.model.config import load_config, load_eos_ids, load_generation_config
from cake.sampling import SamplingParams
from cake.tokenizer import Tokenizer
from cake.topology import load_topology

TRANSFORMERS_TOP_K = 50  # generate()'s top_k when a sampling generation_config names none

log = logging.getLogger("cake")


@dataclass
class MasterArgs:
    model_dir: str
    topology: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    context: int | None = None
    key: str | None = None
    prompt: str = ""
    system_prompt: str | None = None
    raw: bool = False
    max_tokens: int = 256
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int = 0
    seed: int = 299792458
    retry_timeout: float = 30.0
    request_timeout: float = 300.0
    relay: bool = True
    pipeline: str = "auto"  # auto, on, off (Master.pipelines)
    output_ids: str | None = None
    quiet: bool = False
    busy_poll: str | None = None  # µs or 'auto'; None: $CAKE_BUSY_POLL_US, else auto
    quantize: str | None = None  # none, int8, int4; None: as the folder holds (cake.model.loader.choose_quantization)
    group_size: int = 32
    max_memory: int | None = None  # bytes the master's own decoder layers may take (--max-memory)
    ship_rate: int | None = None  # bytes per second it ships weights to each worker without model files


def sampling_params(args: MasterArgs) -> SamplingParams:
    """Flags win; otherwise the model folder's generation_config.json as transformers' `generate` reads
    it (its temperature, top_k and top_p when it samples, top_k 50 where it samples and names none, and
    its repetition_penalty whether it samples or not); otherwise greedy with no penalty."""
    gen = load_generation_config(args.model_dir)
    samples = bool(gen.get("do_sample"))
    temperature = args.temperature if args.temperature is not None else (
        float(gen.get("temperature", 1.0)) if samples else 0.0)
    top_k = args.top_k if args.top_k is not None else (
        int(gen["top_k"] if gen.get("top_k") is not None else TRANSFORMERS_TOP_K) if samples else 0)
    top_p = args.top_p if args.top_p is not None else (float(gen.get("top_p", 1.0)) if samples else 1.0)
    penalty = args.repeat_penalty if args.repeat_penalty is not None else float(gen.get("repetition_penalty") or 1.0)
    for name, value, ok, want in (
            ("--temperature", temperature, temperature >= 0, "0 (greedy) or more"),
            ("--top-k", top_k, top_k >= 0, "0 (off) or more"),
            ("--top-p", top_p, 0 < top_p <= 1, "above 0 and at most 1 (off)"),
            ("--repeat-penalty", penalty, penalty > 0, "above 0 (1 is off)"),
            ("--repeat-last-n", args.repeat_last_n, args.repeat_last_n >= 0, "0 (all) or more")):
        if not ok:
            raise CakeError(f"{name} {value:g} is out of range: it must be {want}")
    return SamplingParams(temperature, top_k, top_p, penalty, args.repeat_last_n, args.seed)


def build_master(args: MasterArgs, compute_in_thread: bool = False) -> tuple[Master, Tokenizer, tuple[int, ...]]:
    """The master (weights loaded, workers not yet reached), its tokenizer and the model's EOS ids."""
    config = load_config(args.model_dir)  # an unsupported model is one line before anything else is read
    topology = load_topology(args.topology)
    tokenizer = Tokenizer(args.model_dir)
    options = Options(key=args.key, retry_timeout=args.retry_timeout, request_timeout=args.request_timeout,
                      relay=args.relay, pipeline=args.pipeline, supply=supplier(args, config, topology))
    if topology.unplaced:
        from cake.placement import assignment

        topology, text = plan_cluster(args, config, topology, options, assign=True)
        for line in text.splitlines():
            log.info("plan: %s", line)
        options.plan = assignment(topology)  # a placed worker that restarts unplaced is told again
    master = Master(args.model_dir, topology, args.device, args.dtype, args.context, options, compute_in_thread,
                    args.quantize, args.group_size, args.max_memory)
    return master, tokenizer, load_eos_ids(args.model_dir, master.config)


def supplier(args: MasterArgs, config, topology):
    """What the workers without model files get from this master (cake.shipping): nothing is read or sent
    until one of them asks."""
    if not topology.workers:
        return None
    from cake.shipping import Supplier

    return Supplier(args.model_dir, config, args.ship_rate)


def plan_cluster(args: MasterArgs, config, topology, options: Options, assign: bool):
    """Measure a layer here, survey the workers, plan (cake.placement); with `assign`, tell the workers."""
    from cake import placement

    master = placement.master_node(config, args.model_dir, args.device, args.dtype, args.quantize, args.group_size,
                                   args.context, args.max_memory)
    return eventloop.run(placement.place(config, topology, options, master, assign))
