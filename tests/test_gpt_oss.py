"""gpt-oss against transformers (tests/reference/make_tiny_gpt_oss.py): attention sinks, q/k/v/o biases, sliding
(4-key window, which the prompts run past) and full layers alternating, YaRN RoPE, top-2 of 4 experts with router
and expert biases, the clamped SwiGLU (limit 1.5 there, so that it binds), gate and up read from the interleaved
``gate_up_proj``; on one device, tp=2 and pp=2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from reference.moe_data import load_gpt_oss_reference

import jaxmap

HERE = Path(__file__).resolve().parent
FOLDER = HERE / "data" / "tiny-gpt-oss"
LAYOUTS = {"one": dict(devices="0", tp=1), "tp2": dict(tp=2, pp=1), "pp2": dict(pp=2, tp=1)}


@pytest.fixture(scope="module")
def ref():
    return load_gpt_oss_reference()


@pytest.fixture(scope="module")
def one():
    return jaxmap.load(str(FOLDER), dtype="float32", max_seq_len=64, progress=False, **LAYOUTS["one"])


def test_config_reads_what_sets_gpt_oss_apart(one):
    config = one.config
    assert config.architecture == "gpt_oss" and config.num_experts == 4 and config.num_experts_per_tok == 2
    assert config.swiglu_limit == 1.5 and config.swiglu_alpha == pytest.approx(1.702)
    assert config.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert config.rope_scaling["rope_type"] == "yarn" and config.rope_scaling["truncate"] is False
    layer = one.engine.stages[0].params["layers"][0]
    assert {"sinks", "bo", "router_bias", "experts_gate_bias", "experts_up_bias", "experts_down_bias"} <= set(layer)


def test_gate_and_up_are_the_interleaved_columns_of_gate_up_proj():
    from jaxmap.loading.safetensors_source import SafetensorsSource

    with SafetensorsSource(FOLDER) as src:
        fused = src.read("model.layers.1.mlp.experts.gate_up_proj")
        gate = src.read("model.layers.1.mlp.experts.gate_up_proj[gate]")
        up = src.read("model.layers.1.mlp.experts.gate_up_proj[up]")
        assert src.shape("model.layers.1.mlp.experts.gate_up_proj[up]") == up.shape == (4, 64, 64)
        np.testing.assert_array_equal(gate, fused[..., 0::2])
        np.testing.assert_array_equal(up, fused[..., 1::2])
        bias = src.read("model.layers.1.mlp.experts.gate_up_proj_bias")
        np.testing.assert_array_equal(src.read("model.layers.1.mlp.experts.gate_up_proj_bias[up]"), bias[:, 1::2])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_match_transformers(ref, one, layout):
    model = one if layout == "one" else jaxmap.load(str(FOLDER), dtype="float32", max_seq_len=64, progress=False,
                                                    **LAYOUTS[layout])
    stages = model.device_map.stages
    assert {s.tp for s in stages} == {LAYOUTS[layout]["tp"]}
    if layout == "pp2":
        assert len(stages) == 2
    for logits, want in zip(model.forward_logits(ref["input_ids"]), ref["logits"], strict=True):
        np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
    results = model.generate(ref["input_ids"], max_new_tokens=len(ref["greedy"][0]), stop_at_eos=False)
    assert [r.token_ids for r in results] == ref["greedy"]


def test_moe_paths_agree_with_biases_and_clamp(one):
    """gather, dense and grouped give the same MoE output with gpt-oss's biases and clamped activation."""
    import jax
    import jax.numpy as jnp

    from jaxmap.engine.moe import moe_mlp

    config = one.config
    p = one.engine.stages[0].params["layers"][1]
    design = jaxmap.families.family_of(config).layer_design(config, 1)
    h = jax.random.normal(jax.random.PRNGKey(0), (1, 5, config.hidden_size), jnp.float32)
    outs = {path: np.asarray(moe_mlp(p, h, config, {}, path=path, design=design))
            for path in ("gather", "dense", "grouped")}
    np.testing.assert_allclose(outs["gather"], outs["dense"], atol=1e-5)
    np.testing.assert_allclose(outs["grouped"], outs["dense"], atol=1e-5)


MXFP4_LAYOUTS = {"native": dict(devices="0", tp=1), "native-tp2": dict(tp=2, pp=1),
                 "dequantized": dict(devices="0", tp=1, dtype="float32")}


@pytest.mark.parametrize("layout", list(MXFP4_LAYOUTS))
def test_mxfp4_checkpoint_matches_transformers(layout):
    """The published checkpoints' layout (tests/data/tiny-gpt-oss-mxfp4: experts as ``*_blocks`` / ``*_scales``,
    ``quant_method: mxfp4``): kept as MXFP4 (no ``--dtype``), split over tp=2, or dequantized by ``--dtype``; each
    reproduces transformers' own dequantized run of the same file."""
    from jaxmap.quant.qtensor import QTensor

    ref_path = HERE / "reference" / "data" / "tiny-gpt-oss-mxfp4"
    meta = json.loads(ref_path.with_suffix(".json").read_text(encoding="utf-8"))
    with np.load(ref_path.with_suffix(".npz")) as npz:
        want = [np.asarray(npz[f"logits_{i}"], np.float32) for i in range(len(meta["prompts"]))]
    ids = [p["input_ids"] for p in meta["prompts"]]
    kw = MXFP4_LAYOUTS[layout]
    model = jaxmap.load(str(HERE / "data" / "tiny-gpt-oss-mxfp4"), max_seq_len=64, progress=False, **kw)
    layer = model.engine.stages[0].params["layers"][0]
    native = "dtype" not in kw
    assert isinstance(layer["experts_gate"], QTensor) == native and not isinstance(layer["wq"], QTensor)
    if native:
        assert layer["experts_down"].qtype == "MXFP4"
    for logits, ref in zip(model.forward_logits(ids), want, strict=True):
        np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
    results = model.generate(ids, max_new_tokens=len(meta["prompts"][0]["greedy_ids"]), stop_at_eos=False)
    assert [r.token_ids for r in results] == [p["greedy_ids"] for p in meta["prompts"]]


APART = {"cpu3": dict(override_tensor=r"ffn_.*_exps=cpu[3]"), "host": dict(override_tensor="exps=host"),
         "disk": dict(override_tensor=r"blk\.1\.ffn_.*_exps=disk")}


@pytest.mark.parametrize("place", list(APART))
def test_experts_apart_keep_their_biases_and_clamp(ref, place, tmp_path):
    """gpt-oss's routed experts computed on another device, streamed from host memory or read from disk carry
    their biases with them (the router's bias stays with the layer): transformers' logits and greedy tokens."""
    model = jaxmap.load(str(FOLDER), dtype="float32", max_seq_len=64, progress=False, devices="0",
                        offload_folder=str(tmp_path), **APART[place])
    assert model.device_map.experts
    for logits, want in zip(model.forward_logits(ref["input_ids"]), ref["logits"], strict=True):
        np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
    results = model.generate(ref["input_ids"], max_new_tokens=len(ref["greedy"][0]), stop_at_eos=False)
    assert [r.token_ids for r in results] == ref["greedy"]
