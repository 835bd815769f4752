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
from jaxmap.engine.blocks import attention, gated_mlp, rms_norm
from jaxmap.engine.moe import moe_mlp
from jaxmap.engine.rope import apply_rope, rope_cos_sin
from jaxmap.families import LayerDesign, ModelDesign
from jaxmap.quant import dense, dense_rows, native, take_rows

__all__ = ["attention_context", "attention_half", "decoder_layer", "embed", "lm_head", "rms_norm"]


def attention_context(start, pad, n_tokens: int, attend_len: int, inv_freq, local_inv_freq=None, end=None,
                      rope_scale: float = 1.0) -> dict:
    """What every layer of a step shares, computed once per stage: RoPE cos/sin at each new token's position
    (``local_*`` with the sliding layers' own base, where the family has one), the causal mask over the first
    ``attend_len`` slots with each row's left padding ``pad`` masked, ``pad`` itself, and ``end`` (the prefill's
    last real slot + 1; sliding-window ring buffers keep the keys before it). ``rope_scale`` multiplies the global
    cos/sin (LongRoPE's attention factor)."""
    # ``start`` is one slot for the whole batch, or (decode) one per row [B]: slots is [1 or B, n_tokens]
    slots = jnp.reshape(start, (-1, 1)) + jnp.arange(n_tokens, dtype=jnp.int32)[None, :]
    positions = jnp.maximum(slots - pad[:, None], 0)
    cos, sin = rope_cos_sin(positions, inv_freq, rope_scale)
    keys = jnp.arange(attend_len, dtype=jnp.int32)
    mask = (keys[None, None, :] >= pad[:, None, None]) & (keys[None, None, :] <= slots[:, :, None])
    ctx = {"cos": cos, "sin": sin, "mask": mask, "pad": pad,
           "end": jnp.asarray(start + n_tokens if end is None else end, jnp.int32)}
    if local_inv_freq is not None:
        ctx["local_cos"], ctx["local_sin"] = rope_cos_sin(positions, local_inv_freq)
    return ctx


def embed(params: dict, tokens: jnp.ndarray, dtype: jnp.dtype, design: ModelDesign | None = None) -> jnp.ndarray:
    x = take_rows(params["embed_tokens"], tokens, dtype)
    if design is not None and design.embed_scale is not None:  # the scale rounded to the compute dtype, as HF's
        x = x * jnp.asarray(design.embed_scale, dtype)
    return x


def lm_head(params: dict, x: jnp.ndarray, config: ModelConfig, design: ModelDesign | None = None) -> jnp.ndarray:
    """Final norm and vocabulary projection; logits in float32 (soft-capped where the family caps them)."""
    design = design or ModelDesign()
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps, design.norm_plus_one)
    if config.tie_word_embeddings:
        logits = dense_rows(x, params["embed_tokens"])
    else:
        logits = dense(x, params["lm_head"])
    logits = logits.astype(jnp.float32)
    if design.final_softcap is not None:
        logits = design.final_softcap * jnp.tanh(logits / design.final_softcap)
    return logits


def attention_half(p: dict, x: jnp.ndarray, k_cache: jnp.ndarray, v_cache: jnp.ndarray, start: jnp.ndarray,
                   ctx: dict, attend_len: int, config: ModelConfig, design: LayerDesign, taps: dict | None = None,
                   history: int = 0, layer=None) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """The first half of :func:`decoder_layer`: attention and its residual (the MLP half follows). A layer whose
    routed experts live apart runs this half and its MLP in separate programs (:mod:`jaxmap.engine.remote_experts`)."""
    b, t, _ = x.shape
    g, k_dim = config.num_key_value_heads, config.head_dim
    eps, plus_one = config.rms_norm_eps, design.norm_plus_one

    h = rms_norm(x, p["attn_norm"], eps, plus_one)
    taps = {} if taps is None else taps
    taps["attn_in"] = h
    q, k, v = dense(h, p["wq"]), dense(h, p["wk"]), dense(h, p["wv"])
    if design.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q = q.reshape(b, t, config.num_attention_heads, k_dim)
    k = k.reshape(b, t, g, k_dim)
    v = v.reshape(b, t, g, k_dim)
    if design.qk_norm:
        q, k = rms_norm(q, p["q_norm"], eps, plus_one), rms_norm(k, p["k_norm"], eps, plus_one)
    cos, sin = (ctx["local_cos"], ctx["local_sin"]) if design.rope_local else (ctx["cos"], ctx["sin"])
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    attn, k_cache, v_cache = attention(q, k, v, k_cache, v_cache, start, ctx["mask"], attend_len, pad=ctx["pad"],
                                       end=ctx["end"], scale=design.attn_scale, softcap=design.attn_softcap,
                                       window=design.window, history=history,
                                       sinks=p["sinks"] if design.attn_sinks else None, layer=layer,
                                       native=native.runs_here(p["wq"]))
    taps["attn_out"] = attn
    out = dense(attn, p["wo"])
    if design.o_bias:
        out = out + p["bo"]
    if design.post_norms:
        out = rms_norm(out, p["attn_post_norm"], eps, plus_one)
    return x + out, k_cache, v_cache


def decoder_layer(
    p: dict,
    x: jnp.ndarray,
    k_cache: jnp.ndarray,
    v_cache: jnp.ndarray,
    start: jnp.ndarray,
    ctx: dict,
    attend_len: int,
    config: ModelConfig,
    design: LayerDesign,
    taps: dict | None = None,
    history: int = 0,
    layer=None,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """One decoder layer over ``T`` new tokens written at cache slot ``start``.

    x: [B, T, D]; caches: [B, kv_heads, S, head_dim] (a ring of S slots for a sliding layer); ``ctx`` from
    :func:`attention_context`. ``design`` picks the blocks: q/k/v biases, per-head query/key RMSNorm before RoPE,
    norms after attention and MLP (Gemma's sandwich), ``1 + weight`` norms, the MLP's activation, the score scale,
    soft-cap and window, and which RoPE base. ``taps``: a dict that receives each projection's input activation,
    keyed as in the family's ``projection_inputs`` (for importance matrices; None in serving). ``history``: in a
    prefill chunk after the first, how many cache slots earlier chunks wrote that it reads (a static bucket).
    ``layer``: the caches are a stack of alike layers' caches and this is entry ``layer`` (a scan over layers).
    """
    x, k_cache, v_cache = attention_half(p, x, k_cache, v_cache, start, ctx, attend_len, config, design, taps,
                                         history, layer)
    taps = {} if taps is None else taps
    eps, plus_one = config.rms_norm_eps, design.norm_plus_one
    h = rms_norm(x, p["mlp_norm"], eps, plus_one)
    taps["mlp_in"] = h
    out = moe_mlp(p, h, config, taps, design=design) if design.moe else gated_mlp(p, h, taps, design.mlp_act)
    if design.post_norms:
        out = rms_norm(out, p["mlp_post_norm"], eps, plus_one)
    return x + out, k_cache, v_cache
