"""`cake --mode master` on a prompt: tokenize, generate with streaming to stdout, report on stderr."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cake import eventloop
from cake.client import Options
from cake.errors import CakeError
from cake.generate import GenerationStats, generate
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


def run_plan(args: MasterArgs) -> None:
    """`cake --plan`: the plan as a topology file on stdout, and nothing else."""
    config = load_config(args.model_dir)
    topology = load_topology(args.topology)
    if not topology.workers:
        raise CakeError("--plan needs a --topology with workers (entries without 'layers' are placed)")
    if not topology.unplaced:
        raise CakeError("every worker in the topology lists its layers: nothing to plan; leave out 'layers' for the "
                        "workers the master should place (and start them with that file)")
    options = Options(key=args.key, retry_timeout=args.retry_timeout, request_timeout=args.request_timeout,
                      supply=supplier(args, config, topology))
    _, text = plan_cluster(args, config, topology, options, assign=False)
    sys.stdout.write(text)


def run_master(args: MasterArgs) -> None:
    if args.max_tokens < 0:
        raise CakeError("--max-tokens must be 0 or more")
    if args.output_ids:  # before the answer is generated, not after
        folder = Path(args.output_ids).resolve().parent
        if not folder.is_dir():
            raise CakeError(f"--output-ids: folder '{folder}' does not exist; create it or pick another file")
    params = sampling_params(args)
    eventloop.busy_poll_us("cpu", args.busy_poll)  # a bad value fails before the weights load
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt  # `-p -`: the prompt from stdin
    if not prompt.strip():
        raise CakeError("the prompt is empty; give --prompt TEXT, or --prompt - with text on stdin")
    master, tokenizer, eos = build_master(args)
    prompt_ids = tokenizer.encode_prompt(prompt, args.system_prompt, args.raw)
    eventloop.run(_generate(master, tokenizer, prompt_ids, params, args, eos),
                  eventloop.busy_poll_us(master.device.type, args.busy_poll))


class TextOut:
    """Where the generated text goes (stdout), remembering whether its last write left a line open: where
    stderr is the same terminal, a log line written meanwhile would be glued to the text (see end_line)."""

    def __init__(self, out: TextIO, err: TextIO):
        self.out, self.err = out, err
        self.shared = same_terminal(out, err)
        self.open_line = False

    def write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.open_line = not text.endswith("\n")

    def end_line(self) -> None:
        """Before a line goes to stderr: on a terminal it shares with stdout, end the text's open line."""
        if self.shared and self.open_line:
            self.write("\n")


class FreshLine(logging.Filter):
    """On a log handler that writes to TextOut's stderr: each log line starts on a fresh line."""

    def __init__(self, text: TextOut):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        self.text.end_line()
        return True


@contextlib.contextmanager
def fresh_log_lines(text: TextOut, logger: logging.Logger | None = None) -> Iterator[None]:
    """While text streams: the log lines of `logger`'s handlers (the root's) on stderr start on a fresh line."""
    handlers = [h for h in (logger or logging.getLogger()).handlers
                if isinstance(h, logging.StreamHandler) and h.stream is text.err]
    fresh = FreshLine(text)
    for h in handlers:
        h.addFilter(fresh)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(fresh)


def same_terminal(a: TextIO, b: TextIO) -> bool:
    try:
        return a.isatty() and b.isatty() and os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture, say)
        return False


async def _generate(master: Master, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                    args: MasterArgs, eos: tuple[int, ...]) -> None:
    text = TextOut(sys.stdout, sys.stderr)
    with fresh_log_lines(text):
        try:
            await master.connect()  # first: the workers' contexts bound the master's
            stats = GenerationStats()
            stream = tokenizer.stream()
            async for token in generate(master, prompt_ids, params, args.max_tokens, eos, stats):
                text.write(stream.push(token))
            text.write(stream.flush() + "\n")
        finally:
            await master.close()
            text.end_line()  # the error line after a text cut short starts on a line of its own
    if args.output_ids:
        try:
            Path(args.output_ids).write_text(json.dumps({"prompt": prompt_ids, "generated": stats.tokens,
                                                         "finish_reason": stats.finish_reason}))
        except OSError as e:
            raise CakeError(f"--output-ids: cannot write '{args.output_ids}': {e.strerror}") from None
    if not args.quiet:
        log.info("%s", stats.summary())
        for line in master.stage_report():
            log.info("%s", line)
