"""The llama family (Llama 2/3, Mistral, Qwen2, SmolLM2) as pure functions over a parameter tree.

The parameters and their logical axes are declared in :mod:`jaxmap.param_specs` (pure data, re-exported here);
model code never names a device or a mesh axis.

Why pure functions rather than flax modules: the engine calls one layer's function over per-layer parameter dicts
(unrolled inside one jit, or as one jitted function reused per layer), streams offloaded layers and stacks nothing;
all of that is plain pytree plumbing, and a module tree would have to be split and merged at each boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmap.config import ModelConfig
from jaxmap.param_specs import LOGICAL_AXES, ParamSpec, layer_param_specs, outer_param_specs
from jaxmap.rope import apply_rope

__all__ = ["LOGICAL_AXES", "ParamSpec", "layer_param_specs", "outer_param_specs", "decoder_layer", "embed",
           "lm_head", "rms_norm"]

# ---- the computation ------------------------------------------------------------------------------------------------

def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    """RMSNorm computed in float32 and cast back before the weight, as Hugging Face's llama does."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def embed(params: dict, tokens: jnp.ndarray, dtype: jnp.dtype) -> jnp.ndarray:
    return jnp.take(params["embed_tokens"], tokens, axis=0).astype(dtype)


def lm_head(params: dict, x: jnp.ndarray, config: ModelConfig) -> jnp.ndarray:
    """Final norm and vocabulary projection; logits in float32."""
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    if config.tie_word_embeddings:
        logits = jnp.einsum("...d,vd->...v", x, params["embed_tokens"].astype(x.dtype))
    else:
        logits = x @ params["lm_head"]
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
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """One decoder layer over ``T`` new tokens written at cache slot ``start``.

    x: [B, T, D]; caches: [B, kv_heads, S, head_dim]; cos/sin: [B, T, head_dim]; mask: [B, T, attend_len] (True
    where a query may see a key). Attention reads only the first ``attend_len`` cache slots (a static length
    bucket), which is most of the decode step's saving on short sequences.
    """
    b, t, _ = x.shape
    g, k_dim = config.num_key_value_heads, config.head_dim
    rep = config.num_attention_heads // g
    eps = config.rms_norm_eps

    h = rms_norm(x, p["attn_norm"], eps)
    q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
    if "bq" in p:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q = q.reshape(b, t, g * rep, k_dim)
    k = k.reshape(b, t, g, k_dim)
    v = v.reshape(b, t, g, k_dim)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)

    k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype), (0, 0, start, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype), (0, 0, start, 0))
    keys = k_cache[:, :, :attend_len].astype(q.dtype)
    values = v_cache[:, :, :attend_len].astype(q.dtype)

    q = q.reshape(b, t, g, rep, k_dim)
    if t == 1:
        # Decode: multiply-and-reduce instead of a batched dot. XLA:CPU runs the dot as batch*kv_heads tiny GEMMs;
        # the fused elementwise form was ~4x faster for SmolLM2 at batch 8 (and no slower at batch 1).
        scores = jnp.sum(q[:, 0, :, :, None, :] * keys[:, :, None, :, :], axis=-1)[:, :, :, None, :]
    else:
        scores = jnp.einsum("btgrk,bglk->bgrtl", q, keys)
    scores = scores.astype(jnp.float32) * (k_dim**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    if t == 1:
        attn = jnp.sum(probs[:, :, :, 0, :, None] * values[:, :, None, :, :], axis=-2)[:, None]
    else:
        attn = jnp.einsum("bgrtl,bglk->btgrk", probs, values)
    attn = attn.reshape(b, t, g * rep * k_dim)
    x = x + attn @ p["wo"]

    h = rms_norm(x, p["mlp_norm"], eps)
    x = x + (jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]
    return x, k_cache, v_cache
