"""The quality tool: its statistics on known inputs, its table end to end on a tiny model, and one clear line for
bad input (no timings are checked)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxmap.calibrate.quality import Scores, near_ties, wilson, windows

TINY_LLAMA = str(Path(__file__).parent / "data" / "tiny-llama")


def test_wilson_interval_known_values():
    lo, hi = wilson(98, 100)  # textbook value for 98/100: 0.9300 - 0.9945
    assert lo == pytest.approx(0.9300, abs=5e-4) and hi == pytest.approx(0.9945, abs=5e-4)
    lo, hi = wilson(448, 448)  # all agree: the upper end is 1, the lower end still below it
    assert hi == 1.0 and 0.99 < lo < 1.0
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and 0.0 < hi < 0.35
    lo, hi = wilson(50, 100)
    assert 0.5 - lo == pytest.approx(hi - 0.5)


def test_near_ties_reads_the_top_two_gap():
    logits = np.array([[5.0, 4.97, 0.0], [5.0, 1.0, 4.0], [0.0, 2.0, 2.04], [1.0, 1.0, 1.0]])
    assert near_ties(logits).tolist() == [True, False, True, True]
    assert near_ties(logits, margin=0.01).tolist() == [False, False, False, True]


def test_windows_drop_a_short_tail_unless_it_is_all():
    ids = list(range(10))
    assert windows(ids, 4, 16) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows(ids, 4, 1) == [[0, 1, 2, 3]]
    assert windows(ids, 20, 16) == [ids]


def test_scores_count_misses_and_near_tie_misses():
    reference = np.array([[3.0, 2.99, 0.0], [0.0, 5.0, 1.0], [4.0, 0.0, 1.0]])
    logits = np.array([[2.99, 3.0, 0.0], [0.0, 1.0, 5.0], [4.0, 0.0, 1.0]])  # one near-tie miss, one real miss
    s = Scores()
    s.add(logits, [0, 1, 2], reference)
    row = s.row()
    assert (row["misses"], row["tie_misses"]) == (2, 1)
    assert row["top1"] == pytest.approx(1 / 3) and row["top1_lo"] < row["top1"] < row["top1_hi"]
    assert row["kl"] > 0 and row["mae"] > 0


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxmap.quality", *args], capture_output=True, text=True,
                          timeout=600)


def test_quality_table_on_a_tiny_model(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    r = run("-m", TINY_LLAMA, "--types", "none,Q8_0,Q4K", "--text", str(text), "--tokens", "48", "--windows", "2",
            "--new-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert "96 tokens of text.txt in 2 window(s)" in r.stdout
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| isq")}
    assert list(rows) == ["none", "Q8_0", "Q4K"]
    assert rows["none"][3] == "reference"
    for isq in ("Q8_0", "Q4K"):
        top1, lo, hi = map(float, re.match(r"([\d.]+)% \(([\d.]+)-([\d.]+)\)", rows[isq][3]).groups())
        assert lo <= top1 <= hi
        misses = int(rows[isq][4].split()[0])
        assert misses == round((100 - top1) / 100 * 96)
    assert float(rows["Q8_0"][2]) < float(rows["Q4K"][2])  # mean KL: 8 bits beat 4.5


@pytest.mark.parametrize("args, fragment", [
    (["--types", "none,Q9"], "unknown --isq type 'Q9'"),
    (["--tokens", "3"], "--tokens must be at least 16"),
    (["--windows", "0"], "--windows must be at least 1"),
    (["--text", "/nonexistent/text.txt"], "cannot read scored text"),
])
def test_quality_bad_input_is_one_line(args, fragment, run_main):
    """In this process (the command's main; the table test above runs ``python -m jaxmap.quality``)."""
    from jaxmap.cli.quality import main

    r = run_main(main, "-m", TINY_LLAMA, *args)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_quality_refuses_a_model_without_tokenizer(run_main):
    from jaxmap.cli.quality import main

    r = run_main(main, "-m", "preset:tiny", "--types", "none")
    assert r.returncode == 2 and "has no tokenizer" in r.stderr and "Traceback" not in r.stderr
