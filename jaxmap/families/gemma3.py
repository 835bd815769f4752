"""Gemma 3 text models (270M, 1B as ``gemma3_text``; the text model of 4B-27B ``gemma3`` checkpoints) and Gemma 2.

What sets them apart from the llama layer, all declared here and composed by the engine's generic layer: RMSNorm
scaling by ``1 + weight`` (computed in float32), norms both before and after attention and the MLP, a GeGLU MLP
(tanh-approximated gelu), embeddings scaled by sqrt(hidden) in the compute dtype, scores scaled by
``query_pre_attn_scalar ** -0.5``, tied embeddings, and interleaved sliding-window and full layers (``layer_types``,
or the older ``sliding_window_pattern``: 5 local to 1 global for Gemma 3, 1 to 1 for Gemma 2). Gemma 3 adds per-head
query/key norms and a RoPE base of its own for local layers; Gemma 2 soft-caps attention scores and final logits.

llama.cpp's converter stores every norm weight plus one (its GGUF files hold ``1 + weight``), keeps Hugging Face's
q/k row order, and writes neither the 1:1 / 5:1 layer pattern nor the local RoPE base: those are llama.cpp's constants
for the architecture, repeated here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from jaxmap.config import ModelConfig
from jaxmap.errors import UserError
from jaxmap.families import llama
from jaxmap.families.base import Family, ModelDesign, TensorDecl, config_design
from jaxmap.families.qwen3 import QK_NORM_TENSORS
from jaxmap.families.wrapped import Wrapper

ONE = 1.0  # what llama.cpp adds to Gemma norm weights


def _norm(key: str, hf: str, gguf: str, dim: str = "hidden", axis: str = "embed") -> TensorDecl:
    return TensorDecl(key, f"model.layers.{{i}}.{hf}.weight", f"blk.{{i}}.{gguf}.weight", (dim,), (axis,), "norm",
                      gguf_offset=ONE)


_ATTENTION = tuple(t if t.role != "norm" else dataclasses.replace(t, gguf_offset=ONE)
                   for t in llama.ATTENTION_TENSORS)
_PROJECTIONS = tuple(t for t in llama.MLP_TENSORS if t.role != "norm")
LAYER_TENSORS = (
    *_ATTENTION,
    _norm("attn_post_norm", "post_attention_layernorm", "post_attention_norm"),
    _norm("mlp_norm", "pre_feedforward_layernorm", "ffn_norm"),
    *_PROJECTIONS,
    _norm("mlp_post_norm", "post_feedforward_layernorm", "post_ffw_norm"),
)
QK_NORMS = tuple(dataclasses.replace(t, gguf_offset=ONE) for t in QK_NORM_TENSORS)
OUTER_TENSORS = tuple(dataclasses.replace(t, gguf_offset=ONE) if t.role == "norm" else t
                      for t in llama.OUTER_TENSORS)

_GEMMA_DEFAULTS = {"tie_word_embeddings": True, "use_sliding_window": True, "rms_norm_eps": 1e-6,
                   "hidden_activation": "gelu_pytorch_tanh"}
DEFAULTS = {
    "gemma2": {**_GEMMA_DEFAULTS, "sliding_window_pattern": 2, "query_pre_attn_scalar": 256, "sliding_window": 4096},
    # transformers' Gemma3TextConfig defaults: the nested text configs of the published 4B-27B checkpoints hold
    # only the keys that differ from them.
    "gemma3_text": {**_GEMMA_DEFAULTS, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
                    "sliding_window": 4096, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
                    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                    "max_position_embeddings": 131_072, "bos_token_id": 2, "eos_token_id": 1},
}

# Gemma 3 4B-27B: the text model inside Gemma3ForConditionalGeneration, beside a SigLIP vision tower and its
# projector, which jaxmap leaves out (it runs text).
MULTIMODAL = Wrapper(
    model_type="gemma3",
    architectures=("Gemma3ForConditionalGeneration",),
    text_model_type="gemma3_text",
    prefixes={"language_model.model.": "model.", "model.language_model.": "model.",
              "language_model.lm_head.": "lm_head."},
    left_out={"vision_tower.": "vision tower", "model.vision_tower.": "vision tower",
              "multi_modal_projector.": "multimodal projector", "model.multi_modal_projector.": "multimodal projector"},
)


def _check(config: ModelConfig, raw: Mapping[str, Any]) -> None:
    if raw.get("use_bidirectional_attention"):
        raise UserError("model config: use_bidirectional_attention (an embedding model such as EmbeddingGemma) is "
                        "not supported; jaxmap runs causal language models")


def _model_design(config: ModelConfig) -> ModelDesign:
    return ModelDesign(embed_scale=math.sqrt(config.hidden_size), norm_plus_one=True,
                       final_softcap=config.final_logit_softcap)


def _hf_extra(config: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "attn_logit_softcapping": config.attn_logit_softcap,
        "final_logit_softcapping": config.final_logit_softcap,
    }
    if config.rope_local_theta is not None:
        out["rope_local_base_freq"] = config.rope_local_theta
    return out


def _gguf_extra(arch: str, get, raw: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's constants for the architecture: the layer pattern, Gemma 3's local RoPE base, and the score
    scale it derives (hidden / heads for the 62-layer 27B, head_dim otherwise)."""
    out: dict[str, Any] = {"sliding_window_pattern": 2 if arch == "gemma2" else 6}
    if arch == "gemma3":
        out["rope_local_base_freq"] = 10_000.0
        big = raw["num_hidden_layers"] == 62
        out["query_pre_attn_scalar"] = raw["hidden_size"] // raw["num_attention_heads"] if big else raw["head_dim"]
    else:
        out["query_pre_attn_scalar"] = raw["head_dim"]
    return out


FAMILY = Family(
    name="gemma3",
    label="Gemma 3 (text)",
    model_types=("gemma3_text",),
    architectures={"Gemma3ForCausalLM": "gemma3_text"},
    gguf_architectures={"gemma3": "gemma3_text"},
    layer_tensors=LAYER_TENSORS + QK_NORMS,
    outer_tensors=OUTER_TENSORS,
    projection_inputs=llama.PROJECTION_INPUTS,
    defaults=DEFAULTS,
    design=lambda config, layer: config_design(config, layer, qk_norm=True, norm_plus_one=True, post_norms=True),
    model_design=_model_design,
    hf_extra=_hf_extra,
    gguf_extra=_gguf_extra,
    check=_check,
    wrappers=(MULTIMODAL,),
)

# Gemma 2: the same layer without query/key norms; soft-caps come from its config.
GEMMA2 = dataclasses.replace(
    FAMILY,
    name="gemma2",
    label="Gemma 2",
    model_types=("gemma2",),
    architectures={"Gemma2ForCausalLM": "gemma2"},
    gguf_architectures={"gemma2": "gemma2"},
    layer_tensors=LAYER_TENSORS,
    design=lambda config, layer: config_design(config, layer, norm_plus_one=True, post_norms=True),
    wrappers=(),
)
