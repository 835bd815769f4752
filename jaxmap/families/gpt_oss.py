"""gpt-oss (20b, 120b): OpenAI's open-weight mixture of experts.

What sets it apart, all declared here and composed by the engine's generic layer:

- attention with a learned logit per head (``self_attn.sinks``) in every softmax's denominator (it takes some of
  the probability and gives no value back), biases on q, k, v and o, and sliding-window (128) layers alternating
  with full ones (``layer_types``; sliding first);
- YaRN RoPE (``rope_scaling`` type ``yarn``: factor 32 over an original 4096 context, cos/sin scaled by
  0.1 ln(32) + 1), rotate-half layout;
- ``num_local_experts`` experts (32 or 128), top-4, softmax over the chosen router logits (the same as softmax over
  all, top-k and renormalised: jaxmap's ``norm_topk_prob``), biases on the router and on every expert projection;
- the clamped SwiGLU: gate clamped above at ``swiglu_limit`` (7), up to [-7, 7], ``(up + 1) * gate *
  sigmoid(1.702 gate)``.

Hugging Face stores each layer's experts stacked and already ``[in, out]``: ``mlp.experts.gate_up_proj`` ``[E,
hidden, 2 I]`` with gate in the even columns and up in the odd ones (and ``gate_up_proj_bias`` ``[E, 2 I]``),
``down_proj`` ``[E, I, hidden]``. The gate and up stacks are declared as interleaved columns of the fused tensor
(:attr:`~jaxmap.families.base.TensorDecl.interleaved`), so to the planner, the rules table and ISQ they are the two
``[E, hidden, I]`` stacks every MoE family has, and tensor parallelism gives each device matching halves. llama.cpp
(``general.architecture = gpt-oss``) stores them apart: ``blk.N.ffn_{gate,up,down}_exps.{weight,bias}``,
``ffn_gate_inp.{weight,bias}``, ``attn_sinks.weight``, ``post_attention_norm``; GGUF gpt-oss files are not read yet
(their MXFP4 experts, ggml type 39, need the MXFP4 type first).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxmap.config import ModelConfig
from jaxmap.families import llama
from jaxmap.families.base import Family, TensorDecl, config_design

_L = "model.layers.{i}."
_GATE_UP = _L + "mlp.experts.gate_up_proj"
_GATE_UP_BIAS = _L + "mlp.experts.gate_up_proj_bias"

LAYER_TENSORS = (
    *llama.ATTENTION_TENSORS,
    *llama.QKV_BIAS_TENSORS,
    TensorDecl("bo", _L + "self_attn.o_proj.bias", "blk.{i}.attn_output.bias", ("hidden",), ("embed",),
               "attention", when="attention_bias"),
    TensorDecl("sinks", _L + "self_attn.sinks", "blk.{i}.attn_sinks.weight", ("heads",), ("heads",), "attention"),
    TensorDecl("mlp_norm", _L + "post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight",
               ("hidden",), ("embed",), "norm"),
    TensorDecl("router", _L + "mlp.router.weight", "blk.{i}.ffn_gate_inp.weight", ("hidden", "experts"),
               ("embed", "experts"), "router", transpose=True),
    TensorDecl("router_bias", _L + "mlp.router.bias", "blk.{i}.ffn_gate_inp.bias", ("experts",), ("experts",),
               "router"),
    TensorDecl("experts_gate", _GATE_UP + "[gate]", "blk.{i}.ffn_gate_exps.weight", ("experts", "hidden", "moe_mlp"),
               ("experts", "embed", "mlp"), "expert", interleaved=(_GATE_UP, 0, 2)),
    TensorDecl("experts_up", _GATE_UP + "[up]", "blk.{i}.ffn_up_exps.weight", ("experts", "hidden", "moe_mlp"),
               ("experts", "embed", "mlp"), "expert", interleaved=(_GATE_UP, 1, 2)),
    TensorDecl("experts_down", _L + "mlp.experts.down_proj", "blk.{i}.ffn_down_exps.weight",
               ("experts", "moe_mlp", "hidden"), ("experts", "mlp", "embed"), "expert"),
    TensorDecl("experts_gate_bias", _GATE_UP_BIAS + "[gate]", "blk.{i}.ffn_gate_exps.bias", ("experts", "moe_mlp"),
               ("experts", "mlp"), "expert", interleaved=(_GATE_UP_BIAS, 0, 2)),
    TensorDecl("experts_up_bias", _GATE_UP_BIAS + "[up]", "blk.{i}.ffn_up_exps.bias", ("experts", "moe_mlp"),
               ("experts", "mlp"), "expert", interleaved=(_GATE_UP_BIAS, 1, 2)),
    TensorDecl("experts_down_bias", _L + "mlp.experts.down_proj_bias", "blk.{i}.ffn_down_exps.bias",
               ("experts", "hidden"), ("experts", "embed"), "expert"),
)

# transformers' GptOssConfig defaults (the 120b's sizes), for config.json files that leave keys out
DEFAULTS = {"gpt_oss": {"use_sliding_window": True, "attention_bias": True, "sliding_window": 128,
                        "sliding_window_pattern": 2, "rope_theta": 150000.0, "rms_norm_eps": 1e-5,
                        "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
                        "num_hidden_layers": 36, "num_attention_heads": 64, "num_key_value_heads": 8,
                        "head_dim": 64, "max_position_embeddings": 131072, "num_local_experts": 128,
                        "num_experts_per_tok": 4, "swiglu_alpha": 1.702, "swiglu_limit": 7.0}}


def _config(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {"num_experts": int(raw.get("num_local_experts", raw.get("num_experts", 128))),
            "num_experts_per_tok": int(raw.get("num_experts_per_tok", 4)),
            "moe_intermediate_size": int(raw["intermediate_size"]), "norm_topk_prob": True,
            "swiglu_alpha": float(raw.get("swiglu_alpha", 1.702)), "swiglu_limit": float(raw.get("swiglu_limit", 7.0))}


def _hf_extra(config: ModelConfig) -> dict[str, Any]:
    return {"num_local_experts": config.num_experts, "num_experts_per_tok": config.num_experts_per_tok,
            "swiglu_alpha": config.swiglu_alpha, "swiglu_limit": config.swiglu_limit}


def _design(config: ModelConfig, layer: int):
    return config_design(config, layer, attn_sinks=True, o_bias=config.attention_bias, moe=True, moe_bias=True,
                         moe_act="clamped_swiglu", swiglu_alpha=config.swiglu_alpha, swiglu_limit=config.swiglu_limit)


FAMILY = Family(
    name="gpt_oss",
    label="gpt-oss",
    model_types=("gpt_oss",),
    architectures={"GptOssForCausalLM": "gpt_oss"},
    gguf_architectures={},  # gpt-oss GGUF files (MXFP4 experts) are not read yet
    layer_tensors=LAYER_TENSORS,
    outer_tensors=llama.OUTER_TENSORS,
    projection_inputs={"wq": "attn_in", "wk": "attn_in", "wv": "attn_in", "wo": "attn_out", "router": "mlp_in",
                       "experts_gate": "mlp_in", "experts_up": "mlp_in"},
    defaults=DEFAULTS,
    design=_design,
    config_extra=_config,
    hf_extra=_hf_extra,
)
