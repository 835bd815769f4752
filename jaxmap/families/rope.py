"""RoPE frequency variants (default, linear, llama3) as plain numpy: part of what a family declares, read by the
engine (:mod:`jaxmap.engine.rope`) and by the GGUF reader, importing no jax."""

from __future__ import annotations

import math

import numpy as np

from jaxmap.config import ModelConfig
from jaxmap.errors import UserError


def inverse_frequencies(config: ModelConfig, local: bool = False) -> np.ndarray:
    """``inv_freq`` of shape [head_dim // 2], float32, with the config's rope scaling applied; ``local``: the
    frequencies of sliding layers that have a base of their own (``rope_local_theta``, unscaled, as Gemma 3's)."""
    dim = config.head_dim
    theta = config.rope_local_theta if local and config.rope_local_theta else config.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = {} if local and config.rope_local_theta else dict(config.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        pass
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_scaling(inv_freq, scaling)
    else:
        raise UserError(f"rope scaling {kind!r} is not supported yet; supported: default, linear, llama3")
    return inv_freq.astype(np.float32)


def _llama3_scaling(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short ones kept, a blend between."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled)
