"""The ``scan`` layer mode (engine/scan_stage.py): a stage's alike layers in one ``lax.scan`` give the logits and
greedy tokens of the unrolled stage, across quantized weights, tensor and pipeline parallelism, families whose layers
alternate, MoE stages with a dense layer, per-layer ISQ types, continuous batching's row copies and the program
store."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import jaxmap
from jaxmap.engine import program_store
from jaxmap.engine.scan_stage import LayerView, Segment, segments

DATA = Path(__file__).parent / "data"
PROMPTS = [[5, 17, 99, 3, 250, 8, 31, 64, 2, 77, 12], [42, 7, 300]]  # past tiny Gemma's 8-key window
NEW = 8


def _run(model, prompts=PROMPTS):
    tokens = [r.token_ids for r in model.generate(prompts, max_new_tokens=NEW, stop_at_eos=False)]
    return model.forward_logits(prompts), tokens


def _assert_same(a, b, tol=2e-4):
    (la, ta), (lb, tb) = a, b
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)
    assert ta == tb


def _pair(model, prompts=PROMPTS, tol=2e-4, **kw):
    """(unrolled, scan) of one model and wish; checks they agree and returns the scan model."""
    unrolled = jaxmap.load(model, layer_mode="unrolled", progress=False, **kw)
    scan = jaxmap.load(model, layer_mode="scan", progress=False, **kw)
    _assert_same(_run(unrolled, prompts), _run(scan, prompts), tol)
    return scan


def test_segments_find_repeating_periods():
    assert segments(list("aaaa")) == [Segment(0, 1, 4)]
    assert segments(list("sfsfsf")) == [Segment(0, 2, 3)]                     # Gemma 2: sliding, full
    assert segments(list("sssssf")) == [Segment(0, 1, 5), Segment(5, 1, 1)]  # Gemma 3 270M's first six
    assert segments(list("sssssf" * 3)) == [Segment(0, 6, 3)]
    assert segments(list("mdmmm")) == [Segment(0, 1, 1), Segment(1, 1, 1), Segment(2, 1, 3)]  # MoE, a dense one
    assert segments(list("abc")) == [Segment(0, 1, 1), Segment(1, 1, 1), Segment(2, 1, 1)]


@pytest.mark.parametrize("wish", [dict(devices="0"), dict(tp=2, pp=1), dict(pp=2, tp=1), dict(isq="Q8_0",
                                                                                                 devices="0")],
                         ids=["single", "tp2", "pp2", "q8_0"])
def test_scan_matches_unrolled(wish):
    scan = _pair("preset:tiny", max_seq_len=128, **wish)
    assert all(s.mode == "scan" for s in scan.engine.stages)
    assert all(seg.scanned for s in scan.engine.stages for seg in s.scan.segments)
    layers = scan.engine.stages[0].params["layers"]
    assert isinstance(layers, LayerView) and len(layers) == scan.engine.stages[0].num_layers
    if "isq" in wish:
        assert layers[1]["wq"].qtype == "Q8_0"
        assert scan.engine.stages[0].scan.params[0][0]["wq"].q[0].shape[0] == 4  # every leaf stacked over layers


def test_alternating_layers_scan_by_period():
    """Gemma 2's sliding and full layers alternate: one scan whose body is a (sliding, full) pair, each position with
    its own cache stack (an 8-slot ring beside the full context)."""
    scan = _pair(str(DATA / "tiny-gemma2"), max_seq_len=64, devices="0")
    stage = scan.engine.stages[0]
    assert stage.scan.segments == (Segment(0, 2, 3),)
    caches = scan.engine.new_cache(1)[0]
    assert [k.shape[:1] + k.shape[3:4] for k, _ in caches] == [(3, 8), (3, 64)]


def test_moe_stage_with_a_dense_layer(monkeypatch):
    """Qwen3-MoE with layer 1 dense among four MoE layers: the dense layer and the one before it unrolled, the three
    alike MoE layers after them scanned, in one program."""
    from jaxmap import api
    from jaxmap.families import read_config_json
    from jaxmap.loading.random_source import RandomSource

    config = dataclasses.replace(read_config_json(DATA / "tiny-qwen3-moe" / "config.json"), num_hidden_layers=5,
                                 mlp_only_layers=(1,))
    monkeypatch.setattr(api, "resolve_source", lambda model, seed=0: RandomSource(config, seed=seed, scale=0.2))
    scan = _pair("moe", [[t % 128 for t in p] for p in PROMPTS], max_seq_len=64, devices="0", tol=1e-4)
    assert scan.engine.stages[0].scan.segments == (Segment(0, 1, 1), Segment(1, 1, 1), Segment(2, 1, 3))


def test_per_layer_isq_types_make_segments(tmp_path):
    topology = tmp_path / "t.yaml"
    topology.write_text("0-2:\n  isq: Q8_0\n2-4:\n  isq: Q4K\n")
    scan = _pair("preset:tiny", max_seq_len=64, devices="0", topology=str(topology), tol=2e-3)
    assert scan.engine.stages[0].scan.segments == (Segment(0, 1, 2), Segment(2, 1, 2))
    assert [scan.engine.stages[0].params["layers"][j]["w_up"].qtype for j in range(4)] == ["Q8_0"] * 2 + ["Q4K"] * 2


def test_native_gguf(smollm2_native, default_gguf):
    scan = jaxmap.load(str(default_gguf), max_seq_len=64, progress=False, devices="0", layer_mode="scan")
    assert scan.engine.stages[0].scan.segments == (Segment(0, 1, 30),)
    prompts = [[1, 504, 3458, 282, 4649, 314]]
    _assert_same(_run(smollm2_native, prompts), _run(scan, prompts), tol=2e-3)


def test_row_copies_and_program_store(tmp_path):
    """Continuous batching's row copies address the stacks' batch axis; a warm start reads the scan programs from
    the program store and gives the same tokens."""
    root = program_store.enable_program_store(tmp_path / "programs")
    try:
        model = jaxmap.load("preset:tiny", max_seq_len=64, layer_mode="scan", progress=False, devices="0")
        want = _run(model)[1]
        stored = sorted(root.glob("*.jaxexport"))
        assert stored
        warm = jaxmap.load("preset:tiny", max_seq_len=64, layer_mode="scan", progress=False, devices="0")
        assert _run(warm)[1] == want
        assert sorted(root.glob("*.jaxexport")) == stored
        assert warm.engine._stored and all(v is not None for v in warm.engine._stored.values())
    finally:
        program_store.disable_program_store()
    engine = model.engine
    batched, single = engine.new_cache(3), engine.new_cache(1)
    k1 = single[0][0][0]
    single[0][0] = (k1 + 1.0, single[0][0][1])
    batched = engine.insert_row(batched, single, 2, 16)
    k = np.asarray(batched[0][0][0])  # [layers, batch, kv_heads, slots, head_dim]
    assert k.shape[:2] == (4, 3) and (k[:, 2, :, :16] == 1).all()
    assert (k[:, :2] == 0).all() and (k[:, 2, :, 16:] == 0).all()
    out = engine.extract_row(batched, 2, engine.new_cache(1), 16)
    assert (np.asarray(out[0][0][0])[:, 0, :, :16] == 1).all()


def test_saved_plan_and_bench_layout(tmp_path):
    from jaxmap.cli.bench import parse_layouts, parse_wish
    from jaxmap.errors import UserError

    assert parse_wish("isq=native,layer_mode=scan") == {"isq": "native", "layer_mode": "scan"}
    assert parse_layouts(["s:isq=native,layer_mode=scan"]) == {"s": "isq=native,layer_mode=scan"}
    with pytest.raises(UserError, match="layer_mode must be one of"):
        parse_layouts(["s:layer_mode=scanned"])
    jaxmap.load("preset:tiny", max_seq_len=64, progress=False, pp=2, tp=1, save_plan=tmp_path / "plan.yaml")
    model = jaxmap.load("preset:tiny", max_seq_len=64, progress=False, plan=tmp_path / "plan.yaml", layer_mode="scan")
    assert [s.mode for s in model.engine.stages] == ["scan", "scan"]
    assert _run(model)[1] == _run(jaxmap.load("preset:tiny", max_seq_len=64, progress=False, devices="0"))[1]


def test_auto_scans_quantized_cpu_stages_and_unrolls_float_ones():
    """``auto``: a one-device CPU stage with quantized projections scans (decode as fast, start several times
    sooner); a float stage unrolls (scan would slice each float weight out of the stack at every step), and so does a
    tensor-parallel one (not measured). The quantized stage gives the same greedy tokens as the same weights
    unrolled."""
    quant = jaxmap.load("preset:tiny", max_seq_len=64, isq="Q8_0", devices="0", progress=False)
    assert [s.mode for s in quant.engine.stages] == ["scan"]
    unrolled = jaxmap.load("preset:tiny", max_seq_len=64, isq="Q8_0", devices="0", layer_mode="unrolled",
                           progress=False)
    _assert_same(_run(quant), _run(unrolled))
    plain = jaxmap.load("preset:tiny", max_seq_len=64, devices="0", progress=False)
    assert [s.mode for s in plain.engine.stages] == ["unrolled"]
    tp = jaxmap.load("preset:tiny", max_seq_len=64, isq="Q8_0", tp=2, pp=1, progress=False)  # not measured: unrolled
    assert [s.mode for s in tp.engine.stages] == ["unrolled"]
