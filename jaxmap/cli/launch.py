"""``python -m jaxmap.launch -n 2 -- python -m jaxmap.generate ...``: a multi-process job on this machine.

Starts N copies of a command with ``JAX_COORDINATOR_ADDRESS`` (127.0.0.1 and a free port), ``JAX_NUM_PROCESSES``
and ``JAX_PROCESS_ID`` set, as a cluster scheduler would on N hosts; with ``--cpu-devices K`` each process gets K
virtual CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=K``, ``JAX_PLATFORMS=cpu``). Process 0's
standard output is passed through; every process's standard error is kept and shown when one fails. All processes
end together: when one fails, the others get a moment (``GRACE_S``) to end by themselves and are then killed; past
the time limit all are killed at once.

When every process ends with the same user error (the same last ``error: ...`` line on stderr and exit status 2, as
``python -m jaxmap.generate -m /nonexistent`` does in each process), that one line is the whole report, once, with
status 2; any other failure shows each process's last lines.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from jaxmap.cli.common import guarded
from jaxmap.errors import ArgumentParser, UserError

GRACE_S = 2.0  # after the first failure, how long the others may take to end by themselves before they are killed
TIMED_OUT = 124


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(process_id: int, num_processes: int, port: int, cpu_devices: int | None,
              base: dict | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
    if cpu_devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={cpu_devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def check_job(command: Sequence[str], num_processes: int, cpu_devices: int | None, timeout_s: float) -> None:
    """Refuse a job that could only fail, before any process starts."""
    if not command:
        raise UserError("give the command to run after --, e.g. python -m jaxmap.launch -n 2 -- python -m "
                        "jaxmap.generate ...")
    if num_processes < 1:
        raise UserError(f"-n must be at least 1, got {num_processes}")
    if cpu_devices is not None and cpu_devices < 1:
        raise UserError(f"--cpu-devices must be at least 1, got {cpu_devices}")
    if not timeout_s > 0:
        raise UserError(f"--timeout must be a positive number of seconds, got {timeout_s:g}")


def start(command: Sequence[str], stdout, stderr, cwd: str | None, env: dict[str, str]) -> subprocess.Popen:
    """One process of the job; a program that cannot be run is the user's error, not a traceback."""
    if cwd is not None and not os.path.isdir(cwd):
        raise UserError(f"cannot run {command[0]} in {cwd}: no such folder")
    try:
        return subprocess.Popen(list(command), stdout=stdout, stderr=stderr, cwd=cwd, env=env)
    except FileNotFoundError:
        raise UserError(f"cannot run {command[0]}: no such program") from None
    except PermissionError:
        raise UserError(f"cannot run {command[0]}: permission denied (not an executable program)") from None
    except OSError as exc:
        raise UserError(f"cannot run {command[0]}: {exc.strerror or exc}") from None


@dataclass
class Job:
    """How a job ended: its status (see :func:`launch`), process 0's stdout, every process's stderr, and every
    process's own status as a shell reports it (128 + N for signal N), None for one the launcher killed."""

    status: int
    out: str
    errs: list[str]
    codes: list[int | None]


def launch(command: Sequence[str], num_processes: int = 2, cpu_devices: int | None = None, timeout_s: float = 300,
           cwd: str | None = None, env: dict | None = None) -> tuple[int, str, list[str]]:
    """Run ``command`` as ``num_processes`` processes; returns (exit status, process 0's stdout, every stderr).

    The status is 0 when all succeeded, else the first failure's as a shell reports it (128 + N for a process killed
    by signal N; 124 on the time limit).
    """
    job = run_job(command, num_processes, cpu_devices, timeout_s, cwd, env)
    return job.status, job.out, job.errs


def run_job(command: Sequence[str], num_processes: int = 2, cpu_devices: int | None = None, timeout_s: float = 300,
            cwd: str | None = None, env: dict | None = None) -> Job:
    """:func:`launch`, also telling how each process ended."""
    check_job(command, num_processes, cpu_devices, timeout_s)
    port = free_port()
    with contextlib.ExitStack() as files:
        outs = [files.enter_context(tempfile.TemporaryFile()) for _ in range(num_processes)]
        errs = [files.enter_context(tempfile.TemporaryFile()) for _ in range(num_processes)]
        procs: list[subprocess.Popen] = []
        try:
            for i in range(num_processes):
                procs.append(start(command, outs[i], errs[i], cwd,
                                   child_env(i, num_processes, port, cpu_devices, env)))
            status = wait_for(procs, timeout_s)
        finally:
            codes = [shell_status(p.poll()) for p in procs]  # before the kill: None is one still running
            for p in procs:  # only the processes this call started
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
        texts = [read_back(f) for f in outs + errs]
    return Job(status, texts[0], texts[num_processes:], codes)


def shell_status(code: int | None) -> int | None:
    """Popen's return code as a shell reports it: -N (killed by signal N) is 128 + N."""
    return code if code is None or code >= 0 else 128 - code


def wait_for(procs: list[subprocess.Popen], timeout_s: float, grace_s: float | None = None) -> int:
    """0 once all succeed; else the first failure's status as a shell reports it, or 124 past the time limit.

    After the first failure the others get ``grace_s`` (default ``GRACE_S``; within the time limit) to end by
    themselves, so that each one's own error is seen rather than cut short.
    """
    grace_s = GRACE_S if grace_s is None else grace_s
    deadline = time.monotonic() + timeout_s
    status = None
    while True:
        codes = [shell_status(p.poll()) for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed and status is None:
            status = failed[0]
            deadline = min(deadline, time.monotonic() + grace_s)
        if None not in codes:
            return status or 0
        if time.monotonic() > deadline:
            return TIMED_OUT if status is None else status
        time.sleep(0.1)


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1].strip() if lines else ""


def common_user_error(job: Job) -> str | None:
    """The one ``error: ...`` line when every process ended with that same user error (exit status 2, or killed by
    the launcher after printing it), else None: the failure needs each process's detail."""
    if job.status != 2:
        return None
    lines = {last_line(err) for err in job.errs}
    if len(lines) != 1 or any(code not in (2, None) for code in job.codes):
        return None
    line = lines.pop()
    return line if line.startswith("error: ") else None


def read_back(f) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m jaxmap.launch", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--processes", type=int, default=2)
    parser.add_argument("--cpu-devices", type=int, default=None, help="virtual CPU devices per process")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before every process is killed")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    return guarded(run, parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the job; pass process 0's output through, and every process's last lines when one fails (just the one
    line when all failed with the same user error)."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    job = run_job(command, args.processes, args.cpu_devices, args.timeout)
    sys.stdout.write(job.out)
    if not job.status:
        sys.stderr.write(job.errs[0])
        return 0
    error = common_user_error(job)
    if error is not None:
        print(error, file=sys.stderr)
        return 2
    for i, err in enumerate(job.errs):
        tail = "\n".join(err.splitlines()[-15:])
        print(f"--- process {i} (stderr, last lines)\n{tail}", file=sys.stderr)
    what = "timed out" if job.status == TIMED_OUT else f"failed with status {job.status}"
    print(f"error: the {args.processes}-process job {what}", file=sys.stderr)
    return job.status


if __name__ == "__main__":
    sys.exit(main())
