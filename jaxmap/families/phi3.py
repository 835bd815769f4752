"""Phi-3 and Phi-3.5 mini/medium, Phi-4-mini (``phi3``, ``Phi3ForCausalLM``; GGUF ``phi3``).

The llama layer (RMSNorm, grouped-query attention, SwiGLU), stored differently and rotated differently:

- q, k and v are one stored tensor, ``qkv_proj`` ``[q + 2 kv, hidden]``, and gate and up another, ``gate_up_proj``
  ``[2 mlp, hidden]`` (gate first); llama.cpp keeps both fused too (``attn_qkv``, and ``ffn_up`` for gate+up). Each
  part is declared as rows of its stored tensor (:func:`~jaxmap.families.base.fused_part`), so to the planner,
  tensor parallelism, ISQ and placement regexes it is a tensor of its own: a tp split gives every device whole query
  and kv heads and the matching rows of gate and up, which a column split of the fused tensor would not.
- LongRoPE (``rope_scaling`` type ``longrope``, earlier ``su``) on the 128k models, Phi-3.5 and Phi-4-mini: per
  frequency short and long factors and an attention factor (:mod:`jaxmap.families.rope`), the long ones chosen when
  the planned context exceeds ``original_max_position_embeddings`` (a key of its own beside rope_scaling here).
- Phi-4-mini rotates 3/4 of each head (``partial_rotary_factor``) and ties its LM head to the embeddings.
- A ``sliding_window`` in config.json is honoured as transformers does (Phi-3-mini-4k: 2047 keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxmap.config import ModelConfig
from jaxmap.errors import UserError
from jaxmap.families import llama
from jaxmap.families.base import Family, TensorDecl, fused_part

QKV = ("model.layers.{i}.self_attn.qkv_proj.weight", "blk.{i}.attn_qkv.weight")
GATE_UP = ("model.layers.{i}.mlp.gate_up_proj.weight", "blk.{i}.ffn_up.weight")
_LLAMA = {t.key: t for t in llama.ATTENTION_TENSORS + llama.MLP_TENSORS}

LAYER_TENSORS: tuple[TensorDecl, ...] = (
    _LLAMA["attn_norm"],
    fused_part("wq", *QKV, "q", ("hidden", "q"), ("embed", "heads"), "attention", transpose=True),
    fused_part("wk", *QKV, "k", ("hidden", "kv"), ("embed", "kv_heads"), "attention", transpose=True),
    fused_part("wv", *QKV, "v", ("hidden", "kv"), ("embed", "kv_heads"), "attention", transpose=True),
    _LLAMA["wo"],
    _LLAMA["mlp_norm"],
    fused_part("w_gate", *GATE_UP, "gate", ("hidden", "mlp"), ("embed", "mlp"), "mlp", transpose=True),
    fused_part("w_up", *GATE_UP, "up", ("hidden", "mlp"), ("embed", "mlp"), "mlp", transpose=True),
    _LLAMA["w_down"],
)

# transformers' Phi3Config defaults that a config.json may leave out.
DEFAULTS = {"phi3": {"use_sliding_window": True, "original_max_position_embeddings": 4096, "bos_token_id": 1,
                     "eos_token_id": 32000}}


def _check(config: ModelConfig, raw: Mapping[str, Any]) -> None:
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "longrope"):
        raise UserError(f"model config: phi3 models take longrope (or no) rope scaling, not {kind!r} (as "
                        "transformers' Phi3Config)")


def _hf_extra(config: ModelConfig) -> dict[str, Any]:
    scaling = config.rope_scaling or {}
    original = scaling.get("original_max_position_embeddings")
    return {"original_max_position_embeddings": original} if original else {}


def _gguf_extra(arch: str, get, raw: dict[str, Any]) -> dict[str, Any]:
    original = get(f"{arch}.rope.scaling.original_context_length", None)
    return {"original_max_position_embeddings": int(original)} if original else {}


FAMILY = Family(
    name="phi3",
    label="Phi-3, Phi-3.5, Phi-4-mini",
    model_types=("phi3",),
    architectures={"Phi3ForCausalLM": "phi3"},
    gguf_architectures={"phi3": "phi3"},
    layer_tensors=LAYER_TENSORS,
    outer_tensors=llama.OUTER_TENSORS,
    projection_inputs=llama.PROJECTION_INPUTS,
    defaults=DEFAULTS,
    check=_check,
    hf_extra=_hf_extra,
    gguf_extra=_gguf_extra,
)
