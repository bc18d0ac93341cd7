#!/usr/bin/env python3
"""Benchmark cake against transformers and the memory-bandwidth limit on seeded random-weight models.

    python scripts/bench.py --quick            # about a minute: tiny model, few tokens, one run
    python scripts/bench.py --model both       # the real figures: minutes, on a quiet machine
    python scripts/bench.py --arch qwen3,mixtral,qwen3_moe --model tiny   # other families
    python scripts/bench.py --cores-per-node 4 # each node on cores of its own, as on separate machines
    python scripts/bench.py --model big --quantize int8,int4   # int8/int4 beside f32 and bf16

The code is the package scripts/benchmarks/ (one module per measurement); this file launches it, and is
what it starts its own measuring processes as. docs/benchmarks.md says what each figure means.
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__" and len(sys.argv) > 3 and sys.argv[1] == "--run-on":
    # A pinning wrapper (benchmarks.pinning.Placement.wrap): become the rest of the command line on the
    # given CPUs, a torch/OpenMP thread per CPU, before anything imports cake and sets its OpenMP default.
    cores = {int(c) for c in sys.argv[2].split(",")}
    os.sched_setaffinity(0, cores)
    os.environ["OMP_NUM_THREADS"] = str(len(cores))
    os.execv(sys.argv[3], sys.argv[3:])

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
