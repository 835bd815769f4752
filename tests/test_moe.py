"""Mixture-of-experts families (Mixtral, Qwen3-MoE): routing and the three expert computations against a numpy
reference, presets and plans counting expert bytes, and whole-model logits against transformers (random weights
from the preset source copied into a transformers model; skipped without torch)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

import jaxmap
from jaxmap import families
from jaxmap.loading.random_source import RandomSource

TINY_MIXTRAL = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 96,
                "hidden_size": 32, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128,
                "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
TINY_QWEN3_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 96,
                  "hidden_size": 32, "intermediate_size": 40, "moe_intermediate_size": 16, "num_experts": 8,
                  "num_experts_per_tok": 3, "norm_topk_prob": False, "decoder_sparse_step": 1,
                  "mlp_only_layers": [1], "num_hidden_layers": 3, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                  "max_position_embeddings": 128, "use_sliding_window": False, "tie_word_embeddings": False,
                  "bos_token_id": 1, "eos_token_id": 2}


def _reference_moe(x, router, wg, wu, wd, k, renorm):
    logits = x @ router
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        top = np.argsort(-p[n])[:k]
        w = p[n, top] / (p[n, top].sum() if renorm else 1.0)
        for j, e in enumerate(top):
            g, u = x[n] @ wg[e], x[n] @ wu[e]
            out[n] += w[j] * ((g / (1 + np.exp(-g)) * u) @ wd[e])
    return out


@pytest.mark.parametrize("renorm", [True, False])
def test_moe_paths_agree(renorm):
    import jax.numpy as jnp

    from jaxmap.engine.moe import PATHS, moe_mlp

    rng = np.random.default_rng(0)
    e, d, i, k, n = 8, 16, 12, 3, 10
    config = families.config_from_hf({**TINY_QWEN3_MOE, "num_experts": e, "num_experts_per_tok": k,
                                      "hidden_size": d, "moe_intermediate_size": i, "norm_topk_prob": renorm})
    p = {"router": rng.standard_normal((d, e)).astype(np.float32),
         "experts_gate": rng.standard_normal((e, d, i)).astype(np.float32) * 0.3,
         "experts_up": rng.standard_normal((e, d, i)).astype(np.float32) * 0.3,
         "experts_down": rng.standard_normal((e, i, d)).astype(np.float32) * 0.3}
    x = rng.standard_normal((n, d)).astype(np.float32)
    want = _reference_moe(x, *p.values(), k, renorm)
    jp = {key: jnp.asarray(v) for key, v in p.items()}
    for path in PATHS:
        got = moe_mlp(jp, jnp.asarray(x)[None], config, {}, path=path)[0]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4, err_msg=path)


def test_configs_and_tensors():
    mixtral = families.config_from_hf(TINY_MIXTRAL)
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.moe_intermediate_size) == (4, 2, 24)
    specs = families.layer_param_specs(mixtral, 0)
    assert specs["experts_gate"].shape == (4, 32, 24) and specs["experts_down"].shape == (4, 24, 32)
    assert specs["router"].gguf_name == "blk.0.ffn_gate_inp.weight" and "w_gate" not in specs
    qwen = families.config_from_hf(TINY_QWEN3_MOE)
    assert [qwen.is_moe_layer(i) for i in range(3)] == [True, False, True]
    dense_layer = families.layer_param_specs(qwen, 1)
    assert "w_gate" in dense_layer and "router" not in dense_layer and dense_layer["w_gate"].shape == (32, 40)
    assert families.family_of(qwen).layer_design(qwen, 0).moe and not families.family_of(qwen).layer_design(qwen, 1).moe
    assert families.config_from_hf(families.config_to_hf(qwen)) == qwen


@pytest.mark.parametrize(("name", "billions"), [("mixtral-8x7b", 46.7), ("mixtral-8x22b", 140.6),
                                                 ("qwen3-30b-a3b", 30.5), ("qwen3-235b-a22b", 235.1)])
def test_presets_count_expert_bytes(name, billions):
    assert families.param_count(families.preset_config(name)) / 1e9 == pytest.approx(billions, abs=0.1)


def _hf_state(config, source):
    """The random source's tensors as a transformers 5 state dict (experts fused: gate_up_proj [E, 2I, D])."""
    import torch

    state = {}
    for i in range(config.num_hidden_layers):
        specs = families.layer_param_specs(config, i)
        for key, spec in specs.items():
            if key.startswith("experts_"):
                continue
            name = spec.hf_name.replace("block_sparse_moe.", "mlp.")
            state[name] = torch.from_numpy(source.read(spec.hf_name))
        if "experts_gate" in specs:
            g, u, dn = (source.read(specs[k].hf_name) for k in ("experts_gate", "experts_up", "experts_down"))
            base = f"model.layers.{i}.mlp.experts."
            state[base + "gate_up_proj"] = torch.from_numpy(np.concatenate([g, u], axis=2).transpose(0, 2, 1).copy())
            state[base + "down_proj"] = torch.from_numpy(dn.transpose(0, 2, 1).copy())
    for spec in families.outer_param_specs(config).values():
        state[spec.hf_name] = torch.from_numpy(source.read(spec.hf_name))
    return state


@pytest.mark.parametrize("raw", [TINY_MIXTRAL, TINY_QWEN3_MOE], ids=["mixtral", "qwen3_moe"])
def test_logits_match_transformers(raw, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    preset = tmp_path / "tiny-moe.yaml"
    preset.write_text(yaml.safe_dump(raw))
    config = families.preset_config(str(preset))
    model = jaxmap.load(f"preset:{preset}", max_seq_len=64, dtype="float32", progress=False)
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "architectures"})
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    missing, unexpected = hf.load_state_dict(_hf_state(config, RandomSource(config)), strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m]
    ids = [3, 17, 5, 60, 22, 9, 41, 8, 70, 11, 4, 33]  # tokens x k > experts: prefill runs the dense path
    (ours,) = model.forward_logits([ids])
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=0)
    # greedy decode (one token at a time: the gather path) follows transformers' greedy tokens
    out = model.generate([ids], max_new_tokens=4, temperature=0.0)
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)[0, len(ids):].tolist()
    got = out[0] if isinstance(out[0], list) else getattr(out[0], "token_ids", out[0])
    assert list(got)[:4] == want


@pytest.fixture(scope="module")
def tiny_mixtral_folder(tmp_path_factory):
    """A tiny random Mixtral saved by transformers (per-expert block_sparse_moe.experts.N.w1/w2/w3 tensors) and its
    logits for one prompt."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in TINY_MIXTRAL.items() if k != "architectures"})
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    folder = tmp_path_factory.mktemp("tiny-mixtral")
    hf.save_pretrained(folder)
    ids = [3, 17, 5, 60, 22, 9, 41, 8, 70, 11]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].numpy()
    return folder, ids, logits


@pytest.mark.parametrize("mesh", [{}, {"tp": 2}, {"pp": 2}], ids=["one", "tp2", "pp2"])
def test_hf_folder_per_expert_tensors(tiny_mixtral_folder, mesh):
    """Per-expert tensors of a Hugging Face folder are read stacked; tp=2 splits each expert's intermediate dim,
    pp=2 puts one layer on each of two devices."""
    folder, ids, want = tiny_mixtral_folder
    model = jaxmap.load(str(folder), max_seq_len=64, dtype="float32", progress=False, **mesh)
    (ours,) = model.forward_logits([ids])
    np.testing.assert_allclose(ours, want, atol=2e-4, rtol=0)


@pytest.mark.parametrize(("arch", "family"), [("llama", "mixtral"), ("qwen3moe", "qwen3_moe")])
def test_gguf_moe_told_apart_by_metadata(arch, family):
    """A llama GGUF with llama.expert_count > 0 is Mixtral's, not a dense llama's (the files themselves:
    tests/test_moe_gguf.py)."""
    meta = {f"{arch}.expert_count": 4}
    assert families.family_for_gguf(arch, "x", lambda k, d=None: meta.get(k, d)).name == family
    assert families.family_for_gguf("llama", "x", lambda k, d=None: d).name == "llama"
