"""Groundwork for ``python -m jaxmap.tune``: a saved plan replays the layer mode it was made with, so the plan tune
saves reproduces its choice under ``generate --plan``."""

from pathlib import Path

from jaxmap.api import load

TINY_LLAMA = str(Path(__file__).parent / "data" / "tiny-llama")


def test_plan_replays_layer_mode(tmp_path):
    plan = tmp_path / "plan.yaml"
    made = load(TINY_LLAMA, progress=False, layer_mode="per_layer", save_plan=plan, max_seq_len=64)
    assert "layer_mode: per_layer" in plan.read_text()
    replayed = load(TINY_LLAMA, progress=False, plan=plan)
    assert [s.mode for s in replayed.engine.stages] == ["per_layer"] * len(replayed.engine.stages)
    ids = [[1, 2, 3]]
    assert (replayed.generate(ids, max_new_tokens=4)[0].token_ids
            == made.generate(ids, max_new_tokens=4)[0].token_ids)


# ----------------------------------------------------------------------------------------------------------------------
# python -m jaxmap.tune

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from jaxmap.cli.common import config_from_model_arg  # noqa: E402
from jaxmap.config.hardware import Hardware  # noqa: E402
from jaxmap.errors import UserError  # noqa: E402
from jaxmap.planning.tune_candidates import Candidate, enumerate_candidates  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_candidates_keep_fixed_flags_and_order():
    config, hardware = config_from_model_arg(TINY_LLAMA), Hardware.from_preset("cpu-8")
    every = enumerate_candidates(config, hardware)
    assert every[0].name == "float32/isq=Q8_0/unrolled/tp1pp1"  # one device, 8-bit weights, one program first
    assert {c.layer_mode for c in every} == {"unrolled", "scan", "per_layer"}
    assert {(c.tp, c.pp) for c in every} == {(1, 1), (8, 1), (1, 4), (4, 2)}
    fixed = enumerate_candidates(config, hardware, {"isq": "Q4K", "tp": 2, "pp": 1, "layer_mode": "scan"})
    assert {(c.isq, c.tp, c.pp, c.layer_mode) for c in fixed} == {("Q4K", 2, 1, "scan")}
    assert {c.dtype for c in fixed} == {"float32", "bfloat16"}
    assert enumerate_candidates(config, hardware, isq_candidates=["none"], fixed={"dtype": "bfloat16"})[0].isq == "none"
    with pytest.raises(UserError, match="not a GGUF"):
        enumerate_candidates(config, hardware, isq_candidates=["native"])


def test_candidates_the_planner_refuses_are_kept_with_its_reason():
    config = config_from_model_arg(TINY_LLAMA)
    refused = enumerate_candidates(config, Hardware.from_preset("cpu-8"), {"tp": 3, "pp": 1})
    assert refused and all(c.refused and "8 attention heads do not divide over 3" in c.refused for c in refused)
    two = enumerate_candidates(config, Hardware.from_preset("2x24gb"), {"tp": 4, "pp": 1})
    assert all(c.refused and "needs 4 devices" in c.refused for c in two)


def test_budget_stops_starting_candidates(monkeypatch, tmp_path):
    """Past --budget no candidate starts (the table says so); the reference's time counts."""
    import jaxmap.tuning as tuning

    clock = [0.0]

    def spawn(spec, label):
        clock[0] += 10.0
        return {"kl": 0.0 if spec["layout"]["isq"] != "Q4K" else 1.0, "decode_tps": 5.0, "ttft_ms": 1.0,
                "peak_rss_mib": 1.0}

    monkeypatch.setattr(tuning, "_spawn", spawn)
    monkeypatch.setattr(tuning.time, "perf_counter", lambda: clock[0])
    cands = [Candidate("float32", isq, "unrolled", 1, 1) for isq in ("Q4K", "none", "Q8_0")]
    cands.append(Candidate("float32", "none", "scan", 3, 1, refused="no"))
    rows, plan = tuning.run_candidates(None, cands, workload=[(8, 1)], new_tokens=4, repeats=1, max_seq_len=64,
                                       quality_tokens=16, max_kl=0.05, budget_s=25.0, progress=False,
                                       work_dir=tmp_path)
    assert [r["verdict"] for r in rows] == ["rejected", "chosen", "not tried", "refused"]
    assert "--budget 25 s spent" in rows[2]["why"] and plan.endswith("plan-1.yaml")


@pytest.mark.parametrize("argv, message", [
    (["-m", "no/such/model"], "no such file or folder"),
    (["--budget", "0"], "--budget must be a positive"),
    (["--max-kl", "-1"], "--max-kl must be a number >= 0"),
    (["--max-kl", "nan"], "--max-kl must be a number >= 0"),
    (["--workload", "8y1"], "is not PROMPTxBATCH"),
])
def test_bad_input_is_one_line_exit_2(argv, message, capsys):
    from jaxmap.cli.tune import main

    assert main(["-m", TINY_LLAMA, *argv] if argv[0] != "-m" else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_tune_end_to_end_saves_a_plan_that_replays(tmp_path):
    """A real run on the tiny llama: Q4K is rejected by the default KL bound, Q8_0 chosen, and its saved plan
    replays the same layout and the same greedy tokens."""
    plan = tmp_path / "tuned.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "jaxmap.tune", "-m", TINY_LLAMA, "--tp", "1", "--pp", "1", "--dtype", "float32",
         "--layer-mode", "per_layer", "--isq-candidates", "Q8_0,Q4K", "--workload", "8x1", "--new-tokens", "4",
         "--max-seq-len", "64", "--quality-tokens", "32", "--budget", "600", "--save-plan", str(plan), "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {r["isq"]: r for r in json.loads(out.stdout)["rows"]}
    assert rows["Q8_0"]["verdict"] == "chosen" and rows["Q8_0"]["kl"] < 0.05
    assert rows["Q4K"]["verdict"] == "rejected" and "--max-kl 0.05" in rows["Q4K"]["why"]
    assert rows["Q8_0"]["decode_tps"] > 0 and rows["Q8_0"]["ttft_ms"] > 0 and rows["Q8_0"]["peak_rss_mib"] > 0
    text = plan.read_text()
    assert "layer_mode: per_layer" in text and "Q8_0" in text and "dtype: float32" in text
    replayed = load(TINY_LLAMA, progress=False, plan=plan)
    assert [s.mode for s in replayed.engine.stages] == ["per_layer"]
    direct = load(TINY_LLAMA, progress=False, dtype="float32", isq="Q8_0", layer_mode="per_layer", tp=1, pp=1,
                  max_seq_len=64)
    ids = [[1, 2, 3, 4]]
    assert (replayed.generate(ids, max_new_tokens=6)[0].token_ids
            == direct.generate(ids, max_new_tokens=6)[0].token_ids)
