"""Layer numbers in words, as messages and topology files write them: [0, 1, 2, 5] -> '0-2,5'."""

from __future__ import annotations


def format_layers(layers: list[int] | tuple[int, ...]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "none"
