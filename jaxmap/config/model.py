"""What the network is: :class:`ModelConfig`, the sizes and settings every decoder family shares (no weights).

The field names mirror Hugging Face's ``config.json`` so that a preset in ``models/`` is a config.json a user can
read and edit. Reading a ``config.json``, GGUF metadata or a preset is a family's job (:mod:`jaxmap.families`): the
family that claims a ``model_type`` says how its keys become this config and which features it refuses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxmap.errors import UserError

PRESETS_DIR = Path(__file__).resolve().parents[2] / "models"
LAYER_TYPES = ("full_attention", "sliding_attention")
HIDDEN_ACTS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture values of a decoder-only transformer (no weights); ``architecture`` is the Hugging Face
    ``model_type``, which names the family."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None  # keys a sliding-window layer attends over (itself included)
    # Per layer, "sliding_attention" or "full_attention" (Hugging Face's ``layer_types``); None: every layer is
    # sliding when ``sliding_window`` is set (Mistral v0.1), full otherwise.
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None  # RoPE base of sliding layers where it differs (Gemma 3)
    # RoPE rotates the first int(head_dim * factor) dims of each head; the rest pass through (Phi-4-mini: 0.75)
    partial_rotary_factor: float = 1.0
    hidden_act: str = "silu"  # the gated MLP's activation: silu (SwiGLU) or gelu_tanh (GeGLU)
    query_pre_attn_scalar: float | None = None  # attention scores scaled by its -1/2 power instead of head_dim's
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    # Mixture of experts (0 experts: a dense model). Each MoE layer routes every token to ``num_experts_per_tok`` of
    # ``num_experts`` SwiGLU experts of ``moe_intermediate_size``: softmax over all router logits, top-k, and (with
    # ``norm_topk_prob``) the k weights renormalised to sum to 1, which equals Mixtral's softmax over the chosen logits.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1  # every n-th layer is MoE (Qwen3-MoE), the others dense
    mlp_only_layers: tuple[int, ...] = ()  # layers kept dense whatever the step says
    # gpt-oss's clamped SwiGLU experts: (up + 1) * g * sigmoid(alpha * g), g clamped above at limit, up to +-limit
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"model config: {field} must be a positive integer, got {value!r}")
        for field in ("rms_norm_eps", "rope_theta"):  # zero or negative: NaN logits, silently
            value = getattr(self, field)
            if not _is_positive_number(value):
                raise UserError(f"model config: {field} must be a positive number, got {value!r}")
        for field in ("swiglu_alpha", "swiglu_limit", "rope_local_theta", "query_pre_attn_scalar", "attn_logit_softcap",
                      "final_logit_softcap", "sliding_window"):
            value = getattr(self, field)
            if value is not None and not _is_positive_number(value):
                raise UserError(f"model config: {field} must be a positive number or null, got {value!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise UserError(f"model config: layer_types lists {len(self.layer_types)} layers, "
                                f"num_hidden_layers is {self.num_hidden_layers}")
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise UserError(f"model config: layer type {unknown[0]!r} is not supported; supported: "
                                f"{', '.join(LAYER_TYPES)}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise UserError("model config: layer_types has sliding_attention layers but sliding_window is not set")
        if self.hidden_act not in HIDDEN_ACTS:
            raise UserError(f"model config: activation {self.hidden_act!r} is not supported; supported: "
                            f"{', '.join(HIDDEN_ACTS)}")
        if not _is_positive_number(self.partial_rotary_factor) or self.partial_rotary_factor > 1 \
                or self.partial_rotary_factor != 1 and (self.rotary_dim < 2 or self.rotary_dim % 2):
            raise UserError(f"model config: partial_rotary_factor {self.partial_rotary_factor!r} must give an even "
                            f"number of rotated dims between 2 and head_dim {self.head_dim}")
        _check_rope_scaling(self.rope_scaling, self.rotary_dim)
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise UserError(f"model config: num_experts_per_tok must be between 1 and num_experts "
                                f"{self.num_experts}, got {self.num_experts_per_tok!r}")
            if not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0:
                raise UserError(f"model config: moe_intermediate_size must be a positive integer, "
                                f"got {self.moe_intermediate_size!r}")
            if not isinstance(self.decoder_sparse_step, int) or self.decoder_sparse_step <= 0:
                raise UserError(f"model config: decoder_sparse_step must be a positive integer, "
                                f"got {self.decoder_sparse_step!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"model config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    # ---- derived sizes -------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (all but a partial rotary factor's pass-through tail)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def with_changes(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def is_sliding(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` attends over a sliding window of ``sliding_window`` keys."""
        if not self.sliding_window:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` routes its MLP over experts (else a dense SwiGLU MLP)."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def _check_rope_scaling(scaling: Mapping[str, Any] | None, rotary_dim: int) -> None:
    """The values :mod:`jaxmap.engine.rope` divides by: a missing or zero ``factor``, or ``low_freq_factor`` equal to
    ``high_freq_factor``, would give a KeyError or NaN frequencies; LongRoPE's short and long factors, one positive
    number per rotated frequency. Other rope types are refused by rope itself."""
    if not scaling:
        return
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            value = scaling.get(key)
            if not isinstance(value, (list, tuple)) or len(value) != rotary_dim // 2 \
                    or not all(_is_positive_number(v) for v in value):
                raise UserError(f"model config: rope_scaling.{key} must be a list of {rotary_dim // 2} positive "
                                f"numbers for longrope scaling (one per rotated frequency), got {value!r}"[:300])
        for key in ("original_max_position_embeddings", "factor", "attention_factor"):
            value = scaling.get(key)
            if (value is not None or key == "original_max_position_embeddings") and not _is_positive_number(value):
                raise UserError(f"model config: rope_scaling.{key} must be a positive number for longrope scaling, "
                                f"got {value!r}")
        return
    if kind == "yarn":
        for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"):
            value = scaling.get(key)
            if (value is not None or key == "original_max_position_embeddings") and not _is_positive_number(value):
                raise UserError(f"model config: rope_scaling.{key} must be a positive number for yarn scaling, "
                                f"got {value!r}")
        return
    if kind not in ("linear", "llama3"):
        return
    defaults = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    keys = ("factor", *defaults) if kind == "llama3" else ("factor",)
    for key in keys:
        value = scaling.get(key, defaults.get(key))
        if not _is_positive_number(value):
            raise UserError(f"model config: rope_scaling.{key} must be a positive number for {kind} scaling, "
                            f"got {value!r}")
    if kind == "llama3":
        low = scaling.get("low_freq_factor", defaults["low_freq_factor"])
        high = scaling.get("high_freq_factor", defaults["high_freq_factor"])
        if low >= high:
            raise UserError(f"model config: rope_scaling.low_freq_factor ({low}) must be below high_freq_factor "
                            f"({high})")


def list_presets() -> list[str]:
    return [p.stem for p in PRESETS_DIR.glob("*.yaml")] if PRESETS_DIR.is_dir() else []


def config_fingerprint(config: ModelConfig) -> str:
    """A short hash of what shapes the weights (the name is left out: a renamed copy is the same model)."""
    keys = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias")
    if config.num_experts:  # dense fingerprints stay as they were
        keys += ("num_experts", "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers")
    blob = json.dumps({k: getattr(config, k) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
