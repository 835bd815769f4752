"""Shared building blocks that families' decoder layers compose (:mod:`jaxmap.engine.layers`): RMSNorm (plain or
Gemma's ``1 + weight``), grouped-query attention over the KV cache (decode and chunked prefill; full or sliding-window
over a ring buffer; score scale and soft-capping), and the gated MLP (SwiGLU or GeGLU). Pure functions over arrays;
no mesh axis or device is named here (the rules table places the weights, XLA inserts the collectives)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmap.planning.memory import prefill_query_block
from jaxmap.quant import dense
from jaxmap.quant import native as native_kernels


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float, plus_one: bool = False) -> jnp.ndarray:
    """RMSNorm over the last axis, computed in float32. As Hugging Face does: llama-style casts back before the
    weight; ``plus_one`` (Gemma) scales by ``1 + weight`` in float32 and casts after."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (xf * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * xf.astype(x.dtype)


_GATE_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda a: jax.nn.gelu(a, approximate=True)}


def gated_mlp(p: dict, h: jnp.ndarray, taps: dict, activation: str = "silu") -> jnp.ndarray:
    """``down(act(gate(h)) * up(h))``: SwiGLU with silu, GeGLU with tanh-approximated gelu; records the down
    projection's input in ``taps``."""
    act = _GATE_ACTIVATIONS[activation](dense(h, p["w_gate"])) * dense(h, p["w_up"])
    taps["mlp_act"] = act
    return dense(act, p["w_down"])


def swiglu(p: dict, h: jnp.ndarray, taps: dict) -> jnp.ndarray:
    return gated_mlp(p, h, taps, "silu")


def _cap(scores: jnp.ndarray, softcap: float | None) -> jnp.ndarray:
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def _softmax(scores: jnp.ndarray, sinks: jnp.ndarray | None) -> jnp.ndarray:
    """Softmax over the last axis of float32 scores [b, g, r, ...]; with ``sinks`` [g, r] (gpt-oss), one more logit
    per head joins the denominator and its probability is dropped (it attends to nothing)."""
    if sinks is None:
        return jax.nn.softmax(scores, axis=-1)
    sink = sinks.astype(jnp.float32).reshape((1, *sinks.shape) + (1,) * (scores.ndim - 3))
    top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
    e = jnp.exp(scores - top)
    return e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - top))


def ring_positions(start: jnp.ndarray, slots: int) -> jnp.ndarray:
    """The absolute cache slot each of a ring buffer's ``slots`` positions holds before slot ``start`` is written:
    the latest ``j < start`` with ``j % slots == r`` (negative where position ``r`` holds nothing yet)."""
    r = jnp.arange(slots, dtype=jnp.int32)
    return r + slots * jnp.floor_divide(start - 1 - r, slots)


def _prefill_attention(q, k, v, k_cache, v_cache, start, pad, history: int, scale: float, softcap: float | None,
                       window: int | None, sinks: jnp.ndarray | None = None) -> jnp.ndarray:
    """``T`` queries of a prefill chunk against the cache slots earlier chunks wrote and the chunk's own keys.

    q: [B, T, kv_heads, rep, head_dim]; k, v: [B, T, kv_heads, head_dim]. Keys are labelled with the slot they
    hold: a query sees a key at or before its own slot, not in its row's left padding and, for a sliding layer,
    less than ``window`` slots back. A sliding layer's ring holds at most ``window`` earlier keys, so a chunk of C
    queries sees at most window + C keys (one more than the window + C - 1 its first and last queries need)."""
    b, t, g, rep, k_dim = q.shape
    q_slots = start + jnp.arange(t, dtype=jnp.int32)
    keys, values, key_slots = k, v, q_slots
    if history:
        ring = k_cache.shape[2] if window is not None else None
        read = history if ring is None else min(history, ring)
        held = jnp.arange(read, dtype=jnp.int32) if ring is None else ring_positions(start, ring)[:read]
        held = jnp.where((held >= 0) & (held < start), held, jnp.iinfo(jnp.int32).max)  # empty: seen by nothing
        old_k = k_cache[:, :, :read].transpose(0, 2, 1, 3).astype(k.dtype)
        old_v = v_cache[:, :, :read].transpose(0, 2, 1, 3).astype(v.dtype)
        keys, values = jnp.concatenate([old_k, k], axis=1), jnp.concatenate([old_v, v], axis=1)
        key_slots = jnp.concatenate([held, q_slots])
    mask = (key_slots[None, None, :] <= q_slots[None, :, None]) & (key_slots[None, None, :] >= pad[:, None, None])
    if window is not None:
        mask = mask & (q_slots[None, :, None] - key_slots[None, None, :] < window)
    n_keys = keys.shape[1]
    neg = jnp.finfo(jnp.float32).min

    def block(qb, mb):  # queries [b, c, g, r, k] against every key; mask [b, c, n_keys]
        scores = jnp.einsum("btgrk,blgk->bgrtl", qb, keys).astype(jnp.float32) * scale
        scores = jnp.where(mb[:, None, None, :, :], _cap(scores, softcap), neg)
        probs = _softmax(scores, sinks).astype(values.dtype)
        return jnp.einsum("bgrtl,blgk->btgrk", probs, values)

    chunk = prefill_query_block(t, n_keys, b * g * rep)
    if chunk == t:
        return block(q, mask)
    # Long chunks: query blocks one after another (a loop XLA cannot run side by side), so the scores held at once
    # are [b, heads, block, keys] rather than [b, heads, t, keys] (8.6 GB for Llama-3-70B at 8192).
    n = -(-t // chunk)
    pad_q = n * chunk - t  # a ragged last block: padded queries, masked out, their rows dropped after
    qs = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0), (0, 0)))
    qs = qs.reshape(b, n, chunk, g, rep, k_dim).swapaxes(0, 1)
    ms = jnp.pad(mask, ((0, 0), (0, pad_q), (0, 0))).reshape(b, n, chunk, n_keys).swapaxes(0, 1)
    out = jax.lax.map(lambda a: block(*a), (qs, ms)).swapaxes(0, 1).reshape(b, n * chunk, g, rep, k_dim)
    return out[:, :t]


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, k_cache: jnp.ndarray, v_cache: jnp.ndarray,
              start: jnp.ndarray, mask: jnp.ndarray, attend_len: int, *, pad: jnp.ndarray | None = None,
              end: jnp.ndarray | None = None, scale: float | None = None, softcap: float | None = None,
              window: int | None = None, history: int = 0, sinks: jnp.ndarray | None = None,
              layer: jnp.ndarray | None = None, native: bool = False):
    """Causal grouped-query attention of ``T`` new queries, with the new keys/values written at cache slot ``start``.

    q: [B, T, kv_heads * rep, head_dim] and k, v: [B, T, kv_heads, head_dim], RoPE applied; caches: [B, kv_heads, S,
    head_dim]; mask: [B, T, attend_len] (True where a query may see a key). Decode (T == 1) reads only the first
    ``attend_len`` cache slots (a static length bucket), which is most of the decode step's saving on short
    sequences. Prefill (T > 1, a chunk of the prompt at slots ``start .. start + T - 1``) attends to the first
    ``history`` cache slots (what earlier chunks wrote; 0 for the first chunk, which starts at slot 0) and to its
    own keys. Returns the attention output [B, T, heads * head_dim] and the updated caches.

    ``scale`` replaces ``head_dim ** -0.5``; ``softcap`` caps scores at ``cap * tanh(s / cap)``. ``window``: each
    query sees itself and the ``window - 1`` keys before it, and the cache is a ring buffer of ``S`` slots (slot
    ``j`` at position ``j % S``; ``S`` is ``min(window, max_seq_len)``), so decode reads ``min(attend_len, S)``
    positions; ``pad`` (each row's left padding) and ``end`` (the prefill's last real slot + 1: the ring keeps the
    ``S`` keys before it, not the bucket's padding after it) are needed then. ``sinks`` [heads]: gpt-oss's learned
    per-head logit in each softmax's denominator.

    ``layer``: the caches are a stack ``[L, B, kv_heads, S, head_dim]`` of alike layers (a scan over layers,
    :mod:`jaxmap.engine.scan_stage`) and this layer is entry ``layer``: reads and writes address that entry in place,
    so the scan's cache carry is never copied per layer (slicing the layer out and writing it back would copy it).
    """
    b, t, heads, k_dim = q.shape
    g = k.shape[2]
    rep = heads // g
    q = q.reshape(b, t, g, rep, k_dim)
    scale = k_dim**-0.5 if scale is None else scale
    ring = k_cache.shape[-2] if window is not None else None
    sinks = None if sinks is None else sinks.reshape(g, rep)
    if t == 1:
        # Decode: attend to the cache as it was (slots before ``start``) plus the new key, and write the new
        # key/value only as outputs. Reading the updated cache made XLA fuse the update into the read and copy
        # the whole donated cache every step (decode 2.8x slower with 4096 slots than 512 on XLA:CPU).
        # Multiply-and-reduce and a batched einsum measured alike once the read below is ordered (30 layers, one
        # core: batch 8 7.4 vs 7.0 ms, batch 1 1.0 vs 0.7 ms; /work/scratch/attn_dyn.py); kept as it was.
        q1 = q[:, 0]  # [b, g, r, k]
        read = attend_len if ring is None else min(attend_len, ring)
        row_start = jnp.reshape(start, (-1, 1))  # [1, 1], or [b, 1] when each row decodes at its own slot
        if ring is None:
            old_mask = mask[:, 0] & (jnp.arange(attend_len)[None, :] < row_start)  # [b, L]
        else:  # what each ring position holds: a slot of this generation, not padding, inside the window
            held = ring_positions(row_start, ring)[:, :read]
            old_mask = (held >= 0) & (held >= pad[:, None]) & (row_start - held < window)
        if native and native_kernels.attention_supported(k_cache):
            attn = native_kernels.decode_attention(q1, k_cache, v_cache, layer, jnp.broadcast_to(old_mask, (b, read)),
                                                   k[:, 0], v[:, 0], sinks, scale, softcap)[:, None]
        else:
            attn = _decode_attention(q1, k[:, 0], v[:, 0], k_cache, v_cache, layer, old_mask, read, scale, softcap,
                                     sinks)[:, None]  # [b, 1, g, r, k]
    else:
        pad = jnp.zeros(b, jnp.int32) if pad is None else pad
        attn = _prefill_attention(q, k, v, _of_layer(k_cache, layer), _of_layer(v_cache, layer), start, pad, history,
                                  scale, softcap, window, sinks)
    attn = attn.reshape(b, t, g * rep * k_dim)
    # Make the in-place cache write depend on the reads above (``0 * attn`` is not folded away for floats), so
    # XLA orders the write after them instead of copying every donated cache buffer on every step; an
    # optimization_barrier did not survive XLA:CPU's passes (jax 0.10.2).
    after_reads = jnp.zeros((), k.dtype) * attn[0, 0, 0].astype(k.dtype)
    k, v = k + after_reads, v + after_reads
    if ring is not None and t > 1:
        # A prefill chunk into a ring: each slot keeps the latest position before ``end`` with its residue, from
        # this chunk where that position is in it, else as the ring held it (the chunk's padding is never kept).
        end = jnp.asarray(start + t if end is None else end, jnp.int32)
        held = ring_positions(end, ring)
        fresh = (held >= start)[None, None, :, None]
        pick = jnp.clip(held - start, 0, t - 1)
        def ring_write(cache, new):
            old = _of_layer(cache, layer)
            return _put_layer(cache, layer, jnp.where(
                fresh, jnp.take(new, pick, axis=1).transpose(0, 2, 1, 3).astype(cache.dtype), old))

        return attn, ring_write(k_cache, k), ring_write(v_cache, v)
    at = start if ring is None else jnp.remainder(start, ring)
    if jnp.ndim(at) == 1:  # decode with a slot per row (continuous batching): each row writes its own slot
        return attn, _write_rows(k_cache, k, at, layer), _write_rows(v_cache, v, at, layer)
    return attn, _write_slots(k_cache, k, layer, at), _write_slots(v_cache, v, layer, at)


def _decode_attention(q1, k_new, v_new, k_cache, v_cache, layer, old_mask, read: int, scale: float,
                      softcap: float | None, sinks):
    """XLA's decode attention: queries q1 [b, g, r, k] against the first ``read`` cache slots where ``old_mask``
    [b, read] shows them, and the new key / value [b, g, k]."""
    neg = jnp.finfo(jnp.float32).min
    # Read the bucket at a start index that depends on this layer's query (always 0: ``0 * q`` is not folded
    # away for floats). A static slice depends on nothing, so XLA:CPU's executor copies every layer's bucket
    # out of the cache at the start of the step, and at batch 8 those copies (47 MB at 128 slots) spill the
    # caches: attention took 31 ms of 30 layers on one core, against 7 ms read this way, in order.
    at = (q1[0, 0, 0, 0] * 0).astype(jnp.int32)
    keys = _read_slots(k_cache, layer, at, read).astype(q1.dtype)
    values = _read_slots(v_cache, layer, at, read).astype(q1.dtype)
    old = jnp.sum(q1[:, :, :, None, :] * keys[:, :, None, :, :], axis=-1).astype(jnp.float32) * scale
    old = jnp.where(old_mask[:, None, None, :], _cap(old, softcap), neg)
    new = jnp.sum(q1 * k_new[:, :, None, :], axis=-1).astype(jnp.float32)[..., None] * scale  # [b, g, r, 1]
    probs = _softmax(jnp.concatenate([old, _cap(new, softcap)], axis=-1), sinks).astype(values.dtype)
    return (jnp.sum(probs[..., :-1, None] * values[:, :, None, :, :], axis=-2)
            + probs[..., -1:] * v_new[:, :, None, :])


def _of_layer(cache: jnp.ndarray, layer) -> jnp.ndarray:
    """One layer's cache [B, g, S, k]: ``cache`` itself, or entry ``layer`` of a stack (a copy: prefill only)."""
    return cache if layer is None else jax.lax.dynamic_index_in_dim(cache, layer, 0, keepdims=False)


def _put_layer(cache: jnp.ndarray, layer, value: jnp.ndarray) -> jnp.ndarray:
    if layer is None:
        return value
    return jax.lax.dynamic_update_index_in_dim(cache, value, layer, 0)


def _read_slots(cache: jnp.ndarray, layer, at, n: int) -> jnp.ndarray:
    """Slots ``at .. at + n - 1`` of one layer's cache [B, g, n, k], read from a stack when ``layer`` is set."""
    if layer is None:
        return jax.lax.dynamic_slice_in_dim(cache, at, n, axis=2)
    zero = jnp.zeros((), jnp.int32)
    _, b, g, _, k = cache.shape
    return jax.lax.dynamic_slice(cache, (layer, zero, zero, at, zero), (1, b, g, n, k))[0]


def _write_slots(cache: jnp.ndarray, new: jnp.ndarray, layer, at) -> jnp.ndarray:
    """New keys [B, T, g, k] written at slot ``at`` of one layer's cache (of entry ``layer`` of a stack), in place."""
    update = new.transpose(0, 2, 1, 3).astype(cache.dtype)
    zero = jnp.zeros((), jnp.int32)
    if layer is None:
        return jax.lax.dynamic_update_slice(cache, update, (zero, zero, at, zero))
    return jax.lax.dynamic_update_slice(cache, update[None], (layer, zero, zero, at, zero))


def _write_rows(cache: jnp.ndarray, new: jnp.ndarray, at: jnp.ndarray, layer=None) -> jnp.ndarray:
    """Write row ``b``'s new keys [B, 1, g, k] at its own slot ``at[b]`` of cache [B, g, S, k] (or of entry ``layer``
    of a stack [L, B, g, S, k])."""
    if layer is not None:  # a scatter into the stack, one slot per row
        rows = jnp.arange(cache.shape[1])
        return cache.at[layer, rows, :, at].set(new[:, 0].astype(cache.dtype))

    def one(c, n, a):
        return jax.lax.dynamic_update_slice(c, n.transpose(1, 0, 2).astype(c.dtype), (0, a, 0))

    return jax.vmap(one)(cache, new, at)
