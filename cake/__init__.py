"""cake: distributed Llama 3 inference over the machines you already own."""

import os

__version__ = "0.1.0"

# torch's CPU maths runs on OpenMP threads that, by default, spin for a long while after each parallel
# region. A node waiting for the next token then keeps cores busy that another node on the same machine
# (or the master) needs: measured, two loopback workers ran 0.79x of all-local speed with the default and
# 0.91x with this. 30k spins still keep the threads hot across the back-to-back ops of one layer. It must
# be set before torch loads; a value the user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")
