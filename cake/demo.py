"""`cake-demo`: the whole pipeline on one machine in one command.

Builds a small seeded random-weight Llama 3 folder (real Llama 3 tokenizer), writes a two-worker
topology, starts both workers on loopback, generates with streaming, prints the per-stage timing and
stops the workers. Random weights produce word salad: the point is the pipeline.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from cake.command import Command

from cake import launch
from cake.cli import run_edge, setup_logging
from cake.master_setup import MasterArgs
from cake.run_master import run_master


def demo(workdir: Path, prompt: str, max_tokens: int, layers: int, hidden: int) -> None:
    from cake.synthetic import make_model

    model = workdir / "model"
    if not (model / "config.json").exists():
        click.echo(f"building a seeded random-weight Llama 3 ({hidden} hidden, {layers} layers) in {model}", err=True)
        make_model(model, hidden=hidden, intermediate=hidden * 11 // 4, layers=layers, heads=max(4, hidden // 64),
                   kv_heads=max(1, hidden // 256), seed=1234)
    ports = [launch.free_port(), launch.free_port()]
    half = layers // 2
    topology = launch.write_topology(workdir / "topology.yml", {
        "worker-a": (ports[0], [f"model.layers.0-{half - 1}"]),
        "worker-b": (ports[1], [f"model.layers.{half}-{layers - 1}"]),
    }, "demo worker (loopback)")
    click.echo(f"topology: worker-a serves layers 0-{half - 1}, worker-b serves {half}-{layers - 1}", err=True)
    procs = []
    try:
        for name, port in zip(("worker-a", "worker-b"), ports):
            procs.append(launch.start_worker(model, name, topology, port, log=workdir / f"{name}.log"))
        for proc, port in zip(procs, ports):
            launch.wait_ready(port, proc)
        click.echo("workers up; generating (random weights: expect word salad)\n", err=True)
        run_master(MasterArgs(model_dir=str(model), topology=str(topology), prompt=prompt, max_tokens=max_tokens,
                              temperature=0.0))
    finally:
        for p in procs:
            launch.stop(p)
        click.echo("workers stopped", err=True)


@click.command("cake-demo", cls=Command, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--prompt", default="Tell me about distributed inference.", help="The prompt.")
@click.option("--max-tokens", "-n", default=32, help="Tokens to generate.")
@click.option("--layers", default=8, help="Decoder layers of the demo model.")
@click.option("--hidden", default=256, help="Hidden size of the demo model.")
@click.option("--dir", "workdir", type=click.Path(file_okay=False), default=None,
              help="Keep the model and logs here (default: a temporary folder, removed afterwards).")
def main(prompt: str, max_tokens: int, layers: int, hidden: int, workdir: str | None) -> None:
    """Run cake end to end on this machine: a random-weight model, two workers on loopback, one master."""
    setup_logging(0, False)
    if workdir:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        run_edge(demo, Path(workdir), prompt, max_tokens, layers, hidden)
    else:
        with tempfile.TemporaryDirectory(prefix="cake-demo-") as d:
            run_edge(demo, Path(d), prompt, max_tokens, layers, hidden)


if __name__ == "__main__":
    main()
