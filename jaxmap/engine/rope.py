"""Rotary position embeddings applied inside the jitted step (rotate-half layout, as Hugging Face's llama).

The inverse frequencies are plain numpy (:mod:`jaxmap.families.rope`), computed once per config; cos/sin are computed
inside the jitted step from the positions, which costs a few hundred flops per token and keeps no table on any device.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rope_cos_sin(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin of shape positions.shape + [head_dim], float32, in the rotate-half layout."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x`` [..., heads, head_dim]; cos/sin broadcast over the heads axis."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[..., None, :].astype(x.dtype)
    sin = sin[..., None, :].astype(x.dtype)
    return x * cos + rotated * sin
