"""What the llama family's parameters are: each one's source tensor, shape and logical axes. Pure data, no jax.

Every parameter is declared here once with its *logical axes* (``vocab``, ``embed``, ``heads``, ``kv_heads``,
``mlp``). Model code never names a device or a mesh axis: the sharding rules table (``sharding_rules.py``) maps
logical axes to mesh axes, and the planner counts bytes per device from the same declarations without importing jax.

Projections are kept 2-D ``[in, out]`` (flax's layout; Hugging Face stores ``[out, in]``, transposed one tensor at a
time while loading). Measured on XLA:CPU with SmolLM2's shapes: ``[in, out]`` matrix-vector products ran 15-25%
faster than ``[out, in]``, and 3-D ``[heads, head_dim, embed]`` weights made XLA transpose-copy every weight on
every step (70 ms per token against 29 ms).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxmap.config import ModelConfig

LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp")

# Which activation each projection multiplies: the names :func:`decoder_layer` records in ``taps``, and so what an
# importance matrix (:mod:`jaxmap.imatrix`) measures for each weight.
PROJECTION_INPUTS = {"wq": "attn_in", "wk": "attn_in", "wv": "attn_in", "wo": "attn_out",
                     "w_gate": "mlp_in", "w_up": "mlp_in", "w_down": "mlp_act"}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: its Hugging Face source tensor, the shape jaxmap keeps it in, and its logical axes.

    ``transpose`` says the Hugging Face tensor is ``[out, in]`` and jaxmap keeps ``[in, out]``.
    """

    hf_name: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    transpose: bool = False

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.transpose else self.shape


def layer_param_specs(config: ModelConfig, layer: int) -> dict[str, ParamSpec]:
    """The parameters of decoder layer ``layer``, keyed by jaxmap's short names.

    The ``heads`` / ``kv_heads`` axes of the projections are heads-major with ``head_dim`` folded in (``q_size =
    heads * head_dim``), so splitting them into equal parts splits on head boundaries.
    """
    d, f, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    pre = f"model.layers.{layer}."
    specs = {
        "attn_norm": ParamSpec(pre + "input_layernorm.weight", (d,), ("embed",)),
        "wq": ParamSpec(pre + "self_attn.q_proj.weight", (d, q), ("embed", "heads"), True),
        "wk": ParamSpec(pre + "self_attn.k_proj.weight", (d, kv), ("embed", "kv_heads"), True),
        "wv": ParamSpec(pre + "self_attn.v_proj.weight", (d, kv), ("embed", "kv_heads"), True),
        "wo": ParamSpec(pre + "self_attn.o_proj.weight", (q, d), ("heads", "embed"), True),
        "mlp_norm": ParamSpec(pre + "post_attention_layernorm.weight", (d,), ("embed",)),
        "w_gate": ParamSpec(pre + "mlp.gate_proj.weight", (d, f), ("embed", "mlp"), True),
        "w_up": ParamSpec(pre + "mlp.up_proj.weight", (d, f), ("embed", "mlp"), True),
        "w_down": ParamSpec(pre + "mlp.down_proj.weight", (f, d), ("mlp", "embed"), True),
    }
    if config.attention_bias:
        specs["bq"] = ParamSpec(pre + "self_attn.q_proj.bias", (q,), ("heads",))
        specs["bk"] = ParamSpec(pre + "self_attn.k_proj.bias", (kv,), ("kv_heads",))
        specs["bv"] = ParamSpec(pre + "self_attn.v_proj.bias", (kv,), ("kv_heads",))
    return specs


def outer_param_specs(config: ModelConfig) -> dict[str, ParamSpec]:
    """The parameters outside the decoder layers: embeddings, final norm, LM head (absent when tied)."""
    v, d = config.vocab_size, config.hidden_size
    specs = {
        "embed_tokens": ParamSpec("model.embed_tokens.weight", (v, d), ("vocab", "embed")),
        "final_norm": ParamSpec("model.norm.weight", (d,), ("embed",)),
    }
    if not config.tie_word_embeddings:
        specs["lm_head"] = ParamSpec("lm_head.weight", (d, v), ("embed", "vocab"), True)
    return specs
