"""``python -m jaxmap.launch`` refuses bad input with one ``error:`` line and status 2 before starting anything, and
reports a process killed by a signal as a shell does (128 + N)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import jaxmap.cli.launch
from jaxmap.cli.launch import launch
from jaxmap.errors import UserError


def run_launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxmap.launch", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "fragment"), [
    (["-n", "2", "--", "nosuchcommand_xyz"], "cannot run nosuchcommand_xyz: no such program"),
    (["-n", "2", "--", "/"], "cannot run /: permission denied"),
    (["--timeout", "-1", "--", "true"], "--timeout must be a positive number of seconds, got -1"),
    (["--timeout", "0", "--", "true"], "--timeout must be a positive number of seconds, got 0"),
    (["--cpu-devices", "-2", "--", "true"], "--cpu-devices must be at least 1, got -2"),
    (["--cpu-devices", "0", "--", "true"], "--cpu-devices must be at least 1, got 0"),
    (["-n", "0", "--", "true"], "-n must be at least 1, got 0"),
    (["--"], "give the command to run after --"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_is_one_error_line(args, fragment):
    r = run_launch(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not r.stdout


def test_a_process_that_cannot_start_leaves_no_others_running(monkeypatch):
    started = []

    def start_once(*args):
        if started:
            raise UserError("cannot run it: no such program")
        started.append(real_start(*args))
        return started[-1]

    real_start = jaxmap.launch.start
    monkeypatch.setattr(jaxmap.launch, "start", start_once)
    with pytest.raises(UserError, match="no such program"):
        launch([sys.executable, "-c", "import time; time.sleep(60)"], num_processes=3, timeout_s=5)
    assert len(started) == 1 and started[0].poll() is not None


def test_a_signal_is_reported_as_128_plus_its_number():
    t0 = time.monotonic()
    r = run_launch("-n", "2", "--", "bash", "-c", "kill -9 $$")
    assert r.returncode == 137, r.stderr
    assert "failed with status 137" in r.stderr.strip().splitlines()[-1]
    assert time.monotonic() - t0 < 30


def test_a_short_job_passes_its_output_through():
    r = run_launch("-n", "2", "--timeout", "30", "--", sys.executable, "-c",
                   "import os; print('process', os.environ['JAX_PROCESS_ID'])")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "process 0\n"
