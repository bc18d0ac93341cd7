from __future__ import annotations

import pytest
from click.testing import CliRunner

from cake.cli import main
from cake.errors import TopologyError
from cake.layer_ranges import format_layers
from cake.topology import Stage, load_topology, parse_layers, parse_topology


def topo(**workers):
    return parse_topology({n: {"host": f"10.0.0.{i}:10128", "description": n, "layers": l}
                           for i, (n, l) in enumerate(workers.items())})


def test_ranges():
    assert parse_layers("model.layers.3", "w") == [3]
    assert parse_layers("model.layers.0-5", "w") == [0, 1, 2, 3, 4, 5]
    assert format_layers([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_stages_merge_runs_and_leave_gaps_to_master():
    t = topo(a=["model.layers.0-1", "model.layers.4"], b=["model.layers.5"])
    got = [(s.start, s.end, s.name) for s in t.stages(6)]
    assert got == [(0, 2, "a"), (2, 4, "master"), (4, 5, "a"), (5, 6, "b")]


def test_adjacent_ranges_of_one_worker_are_one_stage():
    t = topo(a=["model.layers.0-1", "model.layers.2-3"])
    assert [(s.start, s.end) for s in t.stages(4)] == [(0, 4)]


def test_no_topology_is_all_master():
    assert load_topology(None).stages(3) == [Stage(0, 3, None)]


@pytest.mark.parametrize("data, needle", [
    ({"a": {"host": "h:1", "layers": ["model.layers.0-3"]}, "b": {"host": "h:2", "layers": ["model.layers.3"]}},
     "model.layers.3 is listed by both 'a' and 'b'"),
    ({"a": {"host": "h:1", "layers": ["layers.0-3"]}}, "malformed layer range 'layers.0-3'"),
    ({"a": {"host": "h:1", "layers": ["model.layers.5-2"]}}, "ends before it starts"),
    ({"a": {"host": "h", "layers": ["model.layers.0"]}}, "host 'h' needs a port"),
    ({"a": {"host": "h:99999", "layers": ["model.layers.0"]}}, "needs a port"),
    ({"a": {"layers": ["model.layers.0"]}}, "worker 'a' has no 'host'"),
    ({"a": {"host": "h:1", "layers": "model.layers.0"}}, "'layers' must be a list"),
    (["a"], "expected a mapping"),
    (None, "names no workers; add one (see examples/topology.yml), or leave out --topology"),
    ({}, "names no workers"),
    ({"a": {"host": "h:1", "layers": ["model.layers.0"]}, "b": {"host": "h:1", "layers": ["model.layers.1"]}},
     "workers 'a' and 'b' have the same host 'h:1'; give each worker its own port"),
    ({"a": {"host": "h:1", "layers": []}}, "worker 'a' lists no layers"),
])
def test_validation_errors(data, needle):
    with pytest.raises(TopologyError, match=None) as e:
        parse_topology(data)
    assert needle in str(e.value)


def test_layers_beyond_model():
    with pytest.raises(TopologyError, match="lists model.layers.9 but the model has only 6 layers"):
        topo(a=["model.layers.4-9"]).stages(6)


# ---- the same errors through the CLI: exit code 1 and one clear line, no traceback ----

CASES = {
    "overlap": ("a:\n  host: '127.0.0.1:1'\n  layers: ['model.layers.0-2']\n"
                "b:\n  host: '127.0.0.1:2'\n  layers: ['model.layers.2']\n", "a", "listed by both"),
    "beyond": ("a:\n  host: '127.0.0.1:1'\n  layers: ['model.layers.0-40']\n", "a", "but the model has only 6"),
    "malformed": ("a:\n  host: '127.0.0.1:1'\n  layers: ['model.layer.0']\n", "a", "malformed layer range"),
    "unknown-name": ("a:\n  host: '127.0.0.1:1'\n  layers: ['model.layers.0']\n", "zz", "'zz' is not in the topology"),
    "no-port": ("a:\n  host: '127.0.0.1'\n  layers: ['model.layers.0']\n", "a", "needs a port"),
    "bad-yaml": ("a: [\n", "a", "is not valid YAML"),
    "empty": ("# nothing yet\n", "a", "names no workers"),
    "same-name-twice": ("a:\n  host: '127.0.0.1:1'\n  layers: ['model.layers.0']\n"
                        "a:\n  host: '127.0.0.1:2'\n  layers: ['model.layers.1']\n", "a", "has 'a' twice in one mapping (line 4)"),
}


@pytest.mark.parametrize("mode, case", [("worker", c) for c in CASES] +
                         [("master", c) for c in CASES if c != "unknown-name"])  # the master has no --name
def test_cli_topology_errors_are_one_line(case, mode, tiny_model, tmp_path):
    text, name, needle = CASES[case]
    path = tmp_path / "t.yml"
    path.write_text(text)
    args = ["--mode", mode, "--model", str(tiny_model), "--topology", str(path)]
    args += ["--name", name, "--address", "127.0.0.1:1"] if mode == "worker" else ["--prompt", "x", "-n", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_yaml_anchors_and_merge_keys_still_work(tmp_path):
    """Refusing a worker named twice must not refuse YAML's own `<<: *anchor` (fields given next to it win)."""
    path = tmp_path / "t.yml"
    path.write_text("w1: &base\n  description: gpu box\n  host: 10.0.0.1:10128\n  layers: ['model.layers.0-2']\n"
                    "w2:\n  <<: *base\n  host: 10.0.0.2:10128\n  layers: ['model.layers.3-5']\n")
    t = load_topology(path)
    assert (t.workers["w2"].description, t.workers["w2"].host, t.workers["w2"].layers) == ("gpu box", "10.0.0.2",
                                                                                          (3, 4, 5))


def test_an_entry_without_layers_is_placed_by_the_master():
    t = parse_topology({"a": {"host": "h:1", "layers": ["model.layers.0-1"]}, "b": {"host": "h:2"}})
    assert [w.name for w in t.unplaced] == ["b"] and t.workers["a"].placed
    with pytest.raises(TopologyError, match=r"worker\(s\) b list no layers and are not placed yet"):
        t.stages(4)
    planned = t.with_layers({"b": [2, 3]})
    assert not planned.unplaced and [str(s) for s in planned.stages(4)] == ["a[0-1]", "b[2-3]"]
