"""The Phi-3 family (Phi-3/3.5 mini and medium, Phi-4-mini) against transformers on the planner's layouts.

Tiny random models made with transformers' ``Phi3ForCausalLM`` (tests/reference/make_tiny_phi3.py; its data in
tests/reference/data/tiny-phi*.json/.npz): fused ``qkv_proj`` and ``gate_up_proj`` split per part so tensor
parallelism gives each device whole heads; LongRoPE with distinct short and long factors, an original context of 32
and a maximum of 128, checked in both regimes (short: max_seq_len 32, token by token; long: one prefill of 48
tokens with max_seq_len 128); Phi-4-mini's partial rotary factor 0.75 with tied embeddings.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from memory_caps import caps
from reference.data import DATA_DIR, TINY_MODELS_DIR

import jaxmap
from jaxmap.errors import UserError
from jaxmap.families import config_from_hf, family_of, fused_parts, layer_param_specs, preset_config, read_config_json
from jaxmap.families.rope import attention_factor, inverse_frequencies

ATOL = 2e-4
NAMES = ("tiny-phi3", "tiny-phi3-longrope", "tiny-phi4")


def reference(name: str) -> dict:
    meta = json.loads((DATA_DIR / f"{name}.json").read_text())
    with np.load(DATA_DIR / f"{name}.npz") as npz:
        meta.update({k: np.asarray(npz[k]) for k in npz.files})
    return meta


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    return request.param, reference(request.param)


def check_short(model, ref, prompts=(0, 1)) -> None:
    ids = [ref["short_prompts"][i] for i in prompts]
    for logits, i in zip(model.forward_logits(ids), prompts, strict=True):
        np.testing.assert_allclose(logits[-1], ref["short_last_logits"][i], atol=ATOL, rtol=0)
    results = model.generate(ids, max_new_tokens=12, stop_at_eos=False)
    assert [r.token_ids for r in results] == [ref["short_greedy"][i] for i in prompts]


def check_long(model, ref) -> None:
    (logits,) = model.forward_logits([ref["long_prompt"]])
    np.testing.assert_allclose(logits, ref["long_logits"], atol=ATOL, rtol=0)
    (result,) = model.generate([ref["long_prompt"]], max_new_tokens=8, stop_at_eos=False)
    assert result.token_ids == ref["long_greedy"]


def test_configs_are_read_by_the_family():
    phi3 = read_config_json(TINY_MODELS_DIR / "tiny-phi3" / "config.json")
    assert family_of(phi3).name == "phi3" and phi3.rope_scaling is None and phi3.sliding_window == 16
    lr = read_config_json(TINY_MODELS_DIR / "tiny-phi3-longrope" / "config.json")
    assert lr.rope_scaling["rope_type"] == "longrope" and lr.rope_scaling["original_max_position_embeddings"] == 32
    phi4 = read_config_json(TINY_MODELS_DIR / "tiny-phi4" / "config.json")
    assert (phi4.partial_rotary_factor, phi4.rotary_dim, phi4.tie_word_embeddings) == (0.75, 12, True)
    assert inverse_frequencies(phi4).shape == (6,) and attention_factor(phi3) == 1.0
    assert attention_factor(phi4) == pytest.approx(np.sqrt(1 + np.log(4) / np.log(32)))
    short, long = inverse_frequencies(lr, max_seq_len=32), inverse_frequencies(lr, max_seq_len=33)
    np.testing.assert_allclose(short * np.asarray(lr.rope_scaling["short_factor"]),
                               long * np.asarray(lr.rope_scaling["long_factor"]), rtol=1e-6)


def test_fused_tensors_are_declared_as_rows_of_the_stored_ones():
    config = read_config_json(TINY_MODELS_DIR / "tiny-phi4" / "config.json")
    specs = layer_param_specs(config, 1)
    assert specs["wk"].hf_name == "model.layers.1.self_attn.qkv_proj.weight[k]"
    assert specs["wk"].gguf_name == "blk.1.attn_qkv.weight[k]" and specs["wk"].axes == ("embed", "kv_heads")
    parts = fused_parts(config)
    assert parts["model.layers.1.self_attn.qkv_proj.weight[v]"] == ("model.layers.1.self_attn.qkv_proj.weight",
                                                                    96, 128, 128)
    assert parts["model.layers.1.mlp.gate_up_proj.weight[up]"][1:] == (128, 256, 256)
    family = family_of(config)
    assert family.gguf_to_hf("blk.1.attn_qkv.weight") == "model.layers.1.self_attn.qkv_proj.weight"
    assert family.gguf_to_hf("blk.1.ffn_up.weight") == "model.layers.1.mlp.gate_up_proj.weight"


LAYOUTS = {
    "single": dict(devices="0"),
    "tp2": dict(tp=2),
    "pp2": dict(pp=2),
    "pp2xtp2": dict(pp=2, tp=2),
    "per_layer": dict(devices="0", layer_mode="per_layer"),
    "n": dict(device_layers="0:2;1:1"),  # the last layer on the CPU
    # layer ranges on devices of their own (the embeddings with the first)
    "topology": dict(topology={"0-2": {"device": "cpu[3]"}, "2-4": {"device": "cpu[5]"}}),
    "chunked_tp2": dict(tp=2, prefill_chunk=5),  # prompts prefilled 5 tokens at a time
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_match_transformers(layout, case):
    """Within the original context (max_seq_len 32: LongRoPE's short factors), token by token."""
    name, ref = case
    model = jaxmap.load(str(TINY_MODELS_DIR / name), dtype="float32", max_seq_len=32, progress=False,
                        **LAYOUTS[layout])
    check_short(model, ref)


@pytest.mark.parametrize("layout", ["single", "tp2", "pp2xtp2", "chunked_tp2"])
def test_past_the_original_context_matches_transformers(layout, case):
    """max_seq_len 128 > the original 32: LongRoPE's long factors, as transformers on a 48-token input."""
    name, ref = case
    model = jaxmap.load(str(TINY_MODELS_DIR / name), dtype="float32", max_seq_len=128, progress=False,
                        **LAYOUTS[layout])
    check_long(model, ref)


def test_tp2_splits_each_part_on_head_boundaries():
    """Under tp=2 each device holds 2 of the 4 query heads (32 of 64 columns) and 1 of the 2 kv heads, and half
    of gate and of up: the parts are split, not the fused tensor."""
    model = jaxmap.load(str(TINY_MODELS_DIR / "tiny-phi4"), dtype="float32", max_seq_len=32, progress=False, tp=2)
    layer = model.engine.stages[0].params["layers"][0]
    shards = {k: {s.data.shape for s in layer[k].addressable_shards} for k in ("wq", "wk", "wv", "w_gate", "w_up")}
    assert shards == {"wq": {(64, 32)}, "wk": {(64, 16)}, "wv": {(64, 16)}, "w_gate": {(64, 64)},
                      "w_up": {(64, 64)}}


def test_long_factors_are_chosen_once_and_logged(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="jaxmap.families.rope"):
        jaxmap.load(str(TINY_MODELS_DIR / "tiny-phi3-longrope"), dtype="float32", max_seq_len=128, progress=False,
                    devices="0")
    lines = [r.getMessage() for r in caplog.records if "LongRoPE" in r.getMessage()]
    assert lines == ["LongRoPE: long factors for the planned context of 128 tokens (> the original 32), cos/sin "
                     "scaled by 1.1832"]


def test_host_and_disk_tiers_match_transformers(case, tmp_path):
    name, ref = case
    config = read_config_json(TINY_MODELS_DIR / name / "config.json")
    model = jaxmap.load(str(TINY_MODELS_DIR / name), dtype="float32", max_seq_len=32, progress=False,
                        max_memory=caps(config, 0, 2, seq=32), offload_folder=tmp_path)
    assert {s.memory_kind for s in model.device_map.stages} >= {"host", "disk"}
    check_short(model, ref, prompts=(1,))


def test_isq_q8_0_stays_close(case):
    name, ref = case
    model = jaxmap.load(str(TINY_MODELS_DIR / name), dtype="float32", max_seq_len=32, progress=False, tp=2,
                        isq="Q8_0")
    (logits,) = model.forward_logits([ref["short_prompts"][1]])
    expected = ref["short_last_logits"][1]
    assert np.abs(logits[-1] - expected).max() < 0.05 * np.abs(expected).max()


@pytest.mark.parametrize("preset", ["phi-3-mini-4k", "phi-3-mini-128k", "phi-3.5-mini", "phi-4-mini",
                                    "phi-3-medium-128k"])
def test_presets_have_the_published_shapes(preset):
    config = preset_config(preset)
    assert family_of(config).name == "phi3"
    n = sum(s.size for i in range(config.num_hidden_layers) for s in layer_param_specs(config, i).values())
    n += sum(s.size for s in family_of(config).outer_params(config).values())
    expected = {"phi-3-mini-4k": 3.82e9, "phi-3-mini-128k": 3.82e9, "phi-3.5-mini": 3.82e9, "phi-4-mini": 3.84e9,
                "phi-3-medium-128k": 13.96e9}[preset]
    assert abs(n - expected) / expected < 0.01
    if config.rope_scaling:
        assert len(config.rope_scaling["short_factor"]) == config.rotary_dim // 2
        assert inverse_frequencies(config, max_seq_len=8192).shape == (config.rotary_dim // 2,)


def test_unknown_rope_scaling_is_one_line_exit_2(tmp_path, run_main):
    folder = tmp_path / "phi"
    shutil.copytree(TINY_MODELS_DIR / "tiny-phi3-longrope", folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["rope_parameters"]["rope_type"] = "wobbly"
    (folder / "config.json").write_text(json.dumps(raw))
    from jaxmap.cli import plan

    r = run_main(plan.main, "-m", str(folder))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if "wobbly" in line] == \
        ["error: model config: rope scaling 'wobbly' is not supported yet; supported: default, linear, llama3, "
         "longrope, yarn"]


@pytest.mark.parametrize("raw, message", [
    ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, "phi3 models take longrope"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8}}, "short_factor"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
])
def test_bad_phi3_configs_are_refused(raw, message):
    base = {"model_type": "phi3", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4}
    with pytest.raises(UserError, match=message):
        config_from_hf({**base, **raw})


def test_a_fused_tensor_of_the_wrong_size_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "phi"
    shutil.copytree(TINY_MODELS_DIR / "tiny-phi3", folder)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.2.self_attn.qkv_proj.weight"
    tensors[name] = tensors[name][:-16]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UserError, match=r"qkv_proj.weight' has shape \(176, 64\), the config expects 192 rows"):
        jaxmap.load(str(folder), dtype="float32", max_seq_len=32, progress=False, devices="0")
    del tensors[name]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UserError, match=r"lacks the tensor 'model.layers.2.self_attn.qkv_proj.weight'"):
        jaxmap.load(str(folder), dtype="float32", max_seq_len=32, progress=False, devices="0")


def _write_gguf(name: str, path, qtype=None):
    """A tiny model as llama.cpp's converter writes a phi3 file: fused attn_qkv and ffn_up (gate then up), RoPE
    on rope.dimension_count dims, LongRoPE factors as rope_factors_short / rope_factors_long tensors beside the
    original context and attention factor. ``qtype`` stores the 2-D projections quantized."""
    import gguf
    from safetensors.numpy import load_file

    config = read_config_json(TINY_MODELS_DIR / name / "config.json")
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_dimension_count(config.rotary_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if config.sliding_window:
        w.add_sliding_window(config.sliding_window)
    if config.rope_scaling:
        w.add_rope_scaling_orig_ctx_len(config.rope_scaling["original_max_position_embeddings"])
        w.add_rope_scaling_attn_factors(attention_factor(config))
        w.add_tensor("rope_factors_short.weight", np.asarray(config.rope_scaling["short_factor"], np.float32))
        w.add_tensor("rope_factors_long.weight", np.asarray(config.rope_scaling["long_factor"], np.float32))
    names = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    outer = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for hf, array in load_file(TINY_MODELS_DIR / name / "model.safetensors").items():
        if hf in outer:
            gname = outer[hf]
        else:
            _, _, layer, rest = hf.split(".", 3)
            gname = f"blk.{layer}.{names[rest.removesuffix('.weight')]}.weight"
        array = np.asarray(array, np.float32)
        if qtype is not None and array.ndim == 2 and "token_embd" not in gname:
            w.add_tensor(gname, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_file_matches_transformers(case, tmp_path):
    """llama.cpp's phi3 layout: the fused tensors split per part under tp=2, partial rotary from
    rope.dimension_count, LongRoPE from its factor tensors; short and long regimes."""
    name, ref = case
    path = _write_gguf(name, tmp_path / f"{name}.gguf")
    model = jaxmap.load(str(path), dtype="float32", max_seq_len=32, progress=False, tp=2)
    expected = read_config_json(TINY_MODELS_DIR / name / "config.json")
    assert model.config.rotary_dim == expected.rotary_dim
    assert model.config.tie_word_embeddings == expected.tie_word_embeddings
    assert model.config.sliding_window == expected.sliding_window
    check_short(model, ref)
    model = jaxmap.load(str(path), dtype="float32", max_seq_len=128, progress=False, devices="0")
    check_long(model, ref)


def test_gguf_fused_parts_keep_their_q8_0_blocks(tmp_path):
    import gguf

    ref = reference("tiny-phi4")
    path = _write_gguf("tiny-phi4", tmp_path / "tiny-phi4-q8.gguf", gguf.GGMLQuantizationType.Q8_0)
    model = jaxmap.load(str(path), max_seq_len=32, progress=False, devices="0")
    layer = model.engine.stages[0].params["layers"][1]
    assert layer["wk"].qtype == "Q8_0" and layer["w_up"].qtype == "Q8_0"
    (logits,) = model.forward_logits([ref["short_prompts"][1]])
    expected = ref["short_last_logits"][1]
    assert np.abs(logits[-1] - expected).max() < 0.05 * np.abs(expected).max()


def test_llamacpp_imatrix_entries_of_fused_tensors_serve_each_part():
    """llama.cpp's imatrix measures blk.N.attn_qkv / ffn_up whole; the parts share those inputs."""
    from jaxmap.loading.imatrix_file import Imatrix

    config = read_config_json(TINY_MODELS_DIR / "tiny-phi3" / "config.json")
    family = family_of(config)
    stored = {name: np.full(64, i + 1.0, np.float32) for i, name in enumerate(
        [family.gguf_to_hf("blk.0.attn_qkv.weight"), family.gguf_to_hf("blk.0.ffn_up.weight")])}
    matrix = Imatrix(stored, tokens=10)
    matrix.check_model(config)
    specs = layer_param_specs(config, 0)
    assert matrix.for_weight(specs["wk"].hf_name, 64)[0] == 1.0
    assert matrix.for_weight(specs["w_gate"].hf_name, 64)[0] == 2.0
    assert matrix.for_weight(specs["w_down"].hf_name, 128) is None
