"""`cake`: click options only; builds objects and hands off. Errors become one line on stderr."""

from __future__ import annotations

import logging
import os
import sys

import click

from cake.auth import ENV_KEY
from cake.command import Command
from cake import __version__
from cake.dtypes import CHOICES as DTYPE_CHOICES
from cake.eventloop import ENV as BUSY_POLL_ENV
from cake.eventloop import busy_poll_us
from cake.errors import CakeError

log = logging.getLogger("cake")


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, format="[%(name)s] %(message)s")


def run_edge(fn, *args, **kwargs):
    """The one place errors are caught: a CakeError is one line and exit code 1, never a traceback."""
    try:
        return fn(*args, **kwargs)
    except CakeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


@click.command("keygen", cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
def keygen() -> None:
    """Print a new random cluster key (256 bits, as 64 hex digits) on stdout, nothing else: give it to every
    node as --cluster-key or CAKE_CLUSTER_KEY."""
    from cake.auth import keygen as new_key

    click.echo(new_key())


class CakeCommand(Command):
    """The one command, plus `cake keygen` as a word of its own before any option."""

    def main(self, args=None, **kwargs):
        args = sys.argv[1:] if args is None else list(args)
        if args[:1] == ["keygen"]:
            return keygen.main(args[1:], prog_name="cake keygen", **kwargs)
        return super().main(args, **kwargs)


@click.command("cake", cls=CakeCommand, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, "--version", prog_name="cake")
@click.option("--mode", type=click.Choice(["master", "worker"]), default="master", help="Run as master or worker.")
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Model folder (or a cake-split-model bundle, for a worker). A worker without it takes "
                   "the model's config and its layers from the master, into --cache-dir.")
@click.option("--topology", type=click.Path(dir_okay=False), default=None,
              help="Topology YAML; without it every layer runs on the master (a worker started from a "
                   "cake-split-model bundle uses the bundle's).")
@click.option("--name", default=None, help="Worker: this worker's name in the topology file.")
@click.option("--address", default=None,
              help="Worker: address:port to listen on [default: this worker's port in the topology, on every "
                   "interface (only loopback when the topology's host is loopback)].")
@click.option("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES, case_sensitive=False), default="auto",
              help="Compute dtype; auto keeps the checkpoint's where the device handles it.")
@click.option("--quantize", type=click.Choice(["none", "int8", "int4"], case_sensitive=False), default=None,
              help="Keep this node's matrices quantized (weight-only): int8 per output channel or int4 in groups; "
                   "[default: as the folder holds them: none for a normal checkpoint]. See docs/quantization.md.")
@click.option("--group-size", type=int, default=32, help="int4: weights per scale and zero, along a row.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Most this node's decoder layers may take (8GB, 500MB, 12GiB); a share over it, or over the "
                   "device's free memory, is refused before loading [default: the free memory].")
@click.option("--threads", type=int, default=0,
              help="CPU threads for this node's maths (0 = torch's choice: all cores).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="On a CUDA device, replay one-token decode steps as CUDA graphs (env CAKE_CUDA_GRAPHS=0 also turns them off).")
@click.option("--busy-poll", envvar=BUSY_POLL_ENV, default="auto", show_envvar=True, metavar="US|auto",
              help="Poll sockets without sleeping for this many µs before blocking, while the node serves "
                   "one stream: skips the wake-up of a process that waited for another node, at the cost of "
                   "a spinning core; auto = 20000 on CUDA nodes, 0 (off) elsewhere.")
@click.option("--context", type=int, default=None,
              help="KV-cache capacity in tokens [default (or 0): 4096, capped by the model's "
                   "max_position_embeddings].")
@click.option("--cluster-key", envvar=ENV_KEY, default=None, show_envvar=True,
              help="Shared secret of every node: mutual authentication, then every frame encrypted and "
                   "authenticated; `cake keygen` makes one.")
@click.option("--kv-budget", type=float, default=2048, help="Worker: MiB of KV cache before idle sessions are evicted.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Worker without --model: where the layers the master ships are kept, checked by hash and reused "
                   "[default: $XDG_CACHE_HOME/cake, else ~/.cache/cake].")
@click.option("--max-frame-mb", type=float, default=0,
              help="Worker: largest request it reads, in MiB (0 = a full context of hidden states); masters "
                   "split longer prompts and larger batches to fit.")
@click.option("--prompt", "-p", default="Why is the sky blue?", help="Master: the prompt ('-' reads it from stdin).")
@click.option("--system-prompt", default=None, help="Master: a system message for the chat template.")
@click.option("--raw", is_flag=True, help="Master: tokenize the prompt as is, no chat template.")
@click.option("--max-tokens", "-n", "--sample-len", type=int, default=256, help="Master: tokens to generate at most.")
@click.option("--temperature", type=float, default=None,
              help="0 = greedy [default: generation_config.json's when it samples, else 0].")
@click.option("--top-k", type=int, default=None,
              help="Keep the k most likely tokens (0 = off) [default: generation_config.json's when it samples "
                   "(50 if it names none, as transformers), else off].")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling threshold (1 = off).")
@click.option("--repeat-penalty", type=float, default=None,
              help="Penalty for tokens already in the prompt or answer (1 = off) [default: "
                   "generation_config.json's repetition_penalty, else 1].")
@click.option("--repeat-last-n", type=int, default=0, show_default=True,
              help="How many recent tokens the penalty looks at (0 = all, as transformers).")
@click.option("--seed", type=int, default=299792458, help="Sampling seed.")
@click.option("--retry-timeout", type=float, default=30.0, help="Master: seconds to wait for a lost worker.")
@click.option("--request-timeout", type=float, default=300.0, help="Master: seconds before a stuck request fails.")
@click.option("--relay/--no-relay", default=True, show_default=True,
              help="Master: consecutive workers pass hidden states straight to each other (one message per "
                   "worker per token, not two); each falls back to the master if it cannot reach the next.")
@click.option("--pipeline", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Master: send a long prompt through the stages in chunks of 256 tokens that follow each other, "
                   "so each machine computes one chunk while the next computes the one before; auto: when the "
                   "stages run on more than one machine or GPU.")
@click.option("--output-ids", type=click.Path(dir_okay=False), default=None,
              help="Master: also write the prompt and generated token ids as JSON to this file.")
@click.option("--api", default=None, metavar="HOST:PORT",
              help="Master: serve an OpenAI-compatible API here (a bare PORT binds 127.0.0.1) instead of one prompt.")
@click.option("--api-key", envvar="CAKE_API_KEY", default=None, show_envvar=True,
              help="Master with --api: require 'Authorization: Bearer KEY' on API requests.")
@click.option("--max-concurrency", type=int, default=64,
              help="Master with --api: generations at once (their decode steps are batched); up to 4 times as "
                   "many requests wait for a place, and past them a request gets a 429.")
@click.option("--ship-rate", default=None, metavar="SIZE",
              help="Master: most bytes a second it ships weights at to each worker without model files (50MB, "
                   "1GB) [default: as fast as the network and the worker's disk take them].")
@click.option("--plan", "plan_only", is_flag=True,
              help="Master: measure, survey the workers and print the layer placement as a topology file on stdout "
                   "(workers whose entry lists no layers are placed), then exit.")
@click.option("--check", is_flag=True,
              help="Master: reach every worker, show what each serves and the round trip, test that each relays "
                   "to the next, then exit.")
@click.option("--verbose", "-v", count=True, help="More logging on stderr.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors on stderr.")
def main(mode, model_dir, topology, name, address, device, dtype, quantize, group_size, max_memory, threads, cuda_graphs, busy_poll, context, cluster_key, kv_budget, cache_dir, max_frame_mb, prompt,
         system_prompt, raw, max_tokens, temperature, top_k, top_p, repeat_penalty, repeat_last_n, seed,
         retry_timeout, request_timeout, relay, pipeline, output_ids, api, api_key, max_concurrency, ship_rate, plan_only, check, verbose,
         quiet):
    """Distributed LLM inference: run a worker on each machine, then a master to generate.
    `cake keygen` prints a new random --cluster-key."""
    setup_logging(verbose, quiet)
    check_flags(click.get_current_context(), mode, api, check)
    run_edge(busy_poll_us, "cpu", busy_poll)  # a bad value is one line in every mode, before any loading
    if max_memory is not None:
        from cake.memory import parse_size

        max_memory = run_edge(parse_size, max_memory)
    if ship_rate is not None:
        ship_rate = run_edge(parse_rate, ship_rate)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    if not cuda_graphs:
        from cake.model.cuda_graphs import ENV

        os.environ[ENV] = "0"
    if mode == "worker":
        bundled = os.path.join(model_dir, "topology.yml") if model_dir else ""  # a bundle carries its topology
        topology = topology or (bundled if os.path.isfile(bundled) else None)
        if not name or not topology:
            raise click.UsageError("a worker needs --name and --topology (a cake-split-model bundle has its own)")
        if model_dir and cache_dir:
            raise click.UsageError("--cache-dir: for a worker without --model (one with --model loads from it and "
                                   "takes no weights from the master)")
        from cake.worker import WorkerArgs, run_worker

        run_edge(run_worker, WorkerArgs(model_dir, name, topology, address, device, dtype, context, cluster_key,
                                        kv_budget, max_frame_mb, busy_poll, quantize=quantize,
                                        group_size=group_size, max_memory=max_memory, cache_dir=cache_dir))
        return
    if not model_dir:
        raise click.UsageError("the master needs --model: the model folder it runs and ships to the workers")
    from cake.master_setup import MasterArgs
    from cake.run_master import run_master

    args = MasterArgs(
        model_dir=model_dir, topology=topology, device=device, dtype=dtype, context=context, key=cluster_key,
        prompt=prompt, system_prompt=system_prompt, raw=raw, max_tokens=max_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed,
        retry_timeout=retry_timeout, request_timeout=request_timeout, relay=relay, pipeline=pipeline,
        output_ids=output_ids, quiet=quiet,
        busy_poll=busy_poll, quantize=quantize, group_size=group_size, max_memory=max_memory, ship_rate=ship_rate,
    )
    if check:
        from cake.check import run_check
        from cake.client import Options

        run_edge(run_check, args, Options(key=cluster_key, retry_timeout=retry_timeout, relay=relay,
                                          pipeline=pipeline))
        return
    if plan_only:
        from cake.run_master import run_plan

        run_edge(run_plan, args)
        return
    if api:
        from cake.api import run_api

        run_edge(run_api, args, api, api_key, max_concurrency)
        return
    run_edge(run_master, args)


WORKER_ONLY = ("name", "address", "kv_budget", "max_frame_mb", "cache_dir")
MASTER_ONLY = ("prompt", "system_prompt", "raw", "max_tokens", "temperature", "top_k", "top_p", "repeat_penalty",
               "repeat_last_n", "seed", "retry_timeout", "request_timeout", "relay", "pipeline", "output_ids", "api",
               "api_key", "max_concurrency", "plan_only", "check", "ship_rate")
ONE_PROMPT = ("prompt", "system_prompt", "raw", "output_ids")  # what --api and --check have no use for
POSITIVE = ("kv_budget", "retry_timeout", "request_timeout", "group_size", "max_concurrency", "max_tokens")
AT_LEAST_ZERO = ("threads", "max_frame_mb", "repeat_last_n", "context")


def parse_rate(text: str) -> int:
    """--ship-rate: a size a second, above 0."""
    from cake.memory import parse_size

    try:
        rate = parse_size(text)
    except CakeError:
        rate = 0
    if rate <= 0:
        raise CakeError(f"--ship-rate '{text}' is not a size above 0; write it like 50MB or 1GB (a second)")
    return rate


def check_flags(ctx: click.Context, mode: str, api: str | None, check: bool) -> None:
    """Options typed on the command line that this mode would ignore, and values out of range, are usage
    errors naming the option: a worker started without --mode worker must not quietly run a master."""
    def flag(name: str) -> str:
        param = next(p for p in ctx.command.params if p.name == name)
        return "/".join(param.opts[:1] + param.secondary_opts[:1])  # --relay/--no-relay: either may be typed

    typed = [n for n in ctx.params if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
    if mode == "master" and (wrong := [n for n in typed if n in WORKER_ONLY]):
        raise click.UsageError(f"{', '.join(map(flag, wrong))}: worker option(s); add --mode worker to run a worker")
    if mode == "worker" and (wrong := [n for n in typed if n in MASTER_ONLY]):
        raise click.UsageError(f"{', '.join(map(flag, wrong))}: master option(s); a worker takes its work from "
                               f"the master")
    if api and check:
        raise click.UsageError("--api and --check: pick one (check the cluster first, then serve)")
    if (api or check) and (wrong := [n for n in typed if n in ONE_PROMPT]):
        raise click.UsageError(f"{', '.join(map(flag, wrong))}: for one prompt; with {'--api' if api else '--check'} "
                               f"{'each request brings its own' if api else 'nothing is generated'}")
    for name in POSITIVE + AT_LEAST_ZERO:
        value = ctx.params.get(name)
        if value is not None and (value <= 0 if name in POSITIVE else value < 0):
            raise click.UsageError(f"{flag(name)} {value:g} must be {'above' if name in POSITIVE else 'at least'} 0")


if __name__ == "__main__":
    main()
