"""`cake --mode master` on a prompt: tokenize, generate with streaming to stdout, report on stderr."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from cake import eventloop
from cake.client import Options
from cake.errors import CakeError
from cake.generate import GenerationStats, generate
from cake.master import Master
from cake.master_setup import MasterArgs, build_master, plan_cluster, sampling_params, supplier
from cake.model.config import load_config
from cake.sampling import SamplingParams
from cake.tokenizer import Tokenizer
from cake.topology import load_topology

log = logging.getLogger("cake")


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
                      supply=supplier(args, config, topology), look=True)
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
