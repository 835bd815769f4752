"""Qwen3-MoE (30B-A3B, 235B-A22B): the Qwen3 layer (QK-norm, no biases) with a mixture of ``num_experts`` (128)
SwiGLU experts of ``moe_intermediate_size``, each token routed to ``num_experts_per_tok`` (8): softmax over all
router logits, top-k, renormalised when ``norm_topk_prob``. Layers listed in ``mlp_only_layers``, or off the
``decoder_sparse_step``, keep a dense MLP of ``intermediate_size``. GGUF architecture ``qwen3moe``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxmap.families import llama, qwen3
from jaxmap.families.base import LayerDesign
from jaxmap.families.mixtral import gguf_experts, moe_tensors

DENSE_MLP = tuple(dataclasses.replace(t, moe=False) for t in llama.MLP_TENSORS[1:])


def _config(raw: Mapping[str, Any]) -> dict[str, Any]:
    # transformers 5 saves the expert count as num_local_experts; Qwen's own configs say num_experts
    experts = raw.get("num_experts", raw.get("num_local_experts"))
    return {"num_experts": int(experts if experts is not None else 128),
            "num_experts_per_tok": int(raw.get("num_experts_per_tok", 8)),
            "moe_intermediate_size": int(raw.get("moe_intermediate_size", 768)),
            "norm_topk_prob": bool(raw.get("norm_topk_prob", False)),
            "decoder_sparse_step": int(raw.get("decoder_sparse_step", 1)),
            "mlp_only_layers": tuple(int(i) for i in raw.get("mlp_only_layers") or ())}


def _hf_extra(config) -> dict[str, Any]:
    return {"num_experts": config.num_experts, "num_experts_per_tok": config.num_experts_per_tok,
            "moe_intermediate_size": config.moe_intermediate_size, "norm_topk_prob": config.norm_topk_prob,
            "decoder_sparse_step": config.decoder_sparse_step, "mlp_only_layers": list(config.mlp_only_layers)}


def _gguf_extra(arch: str, get, raw: Mapping[str, Any]) -> dict[str, Any]:
    """llama.cpp's qwen3moe graph always renormalises the top-k weights (``build_moe_ffn(..., norm_w=true)``), so a
    file runs that way unless it says otherwise (``{arch}.expert_weights_norm``, which some converters write). Dense
    layers mixed in are told by their tensors (the GGUF source fills ``mlp_only_layers``)."""
    moe = gguf_experts(arch, get, raw)
    return {"num_experts": moe["num_experts"], "num_experts_per_tok": moe["num_experts_per_tok"] or 8,
            "moe_intermediate_size": moe["moe_intermediate_size"],
            "norm_topk_prob": bool(get(f"{arch}.expert_weights_norm", True))}


FAMILY = dataclasses.replace(
    qwen3.FAMILY,
    name="qwen3_moe",
    label="Qwen3-MoE",
    model_types=("qwen3_moe",),
    architectures={"Qwen3MoeForCausalLM": "qwen3_moe"},
    gguf_architectures={"qwen3moe": "qwen3_moe"},
    layer_tensors=llama.ATTENTION_TENSORS + qwen3.QK_NORM_TENSORS + llama.MLP_TENSORS[:1] + DENSE_MLP
    + moe_tensors("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
    projection_inputs={**llama.PROJECTION_INPUTS, "router": "mlp_in", "experts_gate": "mlp_in",
                       "experts_up": "mlp_in"},
    design=lambda config, layer: LayerDesign(qk_norm=True, moe=config.is_moe_layer(layer)),
    config_extra=_config,
    hf_extra=_hf_extra,
    gguf_extra=_gguf_extra,
)
