from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cake.split import split_model
from conftest import write_topology


def test_bundles_hold_exactly_their_layers(tied_model, tmp_path):
    topo = write_topology(tmp_path / "t.yml", {"a": (1, ["model.layers.0", "model.layers.2"]),
                                               "b": (2, ["model.layers.3"])})
    bundles = split_model(tied_model, topo, tmp_path / "out", quiet=True)
    assert [b.name for b in bundles] == ["a", "b"]
    src_index = json.loads((tied_model / "model.safetensors.index.json").read_text())["weight_map"]
    for bundle, layers in zip(bundles, ([0, 2], [3])):
        index = json.loads((bundle / "model.safetensors.index.json").read_text())["weight_map"]
        want = sorted(n for n in src_index if any(n.startswith(f"model.layers.{i}.") for i in layers))
        assert sorted(index) == want
        for fname in set(index.values()):
            with safe_open(bundle / fname, "pt") as f:
                for name in f.keys():
                    with safe_open(tied_model / src_index[name], "pt") as g:
                        assert torch.equal(f.get_tensor(name), g.get_tensor(name))
        for extra in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                      "topology.yml"):
            assert (bundle / extra).exists(), extra


def test_script_and_console_entry_point(tiny_model, tmp_path):
    topo = write_topology(tmp_path / "t.yml", {"w": (1, ["model.layers.1-2"]), "v": (2, ["model.layers.3"])})
    script = Path(__file__).resolve().parent.parent / "scripts" / "split_model.py"
    proc = subprocess.run([sys.executable, str(script), "--model-path", str(tiny_model), "--topology", str(topo),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("100.0%") == 2  # each bundle's progress ends at 100%
    assert "\r" not in proc.stderr  # not a terminal: whole lines, no carriage returns in the log
    assert (tmp_path / "out" / "w" / "model.safetensors.index.json").exists()
    bad = subprocess.run([sys.executable, str(script), "--model-path", str(tmp_path), "--topology", str(topo),
                          "--output", str(tmp_path / "o2")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: no config.json")


def test_a_bundle_for_other_layers_says_what_it_holds(tiny_model, tmp_path):
    from cake.errors import ModelError
    from cake.model.weights import WeightFiles

    topo = write_topology(tmp_path / "t.yml", {"w": (1, ["model.layers.1-2"])})
    (bundle,) = split_model(tiny_model, topo, tmp_path / "out", quiet=True)
    with pytest.raises(ModelError) as e:
        WeightFiles(bundle).entry("model.layers.4.mlp.down_proj.weight")
    assert str(e.value) == (f"tensor 'model.layers.4.mlp.down_proj.weight' is not in '{bundle}', which holds layers "
                            f"1-2; give this node the full model folder (a worker can also take the bundle "
                            f"cake-split-model built for it from the same topology)")
