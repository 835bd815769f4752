"""Qwen3 (dense) against transformers on every layout the planner makes, from its Hugging Face folder and from GGUF.

tiny-qwen3 (tests/data, made by tests/reference/make_tiny_models.py) has what sets Qwen3 apart from the llama family:
per-head RMSNorm on queries and keys before RoPE, head_dim 32 with hidden 64 / 4 heads (not hidden / heads), no
q/k/v bias, tied embeddings. The greedy tokens and logits it is compared with are transformers' own
(tests/reference/data/tiny-qwen3.*, written by make_reference.py).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from memory_caps import caps
from reference.data import TINY_MODELS_DIR, load_reference

import jaxmap
from jaxmap.config.hardware import Hardware
from jaxmap.errors import UserError
from jaxmap.families import family_of, layer_param_specs, param_count, preset_config, read_config_json
from jaxmap.loading.safetensors_source import SafetensorsSource
from jaxmap.planning.planner import plan
from jaxmap.planning.wishes import make_wish

FOLDER = TINY_MODELS_DIR / "tiny-qwen3"
ATOL = 2e-4
NEW = 12


@pytest.fixture(scope="module")
def ref():
    return load_reference("tiny-qwen3")


def check(model, ref, prompts=(0, 1)) -> None:
    """Last-position logits of the first prompts and their greedy tokens equal transformers'."""
    ids = [ref["input_ids"][i] for i in prompts]
    for logits, i in zip(model.forward_logits(ids), prompts, strict=True):
        np.testing.assert_allclose(logits[-1], ref["last_logits"][i], atol=ATOL, rtol=0)
    results = model.generate(ids, max_new_tokens=NEW, stop_at_eos=False)
    assert [r.token_ids for r in results] == [ref["greedy"][i][:NEW] for i in prompts]


def test_config_is_read_by_the_qwen3_family():
    config = read_config_json(FOLDER / "config.json")
    assert family_of(config).name == "qwen3"
    assert (config.head_dim, config.hidden_size // config.num_attention_heads) == (32, 16)
    assert not config.attention_bias and config.tie_word_embeddings and config.sliding_window is None
    specs = layer_param_specs(config, 2)
    assert specs["q_norm"].hf_name == "model.layers.2.self_attn.q_norm.weight"
    assert specs["q_norm"].shape == (32,) and specs["q_norm"].role == "norm" and specs["q_norm"].layer == 2
    assert specs["k_norm"].gguf_name == "blk.2.attn_k_norm.weight"
    assert "bq" not in specs and specs["wq"].shape == (64, 128) and specs["wo"].shape == (128, 64)


LAYOUTS = {
    "tp2": dict(tp=2),  # 4 heads and 2 kv heads split in two
    "tp4": dict(tp=4),  # kv heads replicated: 4 devices, 2 kv heads
    "pp3": dict(pp=3),
    "pp2xtp2": dict(pp=2, tp=2),
    "n": dict(device_layers="0:1;1:1"),  # the third layer on the CPU
    "topology": dict(topology={"0-1": {"device": "cpu[3]"}, "1-3": {"device": "cpu[5]"},
                               "/embed_tokens/": {"device": "cpu[6]"}}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_match_transformers(layout, ref):
    model = jaxmap.load(str(FOLDER), dtype="float32", max_seq_len=128, progress=False, **LAYOUTS[layout])
    if layout == "tp4":
        assert {s.tp for s in model.device_map.stages} == {4}
    check(model, ref)


def test_host_and_disk_tiers_match_transformers(ref, tmp_path):
    config = read_config_json(FOLDER / "config.json")
    model = jaxmap.load(str(FOLDER), dtype="float32", max_seq_len=64, progress=False,
                        max_memory=caps(config, 0, 1), offload_folder=tmp_path)
    assert [(s.start, s.end, s.memory_kind) for s in model.device_map.stages] == [(0, 1, "host"), (1, 3, "disk")]
    check(model, ref, prompts=(0,))


def test_isq_keeps_the_qk_norms_float_and_stays_close(ref):
    model = jaxmap.load(str(FOLDER), dtype="float32", max_seq_len=64, progress=False, devices="0", isq="Q8_0")
    layer = model.engine.stages[0].params["layers"][0]
    assert layer["wq"].qtype == "Q8_0" and layer["q_norm"].dtype == np.float32
    (logits,) = model.forward_logits([ref["input_ids"][0]])
    expected = ref["last_logits"][0]
    assert np.abs(logits[-1] - expected).max() < 0.05 * np.abs(expected).max()
    assert logits[-1].argmax() == expected.argmax()


def _write_gguf(path, qtype=None) -> None:
    """tiny-qwen3 as llama.cpp's converter writes a Qwen3 file: architecture qwen3, attn_q_norm / attn_k_norm, q/k
    rows in Hugging Face's order, no output.weight (tied). ``qtype`` stores the 2-D projections quantized."""
    source = SafetensorsSource(FOLDER)
    config = source.config
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name in source.names():
        array = np.asarray(source.read(name, np.float32))
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{names[rest.removesuffix('.weight')]}.weight"
        if qtype is not None and array.ndim == 2 and "token_embd" not in gname:
            w.add_tensor(gname, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    source.close()


def test_gguf_file_matches_transformers(ref, tmp_path):
    path = tmp_path / "tiny-qwen3.gguf"
    _write_gguf(path)
    model = jaxmap.load(str(path), dtype="float32", max_seq_len=128, progress=False, tp=2)
    assert model.config.architecture == "qwen3" and model.config.head_dim == 32
    assert model.config.tie_word_embeddings and not model.config.attention_bias
    check(model, ref)


def test_gguf_kept_in_its_own_q8_0_blocks(ref, tmp_path):
    path = tmp_path / "tiny-qwen3-q8.gguf"
    _write_gguf(path, gguf.GGMLQuantizationType.Q8_0)
    model = jaxmap.load(str(path), max_seq_len=64, progress=False, devices="0")
    layer = model.engine.stages[0].params["layers"][1]
    assert layer["wk"].qtype == "Q8_0" and layer["k_norm"].dtype == np.float32
    (logits,) = model.forward_logits([ref["input_ids"][0]])
    assert logits[-1].argmax() == ref["last_logits"][0].argmax()


def test_missing_qk_norm_is_one_clear_error(tmp_path):
    """A Qwen3 checkpoint without its q/k norms is refused by name, never run as a llama."""
    folder = tmp_path / "no-norms"
    folder.mkdir()
    for f in FOLDER.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    source = SafetensorsSource(FOLDER)
    tensors = {n: np.asarray(source.read(n, np.float32)) for n in source.names() if "q_norm" not in n}
    source.close()
    from safetensors.numpy import save_file

    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"lacks the tensor 'model\.layers\.0\.self_attn\.q_norm\.weight'"):
        jaxmap.load(str(folder), max_seq_len=32, progress=False, devices="0")


@pytest.mark.parametrize("name, layers, tied", [("qwen3-0.6b", 28, True), ("qwen3-8b", 36, False),
                                                ("qwen3-32b", 64, False)])
def test_presets_plan_with_their_real_shapes(name, layers, tied):
    """One device holds every weight the family declares (q/k norms and a tied head counted once), in bfloat16."""
    config = preset_config(name)
    assert (config.num_hidden_layers, config.head_dim, config.tie_word_embeddings) == (layers, 128, tied)
    device_map = plan(config, Hardware.from_preset("4xa100-80gb"), make_wish(devices="0"), "bfloat16", 128)
    assert [(s.start, s.end, s.memory_kind) for s in device_map.stages] == [(0, layers, "device")], device_map.memory
    assert device_map.memory[0].weights_bytes == param_count(config) * 2
    norms = sum(s.size for s in layer_param_specs(config, 0).values() if s.role == "norm")
    assert norms == 2 * config.hidden_size + 2 * config.head_dim
