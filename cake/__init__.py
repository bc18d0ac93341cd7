"""cake: distributed Llama 3 inference over the machines you already own."""

import os

__version__ = "0.1.0"

# OpenMP's default spin keeps a finished node's threads busy on cores another node on the machine needs;
# 30k spins still keep them hot across one layer's ops (docs/benchmarks.md, "Threads and the event loop").
# Set before torch loads; a value the user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")
