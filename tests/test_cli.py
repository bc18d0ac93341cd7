"""The command line refuses what it would ignore or misread, before loading anything: one line each."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cake import launch
from cake.cli import main
from conftest import write_topology

BAD = {
    "worker-option-on-a-master": (["--name", "w"], "--name: worker option(s); add --mode worker to run a worker"),
    "worker-options-on-a-master": (["--address", "0.0.0.0:1", "--kv-budget", "10"],
                                   "--address, --kv-budget: worker option(s); add --mode worker"),
    "master-option-on-a-worker": (["--mode", "worker", "--name", "w", "-p", "hi"],
                                  "--prompt: master option(s); a worker takes its work from the master"),
    "api-and-check": (["--api", "8000", "--check"], "--api and --check: pick one"),
    "prompt-with-api": (["--api", "8000", "-p", "hi", "--raw"],
                        "--prompt, --raw: for one prompt; with --api each request brings its own"),
    "output-ids-with-check": (["--check", "--output-ids", "x.json"], "--output-ids: for one prompt; with --check"),
    "negative-kv-budget": (["--mode", "worker", "--name", "w", "--kv-budget", "-5"], "--kv-budget -5 must be above 0"),
    "zero-request-timeout": (["--request-timeout", "0"], "--request-timeout 0 must be above 0"),
    "negative-threads": (["--threads", "-1"], "--threads -1 must be at least 0"),
    "negative-context": (["--context", "-1"], "--context -1 must be at least 0"),
    "no-relay-on-a-worker": (["--mode", "worker", "--name", "w", "--no-relay"],
                             "--relay/--no-relay: master option(s)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_options_this_mode_would_ignore_are_usage_errors(case, tiny_model):
    args, needle = BAD[case]
    result = CliRunner().invoke(main, ["--model", str(tiny_model), *args])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.output


def test_sampling_range_errors_say_the_range(tiny_model):
    result = CliRunner().invoke(main, ["--model", str(tiny_model), "--top-p", "1.5", "-n", "1"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: --top-p 1.5 is out of range: it must be above 0 and at most 1 (off)"


def test_output_ids_into_a_missing_folder_fails_before_generating(tiny_model, tmp_path):
    result = CliRunner().invoke(main, ["--model", str(tiny_model), "-p", "hi", "-n", "3", "--output-ids",
                                       str(tmp_path / "nope" / "ids.json")])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip() == f"error: --output-ids: folder '{tmp_path / 'nope'}' does not exist; create it " \
                                    f"or pick another file"


def test_a_request_slower_than_the_timeout_names_the_timeout(tiny_model, cluster):
    """A prompt that cannot finish within --request-timeout is retried once, then the error says so (not
    that the worker keeps losing sessions)."""
    from cake.client import Options
    from cake.errors import WorkerError
    from cake.generate import generate
    from cake.master import Master
    from cake.sampling import SamplingParams
    from cake.topology import load_topology

    c = cluster(tiny_model, {"w": ["model.layers.0-5"]})
    master = Master(tiny_model, load_topology(c.topology), options=Options(request_timeout=0.001))

    async def go():
        await master.connect()
        try:
            async for _ in generate(master, list(range(1000, 3000)), SamplingParams(), 2, ()):
                pass
        finally:
            await master.close()

    with pytest.raises(WorkerError) as e:
        asyncio.run(go())
    assert str(e.value) == ("worker 'w' did not answer within --request-timeout (0.001s) 2 times in a row: a long "
                            "prompt on a slow node needs a larger --request-timeout; otherwise check that worker's log")


def test_a_worker_listens_on_its_topology_port_and_finds_its_bundles_topology(tiny_model, tmp_path):
    """Without --address a worker listens on its own port from the topology; started from a
    cake-split-model bundle it needs no --topology (the bundle carries one)."""
    from cake.split import split_model

    port = launch.free_port()
    topology = write_topology(tmp_path / "t.yml", {"w": (port, ["model.layers.0-5"])})
    (bundle,) = split_model(tiny_model, topology, tmp_path / "bundles", quiet=True)
    log = tmp_path / "w.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cake", "--mode", "worker", "--model", str(bundle),
                                 "--name", "w", "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT)
    try:
        launch.wait_ready(port, proc)
        assert f"serving layers 0-5 on 127.0.0.1:{port}" in log.read_text()  # loopback in the topology
    finally:
        launch.stop(proc)


def test_the_prompt_can_come_from_stdin(tiny_model, tmp_path):
    import json

    from transformers import PreTrainedTokenizerFast

    ids = tmp_path / "ids.json"
    proc = subprocess.run([sys.executable, "-m", "cake", "--model", str(tiny_model), "-p", "-", "--raw", "-n", "2",
                           "--output-ids", str(ids), "-q"], input="Hello from stdin", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(ids.read_text())["prompt"] == PreTrainedTokenizerFast.from_pretrained(str(tiny_model))(
        "Hello from stdin")["input_ids"]
    empty = subprocess.run([sys.executable, "-m", "cake", "--model", str(tiny_model), "-p", "-"], input="  \n",
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode == 1
    assert empty.stderr.strip() == "error: the prompt is empty; give --prompt TEXT, or --prompt - with text on stdin"


def test_a_broken_generation_config_is_one_line_before_any_loading(tiny_model, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny_model.iterdir():
        if f.name != "generation_config.json":
            (folder / f.name).symlink_to(f)
    (folder / "generation_config.json").write_text("{broken")
    result = CliRunner().invoke(main, ["--model", str(folder), "-p", "hi", "-n", "2"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip() == (f"error: '{folder / 'generation_config.json'}' is not valid JSON (line 1); fix "
                                     f"or restore that file")


def test_help_and_version_answer_without_loading_torch():
    """`cake --help` is what a newcomer types first: it must not wait seconds for torch to import."""
    probe = ("import sys, runpy; sys.argv = ['cake', '--help']\n"
             "try:\n    runpy.run_module('cake', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "--quantize" in r.stdout and r.stdout.strip().splitlines()[-1] == "False"
    v = subprocess.run([sys.executable, "-m", "cake", "--version"], capture_output=True, text=True, timeout=60)
    from cake import __version__
    assert v.returncode == 0 and v.stdout.strip() == f"cake, version {__version__}"


def cake(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cake", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, line", [
    (["--frobnicate"], "error: No such option '--frobnicate'."),
    (["--mode", "boss"], "error: Invalid value for '--mode': 'boss' is not one of 'master', 'worker'."),
    (["-n", "0"], "error: --max-tokens 0 must be above 0"),
])
def test_usage_errors_are_one_line_in_the_style_of_every_other_error(args, line, tiny_model):
    r = cake("--model", str(tiny_model), *args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == f"{line} (see cake --help)", r.stderr
    split = subprocess.run([sys.executable, "-m", "cake.split", "--topology", "t.yml"], capture_output=True,
                           text=True, timeout=60)
    assert split.returncode == 2 and split.stderr.strip() == ("error: Missing option '--model-path'. "
                                                              "(see cake-split-model --help)"), split.stderr


def test_a_context_above_the_models_length_says_it_was_capped(tiny_model):
    r = cake("--model", str(tiny_model), "-n", "1", "-p", "hi", "--context", "100000")
    assert r.returncode == 0, r.stderr
    assert "--context 100000 is more than the model's 8192 positions: capped to 8192" in r.stderr


def test_a_worker_nothing_listens_for_is_connection_refused_in_whole_seconds(tiny_model, tmp_path):
    port = launch.free_port()
    topology = write_topology(tmp_path / "t.yml", {"w": (port, ["model.layers.0-5"])})
    r = cake("--model", str(tiny_model), "--topology", str(topology), "-n", "1", "--retry-timeout", "1.5")
    assert r.returncode == 1
    assert f"worker 'w' at 127.0.0.1:{port}: connection refused; retrying for up to 1s" in r.stderr \
        or f"worker 'w' at 127.0.0.1:{port}: connection refused; retrying for up to 2s" in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"error: worker 'w' at 127.0.0.1:{port} is unreachable (connection refused) after 1.5s"), r.stderr


def test_a_bare_address_port_keeps_the_topologys_interface(tiny_model, tmp_path):
    """`--address PORT` (as `--api PORT`): the port given, on the interface the topology implies (loopback
    here), with the warning that the master looks where the topology says."""
    port, other = launch.free_port(), launch.free_port()
    topology = write_topology(tmp_path / "t.yml", {"w": (port, ["model.layers.0-5"])})
    log = tmp_path / "w.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cake", "--mode", "worker", "--model", str(tiny_model),
                                 "--topology", str(topology), "--name", "w", "--device", "cpu", "--address",
                                 str(other)], stdout=out, stderr=subprocess.STDOUT)
    try:
        launch.wait_ready(other, proc)
        text = log.read_text()
        assert f"serving layers 0-5 on 127.0.0.1:{other}" in text
        assert f"listening on port {other}, but the topology gives worker 'w' 127.0.0.1:{port}" in text
    finally:
        launch.stop(proc)
