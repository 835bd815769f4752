"""Gemma 3, Gemma 2 and sliding-window Mistral against transformers on the planner's layouts.

The tiny models (tests/data, made with transformers' ``from_config`` by tests/reference/make_tiny_families.py) have
an 8-key sliding window, so the second reference prompt (35 tokens) is prefilled past it and every greedy token is
decoded through the ring-buffer cache; Gemma 3 interleaves 5 local layers (their own RoPE base) with 1 global one and
has per-head q/k norms, Gemma 2 soft-caps scores and logits. References: tests/reference/data/<name>.* written by
make_reference.py (transformers, float32, eager attention).
"""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from memory_caps import caps
from reference.data import TINY_MODELS_DIR, load_reference

import jaxmap
from jaxmap.errors import UserError
from jaxmap.families import config_from_hf, family_of, preset_config, read_config_json
from jaxmap.loading.safetensors_source import SafetensorsSource
from jaxmap.planning.memory import kv_cache_bytes

ATOL = 2e-4
NEW = 12
NAMES = ("tiny-gemma3", "tiny-gemma2", "tiny-mistral-swa")


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    return request.param, load_reference(request.param)


def check(model, ref, prompts=(0, 1)) -> None:
    """Last-position logits of the prompts and their greedy tokens equal transformers'."""
    ids = [ref["input_ids"][i] for i in prompts]
    for logits, i in zip(model.forward_logits(ids), prompts, strict=True):
        np.testing.assert_allclose(logits[-1], ref["last_logits"][i], atol=ATOL, rtol=0)
    results = model.generate(ids, max_new_tokens=NEW, stop_at_eos=False)
    assert [r.token_ids for r in results] == [ref["greedy"][i][:NEW] for i in prompts]


def test_configs_are_read_by_their_families():
    g3 = read_config_json(TINY_MODELS_DIR / "tiny-gemma3" / "config.json")
    assert family_of(g3).name == "gemma3" and g3.hidden_act == "gelu_tanh" and g3.sliding_window == 8
    assert g3.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    assert (g3.rope_theta, g3.rope_local_theta, g3.query_pre_attn_scalar) == (1e6, 1e4, 24)
    designs = [family_of(g3).layer_design(g3, i) for i in range(6)]
    assert [d.window for d in designs] == [8] * 5 + [None] and designs[0].rope_local and not designs[5].rope_local
    assert all(d.qk_norm and d.norm_plus_one and d.post_norms for d in designs)
    g2 = read_config_json(TINY_MODELS_DIR / "tiny-gemma2" / "config.json")
    assert family_of(g2).name == "gemma2" and (g2.attn_logit_softcap, g2.final_logit_softcap) == (3.0, 2.0)
    assert g2.layer_types[:2] == ("sliding_attention", "full_attention") and g2.rope_local_theta is None
    mistral = read_config_json(TINY_MODELS_DIR / "tiny-mistral-swa" / "config.json")
    assert mistral.sliding_window == 8 and mistral.layer_types is None and mistral.is_sliding(5)


def test_older_config_keys_mean_the_same():
    """A Hub config.json of Gemma 3 spells RoPE as rope_theta / rope_local_base_freq / rope_scaling and the layer
    pattern as sliding_window_pattern; transformers 5 writes rope_parameters and layer_types."""
    new = read_config_json(TINY_MODELS_DIR / "tiny-gemma3" / "config.json")
    old = config_from_hf({"model_type": "gemma3_text", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                          "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                          "sliding_window": 8, "sliding_window_pattern": 6, "rope_theta": 1e6,
                          "rope_local_base_freq": 1e4, "query_pre_attn_scalar": 24,
                          "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert old.layer_types == new.layer_types and old.rope_local_theta == new.rope_local_theta
    assert old.rope_scaling == {"rope_type": "linear", "factor": 8.0}


LAYOUTS = {
    "single": dict(devices="0"),
    "tp2": dict(tp=2),
    "pp2": dict(pp=2),
    "pp2xtp2": dict(pp=2, tp=2),
    "per_layer": dict(devices="0", layer_mode="per_layer"),
    # prompts prefilled in chunks: each after the first reads what the earlier ones wrote (rings past their window)
    "chunk5": dict(devices="0", prefill_chunk=5),
    "chunk16_tp2_per_layer": dict(tp=2, prefill_chunk=16, layer_mode="per_layer"),
    "n": dict(device_layers="0:2;1:2"),  # the last two layers on the CPU
    # embeddings on their own device; the tied head (Gemma) keeps its own copy with the last stage
    "topology": dict(topology={"0-4": {"device": "cpu[3]"}, "4-6": {"device": "cpu[5]"},
                               "/embed_tokens/": {"device": "cpu[6]"}}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_match_transformers(layout, case):
    name, ref = case
    model = jaxmap.load(str(TINY_MODELS_DIR / name), dtype="float32", max_seq_len=128, progress=False,
                        **LAYOUTS[layout])
    check(model, ref)


def test_ring_caches_hold_the_window(case):
    """Sliding layers keep 8 slots, full layers max_seq_len; the plan counts the same."""
    name, ref = case
    model = jaxmap.load(str(TINY_MODELS_DIR / name), dtype="float32", max_seq_len=128, progress=False, devices="0")
    caches = model.engine.new_cache(1)[0]
    config = model.config
    assert [k.shape[2] for k, _ in caches] == [8 if config.is_sliding(i) else 128 for i in range(6)]
    per_layer = [kv_cache_bytes(config, 1, 4, 128, 1, layer=i) for i in range(6)]
    assert min(per_layer) == 2 * 8 * 2 * 32 * 4  # K and V, 8 slots, 2 kv heads, head_dim 32, float32
    assert [b == per_layer[0] for b in per_layer] == [config.is_sliding(i) == config.is_sliding(0) for i in range(6)]


def test_host_and_disk_tiers_match_transformers(case, tmp_path):
    name, ref = case
    config = read_config_json(TINY_MODELS_DIR / name / "config.json")
    model = jaxmap.load(str(TINY_MODELS_DIR / name), dtype="float32", max_seq_len=64, progress=False,
                        max_memory=caps(config, 0, 2), offload_folder=tmp_path)
    assert {s.memory_kind for s in model.device_map.stages} >= {"host", "disk"}
    check(model, ref, prompts=(1,))


def test_isq_q8_0_stays_close(case):
    name, ref = case
    model = jaxmap.load(str(TINY_MODELS_DIR / name), dtype="float32", max_seq_len=64, progress=False, devices="0",
                        isq="Q8_0")
    (logits,) = model.forward_logits([ref["input_ids"][1]])
    expected = ref["last_logits"][1]
    assert np.abs(logits[-1] - expected).max() < 0.05 * np.abs(expected).max()


def _write_gemma3_gguf(path, skip: tuple[str, ...] = (), name: str = "tiny-gemma3", arch: str = "gemma3") -> None:
    """tiny-gemma3 (or tiny-gemma2) as llama.cpp's converter writes it: architecture gemma3 (gemma2), norm weights
    stored as 1 + weight, q/k rows in Hugging Face's order, no output.weight when tied, no layer pattern or local
    base (llama.cpp's constants); Gemma 2's soft-caps in its metadata."""
    folder = TINY_MODELS_DIR / name
    source = SafetensorsSource(folder)
    config = source.config
    w = gguf.GGUFWriter(str(path), arch)
    if config.attn_logit_softcap:
        w.add_attn_logit_softcapping(config.attn_logit_softcap)
        w.add_final_logit_softcapping(config.final_logit_softcap)
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
    w.add_sliding_window(config.sliding_window)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    family = family_of(config)
    for name in source.names():
        array = np.asarray(source.read(name, np.float32))
        gname = family.hf_to_gguf(name)
        if gname in skip:
            continue
        w.add_tensor(gname, array + 1.0 if "norm" in gname else array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    source.close()


def test_gemma3_gguf_matches_transformers(tmp_path):
    """The score scale llama.cpp derives (head_dim) is not the tiny model's 24: the GGUF model is compared with
    itself loaded from Hugging Face with that one value changed, and its norms must come back as HF's."""
    path = tmp_path / "tiny-gemma3.gguf"
    _write_gemma3_gguf(path)
    model = jaxmap.load(str(path), dtype="float32", max_seq_len=64, progress=False, devices="0")
    config = model.config
    assert config.architecture == "gemma3_text" and config.layer_types[5] == "full_attention"
    assert (config.rope_local_theta, config.query_pre_attn_scalar, config.sliding_window) == (1e4, 32, 8)
    folder = tmp_path / "hf"
    shutil.copytree(TINY_MODELS_DIR / "tiny-gemma3", folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "query_pre_attn_scalar": 32}))
    hf = jaxmap.load(str(folder), dtype="float32", max_seq_len=64, progress=False, devices="0")
    norm = model.engine.stages[0].params["layers"][0]["attn_norm"]
    np.testing.assert_allclose(np.asarray(norm), np.asarray(hf.engine.stages[0].params["layers"][0]["attn_norm"]),
                               atol=1e-6)
    ids = load_reference("tiny-gemma3")["input_ids"][1]
    np.testing.assert_allclose(model.forward_logits([ids])[0], hf.forward_logits([ids])[0], atol=1e-4, rtol=0)


def test_gemma2_gguf_matches_transformers(tmp_path):
    """Gemma 2 from GGUF: soft-caps from its metadata, its own untied output.weight, and llama.cpp's score scale
    (head_dim): equal to the Hugging Face folder with that one value changed."""
    path = tmp_path / "tiny-gemma2.gguf"
    _write_gemma3_gguf(path, name="tiny-gemma2", arch="gemma2")
    model = jaxmap.load(str(path), dtype="float32", max_seq_len=64, progress=False, devices="0")
    config = model.config
    assert config.architecture == "gemma2" and not config.tie_word_embeddings
    assert (config.attn_logit_softcap, config.final_logit_softcap, config.query_pre_attn_scalar) == (3.0, 2.0, 32)
    assert config.layer_types[:2] == ("sliding_attention", "full_attention") and config.rope_local_theta is None
    folder = tmp_path / "hf"
    shutil.copytree(TINY_MODELS_DIR / "tiny-gemma2", folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "query_pre_attn_scalar": 32}))
    hf = jaxmap.load(str(folder), dtype="float32", max_seq_len=64, progress=False, devices="0")
    ids = [load_reference("tiny-gemma2")["input_ids"][1]]
    np.testing.assert_allclose(model.forward_logits(ids)[0], hf.forward_logits(ids)[0], atol=1e-4, rtol=0)
    assert [r.token_ids for r in model.generate(ids, max_new_tokens=8, stop_at_eos=False)] == \
        [r.token_ids for r in hf.generate(ids, max_new_tokens=8, stop_at_eos=False)]


@pytest.mark.parametrize("raw, message", [
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "yarn", "factor": 2.0}}}, "on sliding layers"),
    ({"layer_types": ["sliding_attention"] * 5}, "layer_types lists 5 layers"),
    ({"layer_types": ["chunked_attention"] * 6}, "layer type 'chunked_attention' is not supported"),
    ({"hidden_activation": "relu"}, "activation 'relu' is not supported"),
])
def test_unsupported_features_are_refused(raw, message):
    base = {"model_type": "gemma3_text", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "sliding_window": 8}
    with pytest.raises(UserError, match=message):
        config_from_hf({**base, **raw})


@pytest.mark.parametrize("name, layers, window, full", [("gemma-3-270m", 18, 512, 3), ("gemma-3-27b", 62, 1024, 10),
                                                         ("gemma-2-9b", 42, 4096, 21)])
def test_presets_have_their_real_shapes(name, layers, window, full):
    config = preset_config(name)
    assert config.num_hidden_layers == layers and config.sliding_window == window
    assert sum(not config.is_sliding(i) for i in range(layers)) == full


# ---- Gemma 3 4B-27B: the text model of Gemma3ForConditionalGeneration ----------------------------------------------

def test_multimodal_checkpoint_runs_its_text_model(caplog):
    """tiny-gemma3-mm is tiny-gemma3's text model beside a vision tower, saved by transformers: jaxmap runs the text
    model (tiny-gemma3's reference logits and tokens) and says in one line what it left out."""
    with caplog.at_level("INFO", logger="jaxmap.loading.safetensors_source"):
        model = jaxmap.load(str(TINY_MODELS_DIR / "tiny-gemma3-mm"), dtype="float32", max_seq_len=64,
                            progress=False, devices="0")
    lines = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(lines) == 1 and "Gemma3ForConditionalGeneration" in lines[0] and "the vision tower (" in lines[0]
    assert "multimodal projector" in lines[0]
    assert model.config.architecture == "gemma3_text" and model.config.layer_types[5] == "full_attention"
    check(model, load_reference("tiny-gemma3"), prompts=(1,))


def test_multimodal_names_inside_transformers_5_load_too(tmp_path):
    """transformers 5 keeps the parts as model.language_model.* / model.vision_tower.*: the same model."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "mm"
    shutil.copytree(TINY_MODELS_DIR / "tiny-gemma3-mm", folder)
    tensors = load_file(folder / "model.safetensors")
    renamed = {}
    for k, v in tensors.items():
        if k.startswith("language_model.model."):
            k = "model.language_model." + k.removeprefix("language_model.model.")
        elif k.startswith(("vision_tower.", "multi_modal_projector.")):
            k = "model." + k
        renamed[k] = v
    save_file(renamed, folder / "model.safetensors")
    source = SafetensorsSource(folder)
    assert "model.layers.0.self_attn.q_proj.weight" in source.names()
    assert not any("vision" in n for n in source.names())
    model = jaxmap.load(str(folder), dtype="float32", max_seq_len=64, progress=False, devices="0")
    ref = load_reference("tiny-gemma3")
    np.testing.assert_allclose(model.forward_logits([ref["input_ids"][0]])[0][-1], ref["last_logits"][0],
                               atol=ATOL, rtol=0)


def test_published_multimodal_config_reads_as_the_preset():
    """Gemma 3 4B's config.json as published: a sparse text_config (transformers' defaults fill the rest), the eos
    ids at the top level."""
    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
           "mm_tokens_per_image": 256, "image_token_index": 262144,
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024},
           "vision_config": {"hidden_size": 1152, "model_type": "siglip_vision_model", "num_hidden_layers": 27}}
    config = config_from_hf(raw, name="gemma-3-4b")
    preset = preset_config("gemma-3-4b")
    assert config.with_changes(name="") == preset.with_changes(name="")


@pytest.mark.parametrize("raw, message", [
    ({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "vision_config": {}},
     "a Gemma3ForConditionalGeneration config without a text_config object"),
    ({"model_type": "gemma3", "text_config": "gemma3_text"}, "without a text_config object"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "use_bidirectional_attention"),
])
def test_malformed_multimodal_configs_are_refused(raw, message):
    with pytest.raises(UserError, match=message):
        config_from_hf(raw)


def test_multimodal_folder_without_text_config_exits_2(tmp_path, run_main):
    folder = tmp_path / "mm"
    shutil.copytree(TINY_MODELS_DIR / "tiny-gemma3-mm", folder)
    raw = json.loads((folder / "config.json").read_text())
    del raw["text_config"]
    (folder / "config.json").write_text(json.dumps(raw))
    from jaxmap.cli import generate

    r = run_main(generate.main, "-m", str(folder), "--prompt", "hi", "--max-new-tokens", "2")
    assert r.returncode == 2 and "without a text_config object" in r.stderr and "Traceback" not in r.stderr


def test_gguf_without_a_required_tensor_is_refused_before_planning(tmp_path, monkeypatch):
    """A gemma3 GGUF missing one layer's post-attention norm: refused before any planning or loading, naming the
    tensor both ways."""
    import jaxmap.api

    path = tmp_path / "incomplete.gguf"
    _write_gemma3_gguf(path, skip=("blk.3.post_attention_norm.weight",))
    monkeypatch.setattr(jaxmap.api, "plan_device_map", lambda *a, **k: pytest.fail("planned an incomplete file"))
    with pytest.raises(UserError, match=r"lacks the tensor blk\.3\.post_attention_norm\.weight "
                                        r"\(model\.layers\.3\.post_attention_layernorm\.weight\)"):
        jaxmap.load(str(path), dtype="float32", max_seq_len=64, progress=False, devices="0")


def test_checkpoint_without_a_required_tensor_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "hf"
    shutil.copytree(TINY_MODELS_DIR / "tiny-gemma2", folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["lm_head.weight"], tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UserError, match=r"lacks the tensor 'lm_head.weight' \(and 1 more\)"):
        jaxmap.load(str(folder), dtype="float32", max_seq_len=64, progress=False, devices="0")
