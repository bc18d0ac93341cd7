"""The soak script's short form: a keyed loopback cluster under concurrent API clients (streamed, whole,
some leaving mid-stream) while a worker is killed and restarted and a proxy corrupts bytes. Every answer
equals its solo answer and no worker holds a session after the end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"


def test_short_soak_serves_the_same_answers_through_kills_and_corruption(tiny_model, tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(SOAK), "--model", str(tiny_model), "--minutes", "0.75",
                           "--clients", "3", "--kill-every", "15", "--corrupt-every", "4", "--tokens", "12",
                           "--max-requests", "400", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mismatched"] == 0 and not any(report["sessions_left"].values())
    assert report["served"] >= 10 and report["kills"] >= 1 and report["flips"] >= 3
    assert report["failed"] == {}, report["failed"]
