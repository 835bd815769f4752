"""Shared building blocks that families' decoder layers compose (:mod:`jaxmap.engine.layers`): RMSNorm, grouped-query
attention over the KV cache (decode and chunked prefill), and the SwiGLU MLP. Pure functions over arrays; no mesh
axis or device is named here (the rules table places the weights, XLA inserts the collectives)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmap.planning.memory import prefill_query_chunk
from jaxmap.quant import dense


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    """RMSNorm over the last axis, computed in float32 and cast back before the weight, as Hugging Face does."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def swiglu(p: dict, h: jnp.ndarray, taps: dict) -> jnp.ndarray:
    """``down(silu(gate(h)) * up(h))``; records the down projection's input in ``taps``."""
    act = jax.nn.silu(dense(h, p["w_gate"])) * dense(h, p["w_up"])
    taps["mlp_act"] = act
    return dense(act, p["w_down"])


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, k_cache: jnp.ndarray, v_cache: jnp.ndarray,
              start: jnp.ndarray, mask: jnp.ndarray, attend_len: int):
    """Causal grouped-query attention of ``T`` new queries, with the new keys/values written at cache slot ``start``.

    q: [B, T, kv_heads * rep, head_dim] and k, v: [B, T, kv_heads, head_dim], RoPE applied; caches: [B, kv_heads, S,
    head_dim]; mask: [B, T, attend_len] (True where a query may see a key). Decode (T == 1) reads only the first
    ``attend_len`` cache slots (a static length bucket), which is most of the decode step's saving on short
    sequences. Prefill (T > 1) starts from an empty cache at slot 0 with ``attend_len == T``. Returns the attention
    output [B, T, heads * head_dim] and the updated caches.
    """
    b, t, heads, k_dim = q.shape
    g = k.shape[2]
    rep = heads // g
    q = q.reshape(b, t, g, rep, k_dim)
    scale = k_dim**-0.5
    neg = jnp.finfo(jnp.float32).min
    if t == 1:
        # Decode: attend to the cache as it was (slots before ``start``) plus the new key, and write the new
        # key/value only as outputs. Reading the updated cache made XLA fuse the update into the read and copy
        # the whole donated cache every step (decode 2.8x slower with 4096 slots than 512 on XLA:CPU).
        # Multiply-and-reduce and a batched einsum measured alike once the read below is ordered (30 layers, one
        # core: batch 8 7.4 vs 7.0 ms, batch 1 1.0 vs 0.7 ms; /work/scratch/attn_dyn.py); kept as it was.
        q1 = q[:, 0]  # [b, g, r, k]
        # Read the bucket at a start index that depends on this layer's query (always 0: ``0 * q`` is not folded
        # away for floats). A static slice depends on nothing, so XLA:CPU's executor copies every layer's bucket
        # out of the cache at the start of the step, and at batch 8 those copies (47 MB at 128 slots) spill the
        # caches: attention took 31 ms of 30 layers on one core, against 7 ms read this way, in order.
        at = (q1[0, 0, 0, 0] * 0).astype(jnp.int32)
        keys = jax.lax.dynamic_slice_in_dim(k_cache, at, attend_len, axis=2).astype(q.dtype)
        values = jax.lax.dynamic_slice_in_dim(v_cache, at, attend_len, axis=2).astype(q.dtype)
        old = jnp.sum(q1[:, :, :, None, :] * keys[:, :, None, :, :], axis=-1).astype(jnp.float32) * scale
        old_mask = mask[:, 0] & (jnp.arange(attend_len) < start)[None, :]  # [b, L]
        old = jnp.where(old_mask[:, None, None, :], old, neg)
        new = jnp.sum(q1 * k[:, 0, :, None, :], axis=-1).astype(jnp.float32)[..., None] * scale  # [b, g, r, 1]
        probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1).astype(values.dtype)
        attn = (jnp.sum(probs[..., :-1, None] * values[:, :, None, :, :], axis=-2)
                + probs[..., -1:] * v[:, 0, :, None, :])[:, None]  # [b, 1, g, r, k]
    else:
        # Prefill from an empty cache (start is 0 and attend_len == t): the keys are exactly the new ones.
        def block(qb, mb):  # queries [b, c, g, r, k] against every key; mask [b, c, t]
            scores = jnp.einsum("btgrk,blgk->bgrtl", qb, k).astype(jnp.float32) * scale
            scores = jnp.where(mb[:, None, None, :, :t], scores, neg)
            probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
            return jnp.einsum("bgrtl,blgk->btgrk", probs, v)

        chunk = prefill_query_chunk(t)
        if chunk == t:
            attn = block(q, mask)
        else:
            # Long prompts: query blocks one after another (a loop XLA cannot run side by side), so the scores
            # held at once are [b, heads, chunk, t] rather than [b, heads, t, t] (8.6 GB for Llama-3-70B at 8192).
            n = -(-t // chunk)
            pad = n * chunk - t  # a ragged last block: padded queries, masked out, their rows dropped after
            qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
            qs = qs.reshape(b, n, chunk, g, rep, k_dim).swapaxes(0, 1)
            ms = jnp.pad(mask[:, :, :t], ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, t).swapaxes(0, 1)
            attn = jax.lax.map(lambda a: block(*a), (qs, ms)).swapaxes(0, 1).reshape(b, n * chunk, g, rep, k_dim)
            attn = attn[:, :t]
    attn = attn.reshape(b, t, g * rep * k_dim)
    # Make the in-place cache write depend on the reads above (``0 * attn`` is not folded away for floats), so
    # XLA orders the write after them instead of copying every donated cache buffer on every step; an
    # optimization_barrier did not survive XLA:CPU's passes (jax 0.10.2).
    after_reads = jnp.zeros((), k.dtype) * attn[0, 0, 0].astype(k.dtype)
    k, v = k + after_reads, v + after_reads
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype), (0, 0, start, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype), (0, 0, start, 0))
    return attn, k_cache, v_cache
