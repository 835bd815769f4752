"""Two processes on 127.0.0.1 with 4 virtual CPU devices each compute what one process computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import jaxmap
from jaxmap.cli.launch import free_port, launch
from jaxmap.engine import multihost
from jaxmap.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "data" / "tiny-llama")
PROMPT = "Hello world, this is"
NEW = 8


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def reference() -> list[int]:
    model = jaxmap.load(TINY, devices="0", progress=False, max_seq_len=128)
    return model.generate(PROMPT, max_new_tokens=NEW, stop_at_eos=False)[0].token_ids


@pytest.mark.parametrize("layout", [["--pp", "2"], ["--tp", "8"]], ids=["pp2-one-stage-per-process", "tp8-across"])
def test_two_processes_match_one(reference, layout):
    command = [sys.executable, "-m", "jaxmap.generate", "-m", TINY, "--prompt", PROMPT, "--json", "--ignore-eos",
               "--max-new-tokens", str(NEW), "--max-seq-len", "128", "-q", *layout]
    status, out, errs = launch(command, num_processes=2, cpu_devices=4, timeout_s=240, cwd=str(ROOT), env=child_env())
    assert status == 0, "\n".join(e[-3000:] for e in errs)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]  # gloo logs on stdout too
    assert len(rows) == 1, out  # only process 0 prints
    assert rows[0]["token_ids"] == reference


def test_launch_kills_the_others_when_one_fails():
    code = "import os, sys, time; sys.exit(3) if os.environ['JAX_PROCESS_ID'] == '1' else time.sleep(120)"
    t0 = time.monotonic()
    status, _, _ = launch([sys.executable, "-c", code], num_processes=2, timeout_s=60)
    assert status == 3 and time.monotonic() - t0 < 30


def test_unreachable_coordinator_is_a_clear_error():
    port = free_port()  # nobody listens there
    proc = subprocess.run([sys.executable, "-m", "jaxmap.generate", "-m", TINY, "--prompt", "hi",
                           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
                           "--distributed-timeout", "2"], capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                          env=child_env())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"could not join the jax.distributed job at 127.0.0.1:{port} within 2 s" in proc.stderr


@pytest.mark.parametrize("kwargs, message", [
    ({"coordinator": "nohost"}, "HOST:PORT"),
    ({"coordinator": "127.0.0.1:1234"}, "needs --num-processes"),
    ({"coordinator": "127.0.0.1:1234", "num_processes": 2, "process_id": 2}, "0..1"),
    ({"num_processes": 0}, "at least 1"),
    ({"num_processes": "two"}, "integer"),
    ({"timeout_s": 0}, "at least 1 second"),
])
def test_bad_flags(kwargs, message):
    with pytest.raises(UserError, match=message):
        multihost.resolve(environ={}, **kwargs)


def test_environment_and_clusters():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    got = multihost.resolve(environ=env)
    assert (got.coordinator, got.num_processes, got.process_id, got.wanted) == ("10.0.0.1:1234", 4, 3, True)
    assert multihost.resolve(environ={"SLURM_JOB_ID": "7"}).auto  # jax detects SLURM by itself
    assert not multihost.resolve(environ={}).wanted


def test_two_process_example_restores_a_checkpoint(tmp_path, reference, capsys):
    """examples/two_processes.py with an orbax checkpoint: each process restores only its own stage's arrays."""
    import importlib.util

    from jaxmap.loading import open_source
    from jaxmap.materialize.checkpoint_writer import convert

    ckpt = convert(open_source(TINY), tmp_path / "ck", progress=False)
    spec = importlib.util.spec_from_file_location("two_processes", ROOT / "examples" / "two_processes.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    env = child_env()
    env["JAXMAP_EXAMPLE_MODEL"] = str(ckpt)
    assert example.main(env) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["stages"] == [[f"cpu[{i}]" for i in range(4)], [f"cpu[{i}]" for i in range(4, 8)]]
    model = jaxmap.load(str(ckpt), devices="0", progress=False, max_seq_len=128)
    assert row["token_ids"] == model.generate("Hello world", max_new_tokens=8, stop_at_eos=False)[0].token_ids
