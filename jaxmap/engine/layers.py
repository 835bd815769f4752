"""The generic decoder: embedding, one decoder layer composed from shared blocks (:mod:`jaxmap.engine.blocks`) as a
family's :class:`~jaxmap.families.LayerDesign` says, final norm and LM head. Pure functions over a parameter tree.

Families declare their tensors and layer design as data (:mod:`jaxmap.families`); this is the one place their forward
computation lives, so a family that needs a new block adds it here once, for every family. Model code never names a
device or a mesh axis.

Why pure functions rather than flax modules: the engine calls one layer's function over per-layer parameter dicts
(unrolled inside one jit, or as one jitted function reused per layer), streams offloaded layers and stacks nothing;
all of that is plain pytree plumbing, and a module tree would have to be split and merged at each boundary.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxmap.config import ModelConfig
from jaxmap.engine.blocks import attention, rms_norm, swiglu
from jaxmap.engine.rope import apply_rope
from jaxmap.families import LayerDesign
from jaxmap.quant import dense, dense_rows, take_rows

__all__ = ["decoder_layer", "embed", "lm_head", "rms_norm"]


def embed(params: dict, tokens: jnp.ndarray, dtype: jnp.dtype) -> jnp.ndarray:
    return take_rows(params["embed_tokens"], tokens, dtype)


def lm_head(params: dict, x: jnp.ndarray, config: ModelConfig) -> jnp.ndarray:
    """Final norm and vocabulary projection; logits in float32."""
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    if config.tie_word_embeddings:
        logits = dense_rows(x, params["embed_tokens"])
    else:
        logits = dense(x, params["lm_head"])
    return logits.astype(jnp.float32)


def decoder_layer(
    p: dict,
    x: jnp.ndarray,
    k_cache: jnp.ndarray,
    v_cache: jnp.ndarray,
    start: jnp.ndarray,
    cos: jnp.ndarray,
    sin: jnp.ndarray,
    mask: jnp.ndarray,
    attend_len: int,
    config: ModelConfig,
    design: LayerDesign,
    taps: dict | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """One pre-norm decoder layer over ``T`` new tokens written at cache slot ``start``.

    x: [B, T, D]; caches: [B, kv_heads, S, head_dim]; cos/sin: [B, T, head_dim]; mask: [B, T, attend_len]
    (see :func:`jaxmap.engine.blocks.attention`). ``design`` picks the blocks: q/k/v biases, per-head query/key
    RMSNorm before RoPE. ``taps``: a dict that receives each projection's input activation, keyed as in the family's
    ``projection_inputs`` (for importance matrices; None in serving).
    """
    b, t, _ = x.shape
    g, k_dim = config.num_key_value_heads, config.head_dim
    eps = config.rms_norm_eps

    h = rms_norm(x, p["attn_norm"], eps)
    taps = {} if taps is None else taps
    taps["attn_in"] = h
    q, k, v = dense(h, p["wq"]), dense(h, p["wk"]), dense(h, p["wv"])
    if design.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q = q.reshape(b, t, config.num_attention_heads, k_dim)
    k = k.reshape(b, t, g, k_dim)
    v = v.reshape(b, t, g, k_dim)
    if design.qk_norm:
        q, k = rms_norm(q, p["q_norm"], eps), rms_norm(k, p["k_norm"], eps)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    attn, k_cache, v_cache = attention(q, k, v, k_cache, v_cache, start, mask, attend_len)
    taps["attn_out"] = attn
    x = x + dense(attn, p["wo"])

    h = rms_norm(x, p["mlp_norm"], eps)
    taps["mlp_in"] = h
    x = x + swiglu(p, h, taps)
    return x, k_cache, v_cache
