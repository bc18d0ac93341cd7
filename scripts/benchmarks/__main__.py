"""`python -m benchmarks` from scripts/ (or `python scripts/bench.py`): the benchmark."""

from .cli import main

main()
