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
``[E, hidden, I]`` stacks every MoE family has, and tensor parallelism gives each device matching halves.

llama.cpp (``general.architecture = gpt-oss``) stores them apart: ``blk.N.ffn_{gate,up,down}_exps.{weight,bias}``
(experts in MXFP4, ggml type 39, kept so), ``ffn_gate_inp.{weight,bias}``, ``attn_sinks.weight``,
``post_attention_norm``; converters run with ``--fuse-gate-up-exps`` write ``ffn_gate_up_exps`` instead (gate rows,
then up rows: the GGUF source serves the halves). What its metadata leaves out is llama.cpp's constants for the
architecture: even layers sliding (its SWA pattern 2), the SwiGLU's alpha 1.702 and limit 7, and YaRN without
truncation (transformers' ``truncate: false``, as OpenAI's reference computes it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxmap.config import ModelConfig
from jaxmap.errors import UserError
from jaxmap.families import llama, mixtral
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


def _gguf_extra(arch: str, get, raw: Mapping[str, Any]) -> dict[str, Any]:
    """A ``gpt-oss`` GGUF file's experts (``expert_feed_forward_length`` is the expert width) and llama.cpp's
    constants for the architecture (see the module docstring); YaRN from ``rope.scaling.*``."""
    moe = mixtral.gguf_experts(arch, get, raw)
    layers = int(raw["num_hidden_layers"])
    out: dict[str, Any] = {
        "num_local_experts": moe["num_experts"], "num_experts_per_tok": moe["num_experts_per_tok"] or 4,
        "intermediate_size": moe["moe_intermediate_size"], "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
        "use_sliding_window": True, "sliding_window": int(raw.get("sliding_window") or 128),
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]}
    kind = get(f"{arch}.rope.scaling.type", None)
    if kind == "yarn":
        out["rope_scaling"] = {
            "rope_type": "yarn", "factor": float(get(f"{arch}.rope.scaling.factor", 32.0)),
            "original_max_position_embeddings": int(get(f"{arch}.rope.scaling.original_context_length", 4096)),
            "beta_fast": float(get(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
            "beta_slow": float(get(f"{arch}.rope.scaling.yarn_beta_slow", 1.0)), "truncate": False}
    elif kind not in (None, "none"):
        raise UserError(f"gpt-oss GGUF: rope scaling {kind!r} is not what gpt-oss uses (yarn); the file was written "
                        "by a converter jaxmap does not know")
    return out


def _design(config: ModelConfig, layer: int):
    return config_design(config, layer, attn_sinks=True, o_bias=config.attention_bias, moe=True, moe_bias=True,
                         moe_act="clamped_swiglu", swiglu_alpha=config.swiglu_alpha, swiglu_limit=config.swiglu_limit)


FAMILY = Family(
    name="gpt_oss",
    label="gpt-oss",
    model_types=("gpt_oss",),
    architectures={"GptOssForCausalLM": "gpt_oss"},
    gguf_architectures={"gpt-oss": "gpt_oss"},
    layer_tensors=LAYER_TENSORS,
    outer_tensors=llama.OUTER_TENSORS,
    projection_inputs={"wq": "attn_in", "wk": "attn_in", "wv": "attn_in", "wo": "attn_out", "router": "mlp_in",
                       "experts_gate": "mlp_in", "experts_up": "mlp_in"},
    defaults=DEFAULTS,
    design=_design,
    config_extra=_config,
    hf_extra=_hf_extra,
    gguf_extra=_gguf_extra,
)
