"""Torch-free loader for the tiny MoE models' transformers reference (written by make_tiny_moe.py), and a writer of
their GGUF files as llama.cpp's converter lays them out, for the MoE tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
MODELS_DIR = Path(__file__).resolve().parent.parent / "data"
NAMES = ("tiny-mixtral-swa", "tiny-qwen3-moe", "tiny-qwen3-moe-norm")


def load_moe_reference(name: str) -> dict[str, Any]:
    """``folder``, ``input_ids`` (two prompts), ``greedy`` (10 tokens each), ``margins`` (each greedy step's top-1
    minus top-2 logit) and ``logits`` (each prompt's [T, V])."""
    if name not in NAMES:
        raise KeyError(f"unknown MoE reference {name!r}; known: {', '.join(NAMES)}")
    meta = json.loads((DATA_DIR / f"{name}.json").read_text(encoding="utf-8"))
    with np.load(DATA_DIR / f"{name}.npz") as npz:
        logits = [np.asarray(npz[f"logits_{i}"], np.float32) for i in range(len(meta["prompts"]))]
    return {"name": name, "folder": MODELS_DIR / name, "input_ids": [p["input_ids"] for p in meta["prompts"]],
            "greedy": [p["greedy_ids"] for p in meta["prompts"]],
            "margins": [p["greedy_margins"] for p in meta["prompts"]], "logits": logits, "meta": meta}


def load_gpt_oss_reference(name: str = "tiny-gpt-oss") -> dict[str, Any]:
    """A tiny gpt-oss's transformers reference (make_tiny_gpt_oss.py): ``input_ids``, ``greedy``, ``logits``;
    ``tiny-gpt-oss-mxfp4-limit7`` is the MXFP4 folder run with llama.cpp's SwiGLU limit (its GGUF tests')."""
    meta = json.loads((DATA_DIR / f"{name}.json").read_text(encoding="utf-8"))
    with np.load(DATA_DIR / f"{name}.npz") as npz:
        logits = [np.asarray(npz[f"logits_{i}"], np.float32) for i in range(len(meta["prompts"]))]
    return {"input_ids": [p["input_ids"] for p in meta["prompts"]],
            "greedy": [p["greedy_ids"] for p in meta["prompts"]], "logits": logits}


# Hugging Face per-expert / per-layer names -> llama.cpp's (convert_hf_to_gguf.py's tensor map)
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
          "block_sparse_moe.gate": "ffn_gate_inp"}
_EXPERT = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps", "gate_proj": "ffn_gate_exps",
           "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
_OUTER = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's two RoPE halves interleaved row by row."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_moe_gguf(name: str, path: Path, qtype=None, expert_weights_norm: bool | None = None,
                   expert_count: int | None = None, drop: tuple[str, ...] = ()) -> Path:
    """The tiny model ``name`` as a GGUF file: Mixtral as ``llama`` with ``llama.expert_count`` and permuted q/k rows,
    Qwen3-MoE as ``qwen3moe``; per-expert tensors stacked ``[E, out, in]`` (numpy order) into
    ``blk.N.ffn_{gate,up,down}_exps.weight``. ``qtype`` (a GGMLQuantizationType) stores every 2-D and 3-D
    projection quantized (embeddings, norms and the router stay float32, as llama.cpp keeps the router in F32 for
    small ones). ``expert_weights_norm`` writes ``{arch}.expert_weights_norm`` (llama.cpp's qwen3moe graph always
    renormalises; the tiny Qwen3-MoE without norm_topk_prob needs it written false). ``expert_count`` writes another
    count than the tensors hold and ``drop`` leaves tensors out (files that do not match their metadata)."""
    import gguf
    from safetensors import safe_open

    folder = MODELS_DIR / name
    config = json.loads((folder / "config.json").read_text())
    mixtral = config["model_type"] == "mixtral"
    arch = "llama" if mixtral else "qwen3moe"
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    experts = config.get("num_local_experts", config.get("num_experts"))
    tensors: dict[str, np.ndarray] = {}
    stacks: dict[str, dict[int, np.ndarray]] = {}
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no iteration)
            array = f.get_tensor(key).astype(np.float32)
            if key in _OUTER:
                tensors[_OUTER[key]] = array
                continue
            parts = key.split(".")
            layer, rest = parts[2], ".".join(parts[3:]).removesuffix(".weight")
            if ".experts." in rest:
                _, expert, proj = rest.rsplit(".", 2)
                stacks.setdefault(f"blk.{layer}.{_EXPERT[proj]}.weight", {})[int(expert)] = array
                continue
            gname = f"blk.{layer}.{_LAYER[rest]}.weight"
            if mixtral and rest == "self_attn.q_proj":
                array = _permute(array, heads)
            elif mixtral and rest == "self_attn.k_proj":
                array = _permute(array, kv)
            tensors[gname] = array
    for gname, per_expert in stacks.items():
        tensors[gname] = np.stack([per_expert[e] for e in range(experts)])
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    w.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_expert_count(experts if expert_count is None else expert_count)
    w.add_expert_used_count(config["num_experts_per_tok"])
    if not mixtral:
        w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if config.get("sliding_window") and config.get("use_sliding_window", mixtral):
        w.add_sliding_window(config["sliding_window"])
    if expert_weights_norm is not None:
        w.add_expert_weights_norm(expert_weights_norm)
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    w.add_vocab_size(config["vocab_size"])
    for gname, array in tensors.items():
        if gname in drop:
            continue
        block = gguf.GGML_QUANT_SIZES[qtype][0] if qtype is not None else 0
        quantize = (qtype is not None and array.ndim >= 2 and array.shape[-1] % block == 0
                    and "token_embd" not in gname and "gate_inp" not in gname)
        if quantize:
            w.add_tensor(gname, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_GPT_OSS_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight":
                  "post_attention_norm.weight", "self_attn.sinks": "attn_sinks.weight",
                  "mlp.router.weight": "ffn_gate_inp.weight", "mlp.router.bias": "ffn_gate_inp.bias",
                  "mlp.experts.down_proj_bias": "ffn_down_exps.bias",
                  **{f"self_attn.{p}_proj.{k}": f"attn_{g}.{k}" for p, g in
                     (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")) for k in ("weight", "bias")}}
_FP4 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def _dequantize_hf_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Hugging Face MXFP4 ``[..., out, in / 32, 16]`` blocks (even input in the low nibble) and E8M0 scales ->
    float ``[..., out, in]``, written out here from the format's definition (not jaxmap's reader)."""
    codes = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    values = _FP4[codes] * np.ldexp(np.float32(1), scales.astype(np.int32) - 127)[..., None]
    return values.reshape(*blocks.shape[:-2], -1).astype(np.float32)


def _add_harmony_vocab(w) -> None:
    """tests/data/harmony's vocabulary as a gpt-oss GGUF keeps one: byte-level BPE (``gpt2``) with pre-tokenizer
    ``gpt-4o``, harmony's tokens marked control (type 3), gpt-oss-20b's chat template."""
    harmony = MODELS_DIR / "harmony"
    vocab = json.loads((harmony / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    byte_level = {" ": "\u0120", "\n": "\u010a"}  # GPT-2's byte -> character map, for the two non-printables here
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-4o")
    w.add_token_list([byte_level.get(t, t) for t in tokens])
    w.add_token_types([3 if t.startswith("<") and len(t) > 1 else 1 for t in tokens])
    w.add_token_merges([])
    w.add_chat_template((harmony / "chat_template.jinja").read_text())


def write_gpt_oss_gguf(path: Path, fuse_gate_up: bool = False, yarn_betas: bool = True,
                       drop: tuple[str, ...] = (), expert_type: str = "MXFP4") -> Path:
    """tiny-gpt-oss-mxfp4 as llama.cpp's converter writes a ``gpt-oss`` file: attention, norms, router and sinks in
    F32, the experts as ``ffn_{gate,up,down}_exps`` in MXFP4 (quantized by the ``gguf`` package from the folder's
    exactly representable values, so the same numbers), gate and up apart (the even and odd rows of
    ``gate_up_proj``) or, with ``fuse_gate_up``, as one ``ffn_gate_up_exps`` (gate rows, then up rows) as
    ``--fuse-gate-up-exps`` writes; the harmony test vocabulary as its tokenizer. ``expert_type`` ``F32`` stores
    them as floats; ``drop`` leaves tensors out."""
    import gguf
    from safetensors import safe_open

    folder = MODELS_DIR / "tiny-gpt-oss-mxfp4"
    config = json.loads((folder / "config.json").read_text())
    rope = config["rope_parameters"]
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        hf = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
    tensors: dict[str, np.ndarray] = {"token_embd.weight": hf.pop("model.embed_tokens.weight"),
                                      "output_norm.weight": hf.pop("model.norm.weight"),
                                      "output.weight": hf.pop("lm_head.weight")}
    experts: dict[str, np.ndarray] = {}  # float [E, out, in]
    for i in range(config["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        for rest, gname in _GPT_OSS_LAYER.items():
            tensors[f"blk.{i}.{gname}"] = hf.pop(pre + rest).astype(np.float32)
        gate_up = _dequantize_hf_mxfp4(hf.pop(pre + "mlp.experts.gate_up_proj_blocks"),
                                       hf.pop(pre + "mlp.experts.gate_up_proj_scales"))
        bias = hf.pop(pre + "mlp.experts.gate_up_proj_bias").astype(np.float32)
        experts[f"blk.{i}.ffn_down_exps.weight"] = _dequantize_hf_mxfp4(
            hf.pop(pre + "mlp.experts.down_proj_blocks"), hf.pop(pre + "mlp.experts.down_proj_scales"))
        if fuse_gate_up:
            experts[f"blk.{i}.ffn_gate_up_exps.weight"] = np.concatenate([gate_up[:, 0::2], gate_up[:, 1::2]], 1)
            tensors[f"blk.{i}.ffn_gate_up_exps.bias"] = np.concatenate([bias[:, 0::2], bias[:, 1::2]], 1)
        else:
            experts[f"blk.{i}.ffn_gate_exps.weight"], experts[f"blk.{i}.ffn_up_exps.weight"] = (
                gate_up[:, 0::2], gate_up[:, 1::2])
            tensors[f"blk.{i}.ffn_gate_exps.bias"], tensors[f"blk.{i}.ffn_up_exps.bias"] = bias[:, 0::2], bias[:, 1::2]
    assert not hf, sorted(hf)
    arch = "gpt-oss"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if yarn_betas:
        w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    w.add_expert_count(config["num_local_experts"])
    w.add_expert_used_count(config["num_experts_per_tok"])
    w.add_expert_feed_forward_length(config["intermediate_size"])
    w.add_sliding_window(config["sliding_window"])
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    w.add_vocab_size(config["vocab_size"])
    _add_harmony_vocab(w)
    mxfp4 = gguf.GGMLQuantizationType.MXFP4
    for gname, array in {**tensors, **experts}.items():
        if gname in drop:
            continue
        if gname in experts and expert_type == "MXFP4":
            raw = gguf.quants.quantize(array, mxfp4)
            assert np.array_equal(gguf.quants.dequantize(raw, mxfp4), array)  # exactly the folder's values
            w.add_tensor(gname, raw, raw_dtype=mxfp4)
        else:
            w.add_tensor(gname, np.ascontiguousarray(array, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
