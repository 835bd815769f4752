"""Mixtral and Qwen3-MoE under tensor and pipeline parallelism (and both) on virtual CPU devices, against
transformers' committed reference (tests/reference/make_tiny_moe.py): tp splits each expert's intermediate
dimension (every device holds every expert, a slice of each), the router and norms replicated; pp puts layers
(dense and MoE ones) on different devices. Quantized experts (GGUF Q8_0 blocks, ISQ) keep their split too."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from reference.moe_data import load_moe_reference, write_moe_gguf

import jaxmap

LAYOUTS = {"tp2": dict(tp=2, pp=1, ep=1), "pp2": dict(pp=2, tp=1),
           "pp2xtp2": dict(pp=2, tp=2, ep=1), "tp4_ep4": dict(tp=4, pp=1), "tp4_ep2": dict(tp=4, pp=1, ep=2),
           "pp2xtp2_ep2": dict(pp=2, tp=2)}


@pytest.fixture(scope="module", params=["tiny-mixtral-swa", "tiny-qwen3-moe"])
def ref(request):
    return load_moe_reference(request.param)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_match_transformers(ref, layout):
    model = jaxmap.load(str(ref["folder"]), dtype="float32", max_seq_len=64, progress=False, **LAYOUTS[layout])
    stages = model.device_map.stages
    assert {s.tp for s in stages} == {LAYOUTS[layout].get("tp", 1)}
    assert len(stages) == LAYOUTS[layout].get("pp", len(stages)) and len({d for s in stages for d in s.devices}) > 1
    for logits, want in zip(model.forward_logits(ref["input_ids"]), ref["logits"], strict=True):
        np.testing.assert_allclose(logits, want, atol=2e-4, rtol=0)
    results = model.generate(ref["input_ids"], max_new_tokens=len(ref["greedy"][0]), stop_at_eos=False)
    assert [r.token_ids for r in results] == ref["greedy"]


def test_tp_splits_each_expert_on_its_intermediate_dimension(ref):
    model = jaxmap.load(str(ref["folder"]), dtype="float32", max_seq_len=64, progress=False, tp=2, ep=1)
    config = model.config
    layer = next(p for i, p in enumerate(model.engine.stages[0].params["layers"]) if config.is_moe_layer(i))
    gate, down = layer["experts_gate"], layer["experts_down"]
    assert tuple(gate.sharding.spec) == (None, None, "tp") and tuple(down.sharding.spec)[:2] == (None, "tp")
    assert gate.addressable_shards[0].data.shape == (config.num_experts, config.hidden_size,
                                                     config.moe_intermediate_size // 2)
    assert tuple(layer["router"].sharding.spec) in ((), (None,), (None, None))


@pytest.mark.parametrize("layout", ["tp2", "pp2xtp2"])
def test_quantized_experts_split(ref, layout, tmp_path):
    """A Q8_0 GGUF's expert stacks on a tp split: the column-parallel gate/up keep Q8_0 (their output rows split),
    the row-parallel down projection falls back where half its intermediate inputs are less than a 32-block; prompt
    logits and greedy decode match the same file on one device."""
    norm = False if ref["name"] == "tiny-qwen3-moe" else None
    path = write_moe_gguf(ref["name"], tmp_path / "q8.gguf", gguf.GGMLQuantizationType.Q8_0, expert_weights_norm=norm)
    split = jaxmap.load(str(path), max_seq_len=64, progress=False, **LAYOUTS[layout])
    one = jaxmap.load(str(path), max_seq_len=64, progress=False, devices="0", tp=1)
    config = split.config
    layer = next(p for i, p in enumerate(split.engine.stages[0].params["layers"]) if config.is_moe_layer(i))
    assert layer["experts_gate"].qtype == "Q8_0"
    for a, b in zip(split.forward_logits(ref["input_ids"]), one.forward_logits(ref["input_ids"]), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-3, rtol=0)
    # decode: the gathered experts' quantized blocks, split, through the quantized product
    got = [r.token_ids for r in split.generate(ref["input_ids"], max_new_tokens=6, stop_at_eos=False)]
    assert got == [r.token_ids for r in one.generate(ref["input_ids"], max_new_tokens=6, stop_at_eos=False)]
