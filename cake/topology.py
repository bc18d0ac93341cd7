"""Topology file (the seed's YAML format) -> validated worker assignments -> ordered stages.

    worker_name:
      host: 'host:port'
      description: 'free text'
      layers: ['model.layers.0-5', 'model.layers.9']

A *stage* is a maximal run of consecutive layers owned by one node; layers no worker lists run on the
master. The pipeline sends one request per stage per step.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from cake.errors import TopologyError

_RANGE = re.compile(r"^model\.layers\.(\d+)(?:-(\d+))?$")


@dataclass(frozen=True)
class Worker:
    name: str
    host: str
    port: int
    description: str
    layers: tuple[int, ...]
    placed: bool = True  # False: the entry lists no layers, and the master places it (cake.placement)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Stage:
    """Layers [start, end) run by `worker` (None: the master)."""

    start: int
    end: int
    worker: Worker | None = None

    @property
    def name(self) -> str:
        return self.worker.name if self.worker else "master"

    def __str__(self) -> str:
        return f"{self.name}[{self.start}-{self.end - 1}]"


@dataclass
class Topology:
    workers: dict[str, Worker] = field(default_factory=dict)
    planned: bool = False  # some workers' layers come from the master's plan (with_layers), not the file

    @functools.cached_property
    def digest(self) -> str:
        """A short fingerprint of who serves what where (descriptions aside): nodes started with different
        topology files can tell, since relays follow each worker's own file."""
        text = json.dumps(sorted((w.name, w.host, w.port, list(w.layers)) for w in self.workers.values()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def owner_of(self) -> dict[int, Worker]:
        return {layer: w for w in self.workers.values() for layer in w.layers}

    @property
    def unplaced(self) -> list[Worker]:
        """Entries without `layers`, in file order: the master plans their layers."""
        return [w for w in self.workers.values() if not w.placed]

    def with_layers(self, layers: dict[str, list[int]]) -> "Topology":
        """This topology with the given workers' layers (a plan) filled in."""
        return Topology({name: replace(w, layers=tuple(layers.get(name, w.layers)), placed=True)
                         for name, w in self.workers.items()}, planned=self.planned or bool(self.unplaced))

    def stages(self, num_layers: int) -> list[Stage]:
        """Compile to the ordered list of stages covering layers 0..num_layers-1."""
        if self.unplaced:
            raise TopologyError(f"worker(s) {', '.join(w.name for w in self.unplaced)} list no layers and are not "
                                f"placed yet; the master places them when it starts (see the plan with cake --plan), "
                                f"or list their layers in the topology file")
        self.check_layers(num_layers)
        owners = self.owner_of()
        stages: list[Stage] = []
        for layer in range(num_layers):
            worker = owners.get(layer)
            last = stages[-1] if stages else None
            if last is not None and last.worker is worker and last.end == layer:
                stages[-1] = Stage(last.start, layer + 1, worker)
            else:
                stages.append(Stage(layer, layer + 1, worker))
        return stages

    def check_layers(self, num_layers: int) -> None:
        for w in self.workers.values():
            beyond = [i for i in w.layers if i >= num_layers]
            if beyond:
                raise TopologyError(
                    f"worker '{w.name}' lists model.layers.{max(beyond)} but the model has only "
                    f"{num_layers} layers (0-{num_layers - 1}); fix its 'layers' in the topology file"
                )

    def worker(self, name: str) -> Worker:
        if name not in self.workers:
            known = ", ".join(sorted(self.workers)) or "none"
            raise TopologyError(
                f"worker name '{name}' is not in the topology file (workers there: {known}); "
                f"pass one of them with --name"
            )
        return self.workers[name]


def parse_layers(spec: object, worker: str) -> list[int]:
    if not isinstance(spec, str):
        raise TopologyError(
            f"worker '{worker}': layer entry {spec!r} must be a string like 'model.layers.0-5'"
        )
    m = _RANGE.match(spec.strip())
    if not m:
        raise TopologyError(
            f"worker '{worker}': malformed layer range '{spec}'; write 'model.layers.N' or 'model.layers.N-M'"
        )
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) is not None else start
    if end < start:
        raise TopologyError(
            f"worker '{worker}': layer range '{spec}' ends before it starts; write 'model.layers.{end}-{start}'"
        )
    return list(range(start, end + 1))


def split_address(value: str) -> tuple[str, int] | None:
    """'host:port' (or '[v6]:port') -> (host, port); None when there is no valid port."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def parse_host(value: object, worker: str) -> tuple[str, int]:
    if not isinstance(value, str) or not value.strip():
        raise TopologyError(f"worker '{worker}' has no 'host'; add host: 'address:port'")
    parsed = split_address(value)
    if parsed is None:
        raise TopologyError(
            f"worker '{worker}': host '{value}' needs a port between 1 and 65535, e.g. 'myhost:10128'")
    return parsed


def parse_topology(data: object, source: str = "topology") -> Topology:
    if data is None or data == {}:
        raise TopologyError(f"{source} names no workers; add one (see examples/topology.yml), or leave out "
                            f"--topology to run every layer on the master")
    if not isinstance(data, dict):
        raise TopologyError(f"{source}: expected a mapping of worker name -> host/description/layers")
    topo = Topology()
    seen: dict[int, str] = {}
    addresses: dict[tuple[str, int], str] = {}
    for name, entry in data.items():
        name = str(name)
        if not isinstance(entry, dict):
            raise TopologyError(f"{source}: worker '{name}' must be a mapping with host, description, layers")
        host, port = parse_host(entry.get("host"), name)
        if (host, port) in addresses:
            raise TopologyError(f"workers '{addresses[host, port]}' and '{name}' have the same host "
                                f"'{host}:{port}'; give each worker its own port")
        addresses[host, port] = name
        if "layers" not in entry:  # the master places it
            topo.workers[name] = Worker(name=name, host=host, port=port,
                                        description=str(entry.get("description") or ""), layers=(), placed=False)
            continue
        specs = entry.get("layers") or []
        if not isinstance(specs, list):
            raise TopologyError(f"worker '{name}': 'layers' must be a list like ['model.layers.0-5']")
        if not specs:
            raise TopologyError(f"worker '{name}' lists no layers; give it some, like layers: ['model.layers.0-5'], "
                                f"leave out 'layers' to let the master place it, or remove it")
        layers: list[int] = []
        for spec in specs:
            for layer in parse_layers(spec, name):
                if layer in seen:
                    raise TopologyError(
                        f"model.layers.{layer} is listed by both '{seen[layer]}' and '{name}'; "
                        f"each layer must belong to one worker"
                    )
                seen[layer] = name
                layers.append(layer)
        topo.workers[name] = Worker(
            name=name, host=host, port=port, description=str(entry.get("description") or ""),
            layers=tuple(sorted(layers)),
        )
    return topo


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: object, line: int):
        super().__init__(str(key))
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (not the last one wins)."""

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges fields in; keys given here override them, as in YAML
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # not a name; the parser refuses it with its own message
            if key in keys:
                raise DuplicateKey(key, key_node.start_mark.line + 1)
            keys.add(key)
        return super().construct_mapping(node, deep)


def load_topology(path: str | Path | None) -> Topology:
    """None means no topology: every layer runs on the master."""
    if path is None:
        return Topology()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise TopologyError(f"cannot read topology file '{p}': {e.strerror}") from None
    try:
        data = yaml.load(text, _UniqueKeyLoader)
    except DuplicateKey as e:
        raise TopologyError(f"topology file '{p}' has '{e}' twice in one mapping (line {e.line}); name each "
                            f"worker, and each field of a worker, once") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise TopologyError(f"topology file '{p}' is not valid YAML{where}") from None
    return parse_topology(data, str(p))
