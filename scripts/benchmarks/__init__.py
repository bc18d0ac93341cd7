"""The benchmark behind `python scripts/bench.py`: cake against transformers and the memory-bandwidth limit,
on seeded random-weight models of any family cake serves (docs/benchmarks.md says what each figure means).

Every measured thing runs in its own fresh process (the launcher re-invoked with `--child`), so one
measurement's imports and allocations never show in another's timings or peak RSS: the master is measured
without transformers loaded, and the workers are real `cake --mode worker` processes.

Importing this package points every process it starts at this checkout's cake, and notes the user's own
OpenMP spin setting before cake's default replaces it (children that are not cake get the user's back).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "scripts" / "bench.py"  # what children, workers' pinning and the proxy are started as
RUN_ON = "--run-on"  # the launcher as a pinning wrapper: pin, then exec the rest of its command line

# Measure this checkout's cake, not whichever one is installed: children and workers inherit this.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

# Importing cake sets its OpenMP spin default (cake/__init__.py) for this process and its children. The
# processes that are not cake (transformers, the matvec) must run as a user would run them.
USER_GOMP_SPINCOUNT = os.environ.get("GOMP_SPINCOUNT")
NATIVE_OMP = "CAKE_BENCH_NATIVE_OMP"

importlib.import_module("cake")  # sets GOMP_SPINCOUNT (and imports no torch)

if os.environ.get(NATIVE_OMP) == "1" and USER_GOMP_SPINCOUNT is None:
    del os.environ["GOMP_SPINCOUNT"]  # before torch loads OpenMP: see above
