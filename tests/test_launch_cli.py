"""``python -m jaxmap.launch`` refuses bad input with one ``error:`` line and status 2 before starting anything,
passes a user error that every process ends with through as that one line, and reports a process killed by a signal
as a shell does (128 + N)."""

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

    real_start = jaxmap.cli.launch.start
    monkeypatch.setattr(jaxmap.cli.launch, "start", start_once)
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


# Each process prints an INFO line, then an error line as jaxmap's commands do (process 1 a moment later, so that the
# launcher sees process 0 fail first), and exits with status 2.
FAIL = ("import os, sys, time; i = os.environ['JAX_PROCESS_ID']; print('INFO process', i, file=sys.stderr); "
        "time.sleep(0.3 * int(i)); print({error}, file=sys.stderr); sys.exit(2)")


def test_the_same_user_error_in_every_process_is_one_line():
    r = run_launch("-n", "2", "--timeout", "30", "--", sys.executable, "-c",
                   FAIL.format(error="'error: no such file or folder: /nonexistent'"))
    assert r.returncode == 2, r.stderr
    assert r.stderr == "error: no such file or folder: /nonexistent\n"
    assert not r.stdout


def test_a_missing_model_in_every_process_is_one_line():
    r = run_launch("-n", "2", "--timeout", "120", "--", sys.executable, "-m", "jaxmap.generate", "-m",
                   "/nonexistent", "-p", "hi")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "/nonexistent" in lines[0], r.stderr


@pytest.mark.parametrize(("error", "code"), [
    ("'error: bad input in process', i", "2"),  # different errors
    ("'error: the same'", "3"),  # the same line, but not a user error's status
    ("'something went wrong'", "2"),  # status 2, but not an error: line
], ids=["different-errors", "status-3", "no-error-line"])
def test_other_failures_keep_every_process_s_last_lines(error, code):
    r = run_launch("-n", "2", "--timeout", "30", "--", sys.executable, "-c",
                   FAIL.format(error=error).replace("sys.exit(2)", f"sys.exit({code})"))
    assert r.returncode == int(code), r.stderr
    lines = r.stderr.splitlines()
    assert "--- process 0 (stderr, last lines)" in lines and "--- process 1 (stderr, last lines)" in lines, r.stderr
    assert "INFO process 1" in lines, r.stderr
    assert lines[-1] == f"error: the 2-process job failed with status {code}", r.stderr
    if "bad input" in error:
        assert "error: bad input in process 0" in lines and "error: bad input in process 1" in lines, r.stderr


def test_a_process_cut_short_keeps_the_fuller_report(monkeypatch):
    """Process 1 would print the same error, but only after the launcher stopped waiting for it."""
    monkeypatch.setattr(jaxmap.cli.launch, "GRACE_S", 0.2)
    job = jaxmap.cli.launch.run_job([sys.executable, "-c", FAIL.format(error="'error: x'").replace("0.3", "5")],
                                    timeout_s=30)
    assert job.status == 2 and job.codes == [2, None], job
    assert jaxmap.cli.launch.common_user_error(job) is None
