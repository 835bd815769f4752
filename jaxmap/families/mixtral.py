"""Mixtral (8x7B, 8x22B): the Mistral layer with its MLP replaced by a sparse mixture of 8 SwiGLU experts, each token
routed to 2 of them (softmax over the two chosen router logits, the same as softmax over all then renormalising the
top 2), and a sliding window where the config sets one.

Experts are kept stacked, ``[experts, in, out]`` per layer (``experts_gate`` / ``experts_up`` / ``experts_down``), so
the engine gathers the routed experts' slices (:mod:`jaxmap.engine.moe`). Hugging Face checkpoints store each expert
on its own (``block_sparse_moe.experts.N.w1/w3/w2``); the stacked tensor's name here is that name without the expert
index. llama.cpp's GGUF files keep them stacked (``blk.N.ffn_gate_exps`` ...) under ``general.architecture = llama``
with ``llama.expert_count`` > 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxmap.families import llama
from jaxmap.families.base import TensorDecl, config_design


def moe_tensors(prefix: str, router: str, gate: str, up: str, down: str) -> tuple[TensorDecl, ...]:
    """A MoE layer's router and stacked experts, named ``{prefix}.{router}.weight`` and
    ``{prefix}.experts.{gate|up|down}`` in Hugging Face terms (the per-expert tensors without their index)."""
    p = "model.layers.{i}." + prefix
    return (
        TensorDecl("router", f"{p}.{router}.weight", "blk.{i}.ffn_gate_inp.weight", ("hidden", "experts"),
                   ("embed", "experts"), "router", transpose=True, moe=True),
        TensorDecl("experts_gate", f"{p}.experts.{gate}", "blk.{i}.ffn_gate_exps.weight",
                   ("experts", "hidden", "moe_mlp"), ("experts", "embed", "mlp"), "expert", moe=True),
        TensorDecl("experts_up", f"{p}.experts.{up}", "blk.{i}.ffn_up_exps.weight",
                   ("experts", "hidden", "moe_mlp"), ("experts", "embed", "mlp"), "expert", moe=True),
        TensorDecl("experts_down", f"{p}.experts.{down}", "blk.{i}.ffn_down_exps.weight",
                   ("experts", "moe_mlp", "hidden"), ("experts", "mlp", "embed"), "expert", moe=True),
    )


def _config(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {"num_experts": int(raw.get("num_local_experts", 8)), "num_experts_per_tok": int(
        raw.get("num_experts_per_tok", 2)), "moe_intermediate_size": int(raw["intermediate_size"]),
        "norm_topk_prob": True}


def _hf_extra(config) -> dict[str, Any]:
    return {"num_local_experts": config.num_experts, "num_experts_per_tok": config.num_experts_per_tok}


def gguf_experts(arch: str, get, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The expert counts of a MoE GGUF file (``{arch}.expert_count``, ``expert_used_count``) and the expert's
    intermediate size: ``expert_feed_forward_length`` where the converter wrote it (qwen3moe), else
    ``feed_forward_length`` (Mixtral's llama files: its experts are its only MLP)."""
    used = get(f"{arch}.expert_used_count", None)
    return {"num_experts": int(get(f"{arch}.expert_count", 0) or 0),
            "num_experts_per_tok": int(used) if used is not None else None,
            "moe_intermediate_size": int(get(f"{arch}.expert_feed_forward_length", raw["intermediate_size"]))}


def gguf_fused_gate_up(layer: int, kind: str) -> str:
    """The GGUF name of a layer's expert gate and up stacks fused into one (``kind`` ``weight`` or ``bias``), as
    llama.cpp's converter writes them with ``--fuse-gate-up-exps``: gate rows, then up rows."""
    return f"blk.{layer}.ffn_gate_up_exps.{kind}"


def gguf_dense_layers(gguf_names, layers: int) -> dict[str, Any]:
    """``mlp_only_layers`` of a MoE GGUF file, told by its tensors: a layer with no router (``ffn_gate_inp``) but a
    dense ``ffn_gate`` keeps a dense MLP (Qwen3-MoE's ``mlp_only_layers`` / ``decoder_sparse_step``, which
    llama.cpp's metadata does not carry)."""
    dense = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in gguf_names
             and f"blk.{i}.ffn_gate.weight" in gguf_names]
    return {"mlp_only_layers": dense, "decoder_sparse_step": 1} if dense else {}


def _gguf_extra(arch: str, get, raw: Mapping[str, Any]) -> dict[str, Any]:
    moe = gguf_experts(arch, get, raw)
    return {"model_type": "mixtral", "num_local_experts": moe["num_experts"],
            "num_experts_per_tok": moe["num_experts_per_tok"] or 2, "intermediate_size": moe["moe_intermediate_size"]}


FAMILY = dataclasses.replace(
    llama.FAMILY,
    name="mixtral",
    label="Mixtral",
    model_types=("mixtral",),
    architectures={"MixtralForCausalLM": "mixtral"},
    gguf_architectures={},  # llama files with llama.expert_count > 0 (families.family_for_gguf)
    layer_tensors=llama.ATTENTION_TENSORS + llama.MLP_TENSORS[:1]
    + moe_tensors("block_sparse_moe", "gate", "w1", "w3", "w2"),
    projection_inputs={**{k: v for k, v in llama.PROJECTION_INPUTS.items() if not k.startswith("w_")},
                       "router": "mlp_in", "experts_gate": "mlp_in", "experts_up": "mlp_in"},
    defaults={"mixtral": {"use_sliding_window": True}},
    gguf_permuted_qk=("llama",),
    design=lambda config, layer: config_design(config, layer, moe=config.is_moe_layer(layer)),
    config_extra=_config,
    hf_extra=_hf_extra,
    gguf_extra=_gguf_extra,
    gguf_claims=lambda arch, get: arch == "llama" and int(get("llama.expert_count", 0) or 0) > 0,
)
