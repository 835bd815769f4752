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
from jaxmap.families.mixtral import moe_tensors

DENSE_MLP = tuple(dataclasses.replace(t, moe=False) for t in llama.MLP_TENSORS[1:])


def _config(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {"num_experts": int(raw.get("num_experts", 128)),
            "num_experts_per_tok": int(raw.get("num_experts_per_tok", 8)),
            "moe_intermediate_size": int(raw.get("moe_intermediate_size", 768)),
            "norm_topk_prob": bool(raw.get("norm_topk_prob", False)),
            "decoder_sparse_step": int(raw.get("decoder_sparse_step", 1)),
            "mlp_only_layers": tuple(int(i) for i in raw.get("mlp_only_layers") or ())}


def _hf_extra(config) -> dict[str, Any]:
    return {"num_experts": config.num_experts, "num_experts_per_tok": config.num_experts_per_tok,
            "moe_intermediate_size": config.moe_intermediate_size, "norm_topk_prob": config.norm_topk_prob,
            "decoder_sparse_step": config.decoder_sparse_step, "mlp_only_layers": list(config.mlp_only_layers)}


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
)
