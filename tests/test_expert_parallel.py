"""Expert parallelism (``--ep``, issue 17): the plan's choice and refusals as data and on the command line, saved
plans replaying it, and runs on virtual CPU devices where tensor parallelism stays inside expert groups
(``ep`` below the device count), for quantized stacks and for gpt-oss's biased, clamped experts.

tests/test_moe_layouts.py checks float Mixtral and Qwen3-MoE under ep against transformers; this file adds what
those layouts leave out."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from reference.moe_data import load_gpt_oss_reference, load_moe_reference, write_moe_gguf

import jaxmap
from jaxmap.cli.plan import main as plan_main
from jaxmap.config.hardware import Hardware
from jaxmap.errors import UserError
from jaxmap.families import preset_config
from jaxmap.planning import expert_parallel
from jaxmap.planning.planner import plan
from jaxmap.planning.wishes import make_wish

HERE = Path(__file__).resolve().parent
MIXTRAL = preset_config("mixtral-8x7b")
GPT_OSS = HERE / "data" / "tiny-gpt-oss"


def _eps(m) -> list[int]:
    return [expert_parallel.stage_ep(s) for s in m.stages]


# ---- the plan (pure data, hardware presets) ---------------------------------------------------------------------

def test_auto_takes_the_largest_ep_dividing_devices_and_experts():
    m = plan(MIXTRAL, Hardware.from_preset("8xh100"), make_wish(tp=8, pp=1), dtype="bf16")
    assert _eps(m) == [8] and "expert parallel ep=8" in m.reason and "1 of 8 experts per device group" in m.reason


def test_auto_keeps_tp_inside_expert_groups_when_experts_are_fewer_than_devices():
    four = dataclasses.replace(MIXTRAL, num_experts=4)
    m = plan(four, Hardware.from_preset("8xh100"), make_wish(tp=8, pp=1), dtype="bf16")
    assert _eps(m) == [4] and "over tp=2 inside a group" in m.reason


def test_auto_falls_back_to_tp_inside_experts_without_a_common_factor():
    five = dataclasses.replace(MIXTRAL, num_experts=5, num_experts_per_tok=2)
    m = plan(five, Hardware.from_preset("8xh100"), make_wish(tp=8, pp=1), dtype="bf16")
    assert _eps(m) == [1] and "expert parallel unavailable" in m.reason


def test_ep_1_and_explicit_ep_are_kept_and_explained():
    hw = Hardware.from_preset("8xh100")
    assert _eps(plan(MIXTRAL, hw, make_wish(tp=8, pp=1, ep=1), dtype="bf16")) == [1]
    m = plan(MIXTRAL, hw, make_wish(tp=8, pp=1, ep=2), dtype="bf16")
    assert _eps(m) == [2] and "ep=2 as asked (--ep 2)" in m.reason and "over tp=4 inside a group" in m.reason


def test_dense_stages_get_no_ep():
    m = plan(preset_config("llama-3-8b"), Hardware.from_preset("8xh100"), make_wish(tp=8, pp=1), dtype="bf16")
    assert _eps(m) == [1] and "expert parallel" not in m.reason


@pytest.mark.parametrize("flags, message", [
    (["-m", "mixtral-8x7b", "--mesh", "8xh100", "--tp", "8", "--ep", "3"], "--ep 3 does not divide the 8 experts"),
    (["-m", "mixtral-8x7b", "--mesh", "8xh100", "--tp", "4", "--pp", "2", "--ep", "8"], "does not fit the 4 device"),
    (["-m", "llama-3-8b", "--mesh", "8xh100", "--tp", "8", "--ep", "2"], "is not a mixture of experts"),
])
def test_bad_ep_is_one_line_exit_2(flags, message, capsys):
    assert plan_main(flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_plan_json_and_table_show_ep(capsys):
    assert plan_main(["-m", "qwen3-235b-a22b", "--mesh", "8xh100", "--dtype", "bf16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["mesh"].get("ep") for s in out["stages"]] == [8] * len(out["stages"])
    assert plan_main(["-m", "qwen3-235b-a22b", "--mesh", "8xh100", "--dtype", "bf16"]) == 0
    assert "expert parallel ep=8" in capsys.readouterr().out


# ---- runs on virtual CPU devices ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_moe():
    return load_moe_reference("tiny-qwen3-moe")


@pytest.fixture(scope="module")
def q8_gguf(qwen_moe, tmp_path_factory):
    path = tmp_path_factory.mktemp("ep") / "q8.gguf"
    return write_moe_gguf("tiny-qwen3-moe", path, gguf.GGMLQuantizationType.Q8_0, expert_weights_norm=False)


@pytest.fixture(scope="module")
def q8_one(q8_gguf):
    return jaxmap.load(str(q8_gguf), max_seq_len=64, progress=False, devices="0", tp=1)


@pytest.mark.parametrize("ep", [2, 4])
def test_quantized_stacks_split_over_ep(qwen_moe, q8_gguf, q8_one, ep):
    """A Q8_0 GGUF's expert stacks over ep on 4 devices: whole experts at ep=4 (Q8_0 kept everywhere, where tp=4
    inside experts would cut the down projection's blocks), at ep=2 each group's experts split again over tp=2.
    Both agree with tp=4 without ep; against the file on one device they differ only as far as tp=4 makes
    attention's o_proj fall back to INT8 (8 inputs a device), and decode the same tokens."""
    split = jaxmap.load(str(q8_gguf), max_seq_len=64, progress=False, tp=4, pp=1, ep=ep)
    plain = jaxmap.load(str(q8_gguf), max_seq_len=64, progress=False, tp=4, pp=1, ep=1)
    assert _eps(split.device_map) == [ep] and _eps(plain.device_map) == [1]
    config = split.config
    layer = next(p for i, p in enumerate(split.engine.stages[0].params["layers"]) if config.is_moe_layer(i))
    assert layer["experts_gate"].qtype == "Q8_0"
    if ep == 4:
        assert layer["experts_down"].qtype == "Q8_0"
    ids = qwen_moe["input_ids"]
    for a, b, c in zip(split.forward_logits(ids), plain.forward_logits(ids), q8_one.forward_logits(ids), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
        np.testing.assert_allclose(a, c, atol=3e-2, rtol=0)
    got = [r.token_ids for r in split.generate(ids, max_new_tokens=6, stop_at_eos=False)]
    assert got == [r.token_ids for r in q8_one.generate(ids, max_new_tokens=6, stop_at_eos=False)]


def test_saved_plan_replays_ep_and_a_bad_one_is_refused(qwen_moe, tmp_path):
    path = tmp_path / "plan.yaml"
    made = jaxmap.load(str(qwen_moe["folder"]), dtype="float32", max_seq_len=64, progress=False, tp=4, pp=1, ep=2,
                       save_plan=path)
    replayed = jaxmap.load(str(qwen_moe["folder"]), max_seq_len=64, progress=False, plan=path)
    assert _eps(replayed.device_map) == [2]
    ids = qwen_moe["input_ids"][:1]
    assert (replayed.generate(ids, max_new_tokens=4, stop_at_eos=False)[0].token_ids
            == made.generate(ids, max_new_tokens=4, stop_at_eos=False)[0].token_ids)
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("ep: 2", "ep: 3"))
    with pytest.raises(UserError, match="ep=3"):
        jaxmap.load(str(qwen_moe["folder"]), max_seq_len=64, progress=False, plan=bad)


def test_scan_mode_runs_expert_parallel():
    """Mixtral's alike MoE layers in one lax.scan, experts over ep=2 with tp=2 inside each group: transformers."""
    ref = load_moe_reference("tiny-mixtral-swa")
    model = jaxmap.load(str(ref["folder"]), dtype="float32", max_seq_len=64, progress=False, tp=4, pp=1, ep=2,
                        layer_mode="scan")
    assert [s.mode for s in model.engine.stages] == ["scan"] and _eps(model.device_map) == [2]
    for logits, want in zip(model.forward_logits(ref["input_ids"]), ref["logits"], strict=True):
        np.testing.assert_allclose(logits, want, atol=2e-4, rtol=0)
    got = model.generate(ref["input_ids"], max_new_tokens=len(ref["greedy"][0]), stop_at_eos=False)
    assert [r.token_ids for r in got] == ref["greedy"]


@pytest.fixture(scope="module")
def oss_ref():
    return load_gpt_oss_reference()


@pytest.mark.parametrize("tp, ep", [(2, 2), (4, 2)])
def test_gpt_oss_biased_clamped_experts_under_ep(oss_ref, tp, ep):
    """gpt-oss's router and expert biases and clamped SwiGLU inside the expert-parallel MLP (the gate/up biases
    go with their experts, the down bias is added once after the all-reduce): transformers' logits and tokens."""
    model = jaxmap.load(str(GPT_OSS), dtype="float32", max_seq_len=64, progress=False, tp=tp, pp=1, ep=ep)
    assert _eps(model.device_map) == [ep]
    for logits, want in zip(model.forward_logits(oss_ref["input_ids"]), oss_ref["logits"], strict=True):
        np.testing.assert_allclose(logits, want, atol=2e-4, rtol=0)
    got = model.generate(oss_ref["input_ids"], max_new_tokens=len(oss_ref["greedy"][0]), stop_at_eos=False)
    assert [r.token_ids for r in got] == oss_ref["greedy"]
