"""The benchmark's command line runs end to end on a tiny model: every figure it prints is there (no timings are
checked; the benchmark measures, tests check behaviour)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TINY_LLAMA = str(Path(__file__).parent / "data" / "tiny-llama")


def test_bench_prints_every_figure_for_each_layout():
    r = subprocess.run([sys.executable, "-m", "jaxmap.bench", "-m", TINY_LLAMA, "--workload", "4x1,4x2",
                        "--new-tokens", "3", "--repeats", "2", "--max-seq-len", "64",
                        "--layouts", "f32:isq=none", "q8:isq=Q8_0"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "median of 2 timed runs" in lines[0]
    assert lines[1].split() == ["impl", "prompt", "batch", "TTFT", "ms", "1st", "TTFT", "compile", "s",
                                "prefill", "t/s", "decode", "t/s", "peak", "RSS", "MiB"]
    rows = [line.split() for line in lines[3:] if line.strip()]
    assert [(row[0], row[1], row[2]) for row in rows] == [("f32", "4", "1"), ("f32", "4", "2"), ("q8", "4", "1"),
                                                         ("q8", "4", "2")]
    assert all(float(v) > 0 for row in rows for v in row[3:]), rows


def test_bench_refuses_zero_repeats():
    r = subprocess.run([sys.executable, "-m", "jaxmap.bench", "--repeats", "0"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "--repeats must be at least 1" in r.stderr
