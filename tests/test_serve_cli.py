"""``python -m jaxmap.serve`` as a process: bad flags are one line and exit 2; it logs its address, answers, and
exits cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "tiny-qwen3"


def _run(*args):
    return subprocess.run([sys.executable, "-m", "jaxmap.serve", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["--port", "70000"], "--port"),
    (["--max-batch-size", "0"], "--max-batch-size"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_flags_are_one_line(args, needle):
    result = _run("-m", str(TINY), *args)
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_serves_then_drains_on_sigterm():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "jaxmap.serve", "-m", str(TINY), "--port", str(port),
                             "--max-seq-len", "128", "--max-batch-size", "2"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = httpx.post(base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] >= 1
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/v1" in err
    assert "Traceback" not in err
