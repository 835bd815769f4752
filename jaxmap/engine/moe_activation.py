"""What a MoE family's experts do around their three projections, beyond Mixtral's plain SwiGLU: biases on the
router and on each expert's gate, up and down projections, and gpt-oss's clamped SwiGLU.

Kept apart from :mod:`jaxmap.engine.moe` (which decides how the routed products are computed: gather, dense or
grouped) so that each path calls one ``act(g, u, ids)`` and the MoE layer adds one down-projection bias term; a
family without biases gets exactly the SwiGLU it had.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from jaxmap.families import LayerDesign

# jaxmap's keys of the expert biases ([E, I] for gate and up, [E, D] for down) and the router's ([E])
BIAS_KEYS = ("experts_gate_bias", "experts_up_bias", "experts_down_bias")
ROUTER_BIAS = "router_bias"

Activation = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def swiglu(g: jnp.ndarray, u: jnp.ndarray, ids: jnp.ndarray | None = None) -> jnp.ndarray:
    return jax.nn.silu(g) * u


def clamped_swiglu(g: jnp.ndarray, u: jnp.ndarray, alpha: float, limit: float) -> jnp.ndarray:
    """gpt-oss: the gate clamped above at ``limit``, up to [-limit, limit], ``(up + 1) * g * sigmoid(alpha g)``."""
    g = jnp.minimum(g, jnp.asarray(limit, g.dtype))
    u = jnp.clip(u, -limit, limit).astype(u.dtype)
    return (u + 1) * (g * jax.nn.sigmoid(g * jnp.asarray(alpha, g.dtype)))


def expert_activation(design: LayerDesign | None, biases: Mapping[str, jnp.ndarray]) -> Activation:
    """``act(g, u, ids)``: the experts' activation of gate and up outputs ``[..., I]``, where ``ids`` (broadcasting
    against ``g``'s leading axes) says which expert each row went through, so that the gate and up biases
    (``biases``, by key, already in device memory) are that expert's."""
    bg, bu = biases.get("experts_gate_bias"), biases.get("experts_up_bias")
    clamped = design is not None and design.moe_act == "clamped_swiglu"

    def act(g: jnp.ndarray, u: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
        if bg is not None:
            g = g + bg[ids].astype(g.dtype)
        if bu is not None:
            u = u + bu[ids].astype(u.dtype)
        if clamped:
            return clamped_swiglu(g, u, design.swiglu_alpha, design.swiglu_limit)
        return swiglu(g, u)

    return act


def down_bias(biases: Mapping[str, jnp.ndarray], weights: jnp.ndarray, idx: jnp.ndarray) -> jnp.ndarray | None:
    """The routed experts' down-projection biases weighted as their outputs are ([N, D] float32), or None: the
    bias is added to each expert's output before the weighted sum, which equals adding this after it."""
    bd = biases.get("experts_down_bias")
    if bd is None:
        return None
    return jnp.einsum("nk,nkd->nd", weights, bd[idx].astype(jnp.float32))


def router_logits(p: Mapping[str, jnp.ndarray], logits: jnp.ndarray) -> jnp.ndarray:
    """The router's logits with its bias where the family has one (gpt-oss)."""
    return logits if ROUTER_BIAS not in p else logits + p[ROUTER_BIAS].astype(logits.dtype)
