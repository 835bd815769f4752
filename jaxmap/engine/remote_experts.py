"""Layers whose routed experts live apart from them (issue 17; held by :mod:`jaxmap.materialize.experts_apart`).

Such a layer runs as separate programs, so the experts can be computed or fetched elsewhere between them:

1. ``apart_pre`` on the layer's devices: attention and its residual, the MLP norm and the router's top-k;
2. the experts, one of two ways per step:

   - **computed where they are held** (``cpu``: the CPU device, as llama.cpp's ``--cpu-moe``; ``device``: another
     accelerator): the normed hidden state and the routing go there (``apart_experts``, float32 activations, the
     stacks in their own type: bfloat16 or quantized blocks are never widened as a whole), the result comes back;
   - **streamed** (``host`` and ``disk`` always, ``cpu`` for steps of 32 tokens or more: llama.cpp's
     ``GGML_OP_OFFLOAD_MIN_BATCH``): while tokens x k < E only the routed experts' slices move to the layer's
     devices (gathered on the CPU device by ``apart_take``, or read from the file for ``disk``), else the whole
     stack; ``apart_mix`` then computes them there;

3. the residual add (``apart_post``, or inside ``apart_mix``).

The phase is picked per step from its real token count (``batch x tokens``), so a short prompt computes on the CPU
like a decode step. The programs go through :meth:`jaxmap.engine.engine.Engine._call` (first-call timing, float32
matmul precision). Disk experts need their routing on the host (one small device-to-host read per layer per step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmap.engine import layers
from jaxmap.engine.blocks import rms_norm
from jaxmap.engine.moe import PATHS, choose_path, route
from jaxmap.engine.moe_activation import BIAS_KEYS, down_bias, expert_activation, router_logits
from jaxmap.planning.experts import OFFLOAD_MIN_BATCH
from jaxmap.quant import dense
from jaxmap.quant.kernels import dequantize
from jaxmap.quant.qtensor import QTensor

STACKS = ("experts_gate", "experts_up", "experts_down")
PARTS = ("apart_pre", "apart_experts", "apart_take", "apart_mix", "apart_post")


def how(apart, n_tokens: int, config) -> str:
    """``apart`` (computed where held), ``slices`` (the routed experts moved in) or ``stack`` (all of them)."""
    if apart.computed_apart and (apart.kind == "device" or n_tokens < OFFLOAD_MIN_BATCH):
        return "apart"
    return "slices" if n_tokens * config.num_experts_per_tok < config.num_experts else "stack"


def _float_stack(w, dtype):
    if not isinstance(w, QTensor):
        return w
    return jnp.swapaxes(jax.vmap(lambda q: dequantize(q, dtype))(w), 1, 2)


def _mix(x, weights, idx, stacks, config, path: str | None = None, design=None):
    """The routed experts' weighted sum for x [N, D] (moe_mlp's computation past the router), with the experts'
    biases and activation where the family has them (gpt-oss: they travel with the stacks)."""
    fn = PATHS[path or choose_path(x.shape[0], config)]
    wg, wu, wd = (stacks[k] for k in STACKS)
    if fn is not PATHS["gather"]:
        wg, wu, wd = (_float_stack(w, x.dtype) for w in (wg, wu, wd))
    biases = {k: stacks[k] for k in BIAS_KEYS if k in stacks}
    out = fn(x, weights, idx, wg, wu, wd, expert_activation(design, biases))
    extra = down_bias(biases, weights, idx)
    return out if extra is None else out + extra.astype(out.dtype)


def build(part: str, shape, config, design, history: int):
    """The jitted program ``part`` (one of :data:`PARTS`) for one step shape."""
    eps, plus_one = config.rms_norm_eps, design.norm_plus_one if design is not None else False

    def finish(x, out, p):
        out = out.astype(x.dtype).reshape(x.shape)
        if design.post_norms:
            out = rms_norm(out, p["mlp_post_norm"], eps, plus_one)
        return x + out

    if part == "apart_pre":
        def pre(p, x, k_cache, v_cache, start, ctx):
            x, k_cache, v_cache = layers.attention_half(p, x, k_cache, v_cache, start, ctx, shape.attend_len,
                                                        config, design, history=history)
            h = rms_norm(x, p["mlp_norm"], eps, plus_one).reshape(-1, x.shape[-1])
            weights, idx = route(router_logits(p, dense(h, p["router"])), config.num_experts_per_tok,
                                 config.norm_topk_prob)
            return x, h, weights, idx, k_cache, v_cache

        return jax.jit(pre, donate_argnames=("k_cache", "v_cache"))
    if part == "apart_experts":  # on the device holding the experts; activations in float32
        def experts(h, weights, idx, stacks):
            return _mix(h.astype(jnp.float32), weights, idx, stacks, config, design=design)

        return jax.jit(experts)
    if part == "apart_take":  # the routed experts' slices of each stack, on the device holding them
        def take(idx, stacks):
            flat = idx.reshape(-1)
            return {k: jax.tree.map(lambda a: a[flat], w) for k, w in stacks.items()}

        return jax.jit(take)
    if part == "apart_mix":  # on the layer's devices, over moved-in slices (or the whole stack)
        def mix(p, x, h, weights, idx, stacks, sliced):
            if sliced:  # stacks hold the N*k routed experts in order: pair (n, j) is expert n*k + j
                idx = jnp.arange(idx.size, dtype=idx.dtype).reshape(idx.shape)
                out = _mix(h, weights, idx, stacks, config, "gather", design)
            else:
                out = _mix(h, weights, idx, stacks, config, design=design)
            return finish(x, out, p)

        return jax.jit(mix, static_argnames=("sliced",))
    if part == "apart_post":
        return jax.jit(finish)
    raise ValueError(part)


def run_layer(engine, i: int, stage, shape, apart, p, x, k_cache, v_cache, start, ctx, design):
    """One layer with its routed experts apart; returns (x, k_cache, v_cache) on the layer's devices."""
    config = engine.config
    call = engine._call
    x, h, weights, idx, k_cache, v_cache = call(i, shape, "apart_pre", p, x, k_cache, v_cache, start, ctx,
                                                design=design)
    way = how(apart, h.shape[0], config)
    home = stage.activation_sharding
    if way == "apart":
        there = jax.device_put((h, weights, idx), apart.device)
        out = call(i, shape, "apart_experts", *there, apart.stacks, design=design)
        return call(i, shape, "apart_post", x, jax.device_put(out, home), p, design=design), k_cache, v_cache
    if apart.kind == "disk":
        ids = None if way == "stack" else [int(e) for e in np.asarray(idx).reshape(-1)]
        stacks = jax.device_put(apart.read(ids), home)
    elif way == "slices":
        stacks = jax.device_put(call(i, shape, "apart_take", jax.device_put(idx, apart.device), apart.stacks,
                                     design=design), home)
    else:
        stacks = jax.device_put(apart.stacks, home)
    out = call(i, shape, "apart_mix", p, x, h, weights, idx, stacks, way == "slices", design=design)
    return out, k_cache, v_cache


def moved_bytes(apart, n_tokens: int, config, hidden_itemsize: int) -> int:
    """What one step of ``n_tokens`` tokens moves for this layer (the engine's choice; the plan estimates the same
    with :func:`jaxmap.planning.experts.moved_bytes`)."""
    way = how(apart, n_tokens, config)
    if way == "apart":
        return 2 * n_tokens * config.hidden_size * hidden_itemsize
    stack = (sum(int(leaf.nbytes) for w in apart.stacks.values() for leaf in jax.tree.leaves(w))
             if apart.stacks is not None else apart.placement.bytes)
    if way == "slices":
        return stack * n_tokens * config.num_experts_per_tok // config.num_experts
    return stack
