"""Mixture-of-experts models against transformers' committed reference (tests/reference/make_tiny_moe.py): the tiny
Mixtral (sliding window 6, past which its prompts run) and Qwen3-MoE models (a dense layer mixed in,
``norm_topk_prob`` both ways, ``decoder_sparse_step`` 2) from their Hugging Face folders and from GGUF files written
as llama.cpp's converter writes them (stacked ``ffn_{gate,up,down}_exps``, Mixtral as ``llama`` with permuted q/k
rows), float and with the experts kept in their GGUF Q8_0 blocks."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from reference.moe_data import NAMES, load_moe_reference, write_moe_gguf

import jaxmap
from jaxmap.loading.gguf_source import GGUFSource

ATOL = 2e-4


@pytest.fixture(scope="module", params=NAMES)
def ref(request):
    return load_moe_reference(request.param)


def check(model, ref, atol=ATOL) -> None:
    """Every prompt position's logits and the greedy tokens equal transformers'."""
    for logits, want in zip(model.forward_logits(ref["input_ids"]), ref["logits"], strict=True):
        np.testing.assert_allclose(logits, want, atol=atol, rtol=0)
    results = model.generate(ref["input_ids"], max_new_tokens=len(ref["greedy"][0]), stop_at_eos=False)
    assert [r.token_ids for r in results] == ref["greedy"]


def _gguf(ref, tmp_path, qtype=None):
    norm = None if ref["name"] != "tiny-qwen3-moe" else False  # norm_topk_prob false: say so in the file
    return write_moe_gguf(ref["name"], tmp_path / f"{ref['name']}.gguf", qtype, expert_weights_norm=norm)


def test_hf_folder_matches_transformers(ref):
    model = jaxmap.load(str(ref["folder"]), dtype="float32", max_seq_len=64, progress=False, devices="0")
    if ref["name"] == "tiny-mixtral-swa":
        assert model.config.sliding_window == 6 and max(map(len, ref["input_ids"])) > 6
    check(model, ref)


def test_gguf_matches_transformers(ref, tmp_path):
    path = _gguf(ref, tmp_path)
    with GGUFSource(path) as source:
        hf = jaxmap.families.read_config_json(ref["folder"] / "config.json")
        got = source.config
        assert (got.architecture, got.num_experts, got.num_experts_per_tok, got.moe_intermediate_size) == (
            hf.architecture, hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size)
        assert [got.is_moe_layer(i) for i in range(got.num_hidden_layers)] == [
            hf.is_moe_layer(i) for i in range(hf.num_hidden_layers)]
        assert got.norm_topk_prob == hf.norm_topk_prob and got.sliding_window == hf.sliding_window
        stack = next(n for n in source.names() if n.endswith("experts.w2") or n.endswith("experts.down_proj"))
        assert source.shape(stack) == (hf.num_experts, hf.moe_intermediate_size, hf.hidden_size)
    model = jaxmap.load(str(path), dtype="float32", max_seq_len=64, progress=False, devices="0")
    check(model, ref)


def _experts(model, layer=0):
    return model.engine.stages[0].params["layers"][layer]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_quantized_experts_stay_in_their_blocks(ref, tmp_path, qtype, caplog):
    """Q8_0 / Q4_0 expert stacks are kept in their blocks (one QTensor per expert, stacked) and run as the
    dequantized file does; loaded as float, a line says the stacks were dequantized."""
    path = _gguf(ref, tmp_path, gguf.GGMLQuantizationType[qtype])
    native = jaxmap.load(str(path), max_seq_len=64, progress=False, devices="0")
    moe_layer = next(i for i in range(native.config.num_hidden_layers) if native.config.is_moe_layer(i))
    stack = _experts(native, moe_layer)["experts_down"]
    config = native.config
    assert stack.qtype == qtype and stack.shape == (config.hidden_size, config.moe_intermediate_size)
    assert stack.q[0].shape[0] == config.num_experts
    with caplog.at_level("INFO", logger="jaxmap.loading.gguf_source"):
        floats = jaxmap.load(str(path), max_seq_len=64, progress=False, devices="0", isq="none", dtype="float32")
    assert not hasattr(_experts(floats, moe_layer)["experts_down"], "qtype")
    assert f"stacked experts stored as {qtype}" in caplog.text
    for a, b in zip(native.forward_logits(ref["input_ids"]), floats.forward_logits(ref["input_ids"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    want = [r.token_ids for r in floats.generate(ref["input_ids"], max_new_tokens=6, stop_at_eos=False)]
    assert [r.token_ids for r in native.generate(ref["input_ids"], max_new_tokens=6, stop_at_eos=False)] == want


def _dequantized(quantized, floats):
    """``floats`` (the same model loaded unquantized) given ``quantized``'s weights dequantized: the reference a
    quantized run must match up to float rounding."""
    import jax.numpy as jnp

    from jaxmap import quant
    from jaxmap.engine.moe import _float_stack

    for stage_q, stage_f in zip(quantized.engine.stages, floats.engine.stages, strict=True):
        for layer_q, layer_f in zip(stage_q.params["layers"], stage_f.params["layers"], strict=True):
            for key, w in layer_q.items():
                if quant.is_quantized(w):
                    host = _float_stack(w, jnp.float32) if key.startswith("experts_") else quant.dequantize(w).T
                    assert host.shape == layer_f[key].shape, key
                    layer_f[key] = jnp.asarray(host)
    return floats


@pytest.mark.parametrize("isq", ["Q8_0", "Q4K"])
def test_isq_quantizes_the_routed_experts(ref, isq):
    """--isq quantizes each expert of a stack along its input dimension (the router stays float, as llama.cpp keeps
    ffn_gate_inp); prompts and greedy decode (the gathered experts' blocks) match the float model holding the same
    weights dequantized, and Q8_0 stays within 8% of transformers (its greedy tokens too, up to the first step whose
    margin in transformers is under 0.1, which its rounding may flip)."""
    load = dict(dtype="float32", max_seq_len=64, progress=False, devices="0")
    model = jaxmap.load(str(ref["folder"]), isq=isq, **load)
    config = model.config
    moe_layer = next(i for i in range(config.num_hidden_layers) if config.is_moe_layer(i))
    layer = _experts(model, moe_layer)
    gate = layer["experts_gate"]
    assert gate.qtype in ((isq,) if isq == "Q8_0" else ("Q4K", "Q5_0")) and gate.q[0].shape[0] == config.num_experts
    assert gate.shape == (config.moe_intermediate_size, config.hidden_size)
    assert not hasattr(layer["router"], "qtype")
    reference = _dequantized(model, jaxmap.load(str(ref["folder"]), **load))
    for a, b in zip(model.forward_logits(ref["input_ids"]), reference.forward_logits(ref["input_ids"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    new = len(ref["greedy"][0])
    got = [r.token_ids for r in model.generate(ref["input_ids"], max_new_tokens=new, stop_at_eos=False)]
    assert got == [r.token_ids for r in reference.generate(ref["input_ids"], max_new_tokens=new, stop_at_eos=False)]
    if isq == "Q8_0":
        scale = max(np.abs(r).max() for r in ref["logits"])
        for logits, want in zip(model.forward_logits(ref["input_ids"]), ref["logits"], strict=True):
            assert np.abs(logits - want).max() < 0.08 * scale  # a near-tie routing may flip at one position
        for tokens, want, margins in zip(got, ref["greedy"], ref["margins"], strict=True):
            sure = next((i for i, m in enumerate(margins) if m < 0.1), len(margins))
            assert tokens[:sure + 1] == want[:sure + 1] or sure == 0, (tokens, want, margins)


def test_plan_types_and_counts_expert_stacks():
    """The planner gives stacked experts the layer's ISQ type (each expert an [out, in] weight, split by tp on its
    intermediate dimension) and counts E times one expert's quantized bytes; the router stays float."""
    from jaxmap.families import layer_param_specs, preset_config
    from jaxmap.planning.isq_types import layer_types, units, weight_bytes
    from jaxmap.quant.types import tensor_nbytes

    config = preset_config("qwen3-30b-a3b")
    types = layer_types(config, 0, 2, "Q4K")
    assert "router" not in types and types["wq"].final == "Q4K"
    gate, down = types["experts_gate"], types["experts_down"]
    assert (gate.final, gate.split.out, gate.split.n, gate.split.out_shards) == ("Q4K", 768, 2048, 2)
    assert (down.split.out, down.split.n, down.split.in_shards) == (2048, 768, 2)
    spec = layer_param_specs(config, 0)["experts_gate"]
    one_expert = tensor_nbytes("Q4K", (768, 2048))
    assert weight_bytes(spec, "Q4K", 2, units(config), 4) == 128 * one_expert // 2


def test_gguf_that_does_not_match_its_metadata_is_one_clear_error(tmp_path):
    from jaxmap.errors import UserError

    path = write_moe_gguf("tiny-qwen3-moe", tmp_path / "count.gguf", expert_count=6)
    with pytest.raises(UserError, match=r"blk\.0\.ffn_\w+_exps\.weight has shape \(8, \d+, \d+\), the metadata's "
                                        r"model expects 6 stacked experts"):
        GGUFSource(path)
    path = write_moe_gguf("tiny-mixtral-swa", tmp_path / "partial.gguf", drop=("blk.1.ffn_down_exps.weight",))
    with pytest.raises(UserError, match=r"lacks the tensor blk\.1\.ffn_down_exps\.weight"):
        jaxmap.load(str(path), max_seq_len=32, progress=False, devices="0")


def test_topology_regex_types_experts_apart(tmp_path):
    """A topology ``/regex/`` entry with an ``isq`` types the routed experts it matches apart from their layer's
    attention (the GGUF names reach a Hugging Face folder's tensors); the run matches the float model holding the
    same weights dequantized, and a saved plan keeps the per-weight types."""
    ref = load_moe_reference("tiny-qwen3-moe")
    topology = tmp_path / "topology.yaml"
    topology.write_text("0-3:\n  isq: Q8_0\n'/ffn_(gate|up|down)_exps/':\n  isq: Q4_0\n")
    load = dict(dtype="float32", max_seq_len=64, progress=False, devices="0")
    model = jaxmap.load(str(ref["folder"]), topology=str(topology), save_plan=str(tmp_path / "plan.json"), **load)
    config = model.config
    for i in range(config.num_hidden_layers):
        layer = _experts(model, i)
        assert layer["wq"].qtype == "Q8_0"
        if config.is_moe_layer(i):
            assert {layer[k].qtype for k in ("experts_gate", "experts_up", "experts_down")} == {"Q4_0"}
            assert not hasattr(layer["router"], "qtype")
        else:
            assert layer["w_down"].qtype == "Q8_0"
    assert "Q8_0 experts_down=Q4_0" in model.device_map.render_table()
    reference = _dequantized(model, jaxmap.load(str(ref["folder"]), **load))
    for a, b in zip(model.forward_logits(ref["input_ids"]), reference.forward_logits(ref["input_ids"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    replay = jaxmap.load(str(ref["folder"]), plan=str(tmp_path / "plan.json"), max_seq_len=64, progress=False)
    assert _experts(replay, 0)["experts_up"].qtype == "Q4_0" and _experts(replay, 0)["wk"].qtype == "Q8_0"
