"""``python -m jaxmap.bench --moe``: two random MoE models of one active size, 8 and 64 experts, each decoded and
reported (shrunk here to a tiny shape; the figures in the README come from the real command)."""

from __future__ import annotations

from jaxmap import bench_moe
from jaxmap.cli.bench import main


def test_moe_workload_reports_both_expert_counts(monkeypatch, capsys):
    monkeypatch.setattr(bench_moe, "SHAPE", {**bench_moe.SHAPE, "vocab_size": 128, "hidden_size": 32,
                                             "moe_intermediate_size": 32, "num_hidden_layers": 1, "head_dim": 8})
    assert main(["--moe", "--new-tokens", "3", "--repeats", "1", "--no-compile-cache"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:2] in ("8 ", "64")]
    assert [r[0] for r in rows] == ["8", "64"] and rows[0][4] == rows[1][4]  # the same active size
    assert float(rows[0][2]) < float(rows[1][2]) and all(float(r[-1]) > 0 for r in rows)
    assert "ratio 64 / 8 experts" in out


def test_moe_apart_workload_reports_each_placement(monkeypatch, capsys):
    """--moe-apart: experts on the layer's device, computed on another CPU device, streamed; prefill and decode."""
    monkeypatch.setattr(bench_moe, "SHAPE", {**bench_moe.SHAPE, "vocab_size": 128, "hidden_size": 32,
                                             "moe_intermediate_size": 32, "num_hidden_layers": 1, "head_dim": 8})
    assert main(["--moe-apart", "--new-tokens", "3", "--repeats", "1", "--no-compile-cache"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["device"], ["cpu"], ["host"])]
    assert [r[0] for r in rows] == ["device", "cpu", "host"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
