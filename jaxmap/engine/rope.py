"""Rotary position embeddings applied inside the jitted step (rotate-half layout, as Hugging Face's llama).

The inverse frequencies are plain numpy (:mod:`jaxmap.families.rope`), computed once per config; cos/sin are computed
inside the jitted step from the positions, which costs a few hundred flops per token and keeps no table on any device.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rope_cos_sin(positions: jnp.ndarray, inv_freq: np.ndarray, scale: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin of shape positions.shape + [rotary_dim], float32, in the rotate-half layout, multiplied by
    ``scale`` (LongRoPE's attention factor; 1 otherwise)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    if scale == 1.0:
        return jnp.cos(angles), jnp.sin(angles)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x`` [..., heads, head_dim]; cos/sin broadcast over the heads axis. When cos/sin cover fewer dims than
    a head (a partial rotary factor), the first ones are rotated (rotate-half over those dims, as Hugging Face) and
    the rest pass through."""
    rot = cos.shape[-1]
    x_rot, x_pass = (x, None) if rot == x.shape[-1] else (x[..., :rot], x[..., rot:])
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos = cos[..., None, :].astype(x.dtype)
    sin = sin[..., None, :].astype(x.dtype)
    out = x_rot * cos + rotated * sin
    return out if x_pass is None else jnp.concatenate([out, x_pass], axis=-1)
