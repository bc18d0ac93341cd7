"""The planner against the even split (issue 17): one model on two unlike CPU workers, laid out both ways,
decode tok/s of each in one run.

One worker computes on two threads, the other on one; the two-thread one has room for `--fast-room` layers
only. Which is faster depends on the machine (on a 2-vCPU VM, whose master also needs a core, two threads
are slower): the planner measures it. The even split gives each
half; the planned cluster lists no layers and the master (holding none itself: --max-memory 0) plans from
what the workers measured. Runs alternate, medians are reported with the ratio.

    python scripts/plan_bench.py [--layers 12 --hidden 1024 --tokens 48 --repeats 3 --fast-room 9]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch

from cake import launch
from cake.model.config import load_config
from cake.model.loader import Quantization
from cake.placement import layer_bytes
from cake.synthetic import make_model

PROMPT = "The planner places layers where they run fastest and fit"
WORKER = ("--device", "cpu", "--dtype", "f32", "--context", "512")
FORMATS = {"two": ("--threads", "2"), "one": ("--threads", "1")}  # unlike nodes: two threads and one


def write_topology(path: Path, ports: dict[str, int], layers: dict[str, str] | None) -> Path:
    lines = []
    for name, port in ports.items():
        lines += [f"{name}:", f"  host: '127.0.0.1:{port}'", f"  description: '{name} worker'"]
        if layers:
            lines += ["  layers:", f"    - 'model.layers.{layers[name]}'"]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_cluster(stack: ExitStack, model: Path, tmp: Path, kind: str, layers: dict[str, str] | None,
                  room: int) -> Path:
    ports = {name: launch.free_port() for name in FORMATS}
    topology = write_topology(tmp / f"{kind}.yml", ports, layers)
    for name, port in ports.items():
        extra = (*WORKER, *FORMATS[name], *(("--max-memory", f"{room}B") if name == "two" and not layers else ()))
        proc = launch.start_worker(model, name, topology, port, *extra, log=tmp / f"{kind}-{name}.log")
        stack.callback(launch.stop, proc)
        launch.wait_ready(port, proc, timeout=120)
    return topology


def decode(model: Path, topology: Path, tokens: int) -> tuple[float, str]:
    """One master run: its decode tok/s and the layers each worker served."""
    r = subprocess.run([sys.executable, "-m", "cake", "--model", str(model), "--topology", str(topology),
                        "--raw", "-p", PROMPT, "-n", str(tokens), "--device", "cpu", "--threads", "1",
                        "--context", "512", "--max-memory", "0"], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"master failed: {r.stderr[-2000:]}")
    tps = float(re.search(r"decode ([\d.]+) tok/s", r.stderr)[1])
    stages = " ".join(re.findall(r"\] +(\w+\[[\d-]+\]):", r.stderr))
    measured = re.findall(r"plan: [# ]*# measured: ([\d.]+) ms a layer", r.stderr)
    compute = re.findall(r"\] +\w+\[[\d-]+\]: \d+ calls, [\d.]+ ms/call \(compute ([\d.]+) ms", r.stderr)
    if measured:
        stages += f"  (measured ms a layer: {' / '.join(measured)})"
    if compute:
        stages += f"  (compute ms a call: {' / '.join(compute)})"
    return tps, stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fast-room", type=float, default=9.5, help="layers the two-thread worker has room for")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d, ExitStack() as stack:
        tmp = Path(d)
        model = make_model(tmp / "model", hidden=a.hidden, intermediate=3 * a.hidden, layers=a.layers,
                           heads=a.hidden // 64, kv_heads=max(1, a.hidden // 256), seed=1)
        room = int(a.fast_room * layer_bytes(load_config(model), Quantization(), torch.float32, 512))
        half = a.layers // 2
        clusters = {"even": start_cluster(stack, model, tmp, "even", {"two": f"0-{half - 1}",
                                                                      "one": f"{half}-{a.layers - 1}"}, room),
                    "planned": start_cluster(stack, model, tmp, "planned", None, room)}
        results: dict[str, list[float]] = {k: [] for k in clusters}
        for r in range(a.repeats):
            for kind, topology in clusters.items():
                tps, stages = decode(model, topology, a.tokens)
                results[kind].append(tps)
                print(f"run {r + 1} {kind:8s} {tps:6.2f} tok/s  {stages}", flush=True)
        plan_lines = [line for line in (tmp / "planned-one.log").read_text().splitlines() if "assigns" in line]
        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"\n{a.layers} layers of hidden {a.hidden} in f32; worker 'two' on two threads with room for "
              f"{a.fast_room:g} layers, worker 'one' on one thread; the master on one thread with no layers; "
              f"{a.tokens} tokens a run, medians of {a.repeats}")
        print(f"even split    {med['even']:6.2f} tok/s")
        print(f"planned       {med['planned']:6.2f} tok/s   ({med['planned'] / med['even']:.2f}x the even split)")
        if plan_lines:
            print(f"worker 'one''s last assignment: {plan_lines[-1].split('] ', 1)[-1]}")


if __name__ == "__main__":
    main()
