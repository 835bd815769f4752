"""RoPE frequency variants (default, linear, llama3, longrope, yarn) as plain numpy: part of what a family declares,
read by the engine (:mod:`jaxmap.engine.rope`) and by the GGUF reader, importing no jax.

LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini) divides each frequency by a factor of its own: ``short_factor`` within the
original context, ``long_factor`` past it, and scales cos/sin by an attention factor. transformers switches between
the two while generating (long once the sequence passes ``original_max_position_embeddings``); jaxmap, as llama.cpp,
chooses once per run from the planned context: long factors when ``max_seq_len`` exceeds the original context.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from jaxmap.config import ModelConfig
from jaxmap.errors import UserError

log = logging.getLogger(__name__)


def inverse_frequencies(config: ModelConfig, local: bool = False, max_seq_len: int | None = None) -> np.ndarray:
    """``inv_freq`` of shape [rotary_dim // 2], float32, with the config's rope scaling applied; ``local``: the
    frequencies of sliding layers that have a base of their own (``rope_local_theta``, unscaled, as Gemma 3's).
    ``max_seq_len``: the planned context, which picks LongRoPE's long or short factors (short when None)."""
    dim = config.rotary_dim
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
    elif kind == "yarn":
        inv_freq = _yarn_scaling(inv_freq, scaling, dim, theta, config.max_position_embeddings)
    elif kind == "longrope":
        original = int(scaling["original_max_position_embeddings"])
        long = max_seq_len is not None and max_seq_len > original
        inv_freq = inv_freq / np.asarray(scaling["long_factor" if long else "short_factor"], np.float64)
        if max_seq_len is not None:
            log.info("LongRoPE: %s factors for the planned context of %d tokens (%s the original %d), cos/sin "
                     "scaled by %.4f", "long" if long else "short", max_seq_len, ">" if long else "<=", original,
                     attention_factor(config))
    else:
        raise UserError(f"rope scaling {kind!r} is not supported yet; supported: default, linear, llama3, longrope, "
                        f"yarn")
    return inv_freq.astype(np.float32)


def attention_factor(config: ModelConfig) -> float:
    """What cos/sin are multiplied by: LongRoPE's ``attention_factor``, by default sqrt(1 + ln(factor) /
    ln(original context)) with factor = max_position_embeddings / original (or the config's ``factor``), 1 when
    factor <= 1 (transformers' ``_compute_longrope_parameters``); 1 for every other kind."""
    scaling = dict(config.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "yarn":
        return _yarn_attention_factor(config, scaling)
    if kind != "longrope":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = float(scaling["original_max_position_embeddings"])
    factor = float(scaling.get("factor") or config.max_position_embeddings / original)
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


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


def _yarn_factor(config: ModelConfig, scaling: dict) -> float:
    if scaling.get("factor") is not None:
        return float(scaling["factor"])
    return config.max_position_embeddings / float(scaling["original_max_position_embeddings"])


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_attention_factor(config: ModelConfig, scaling: dict) -> float:
    """YaRN's cos/sin scale: the config's ``attention_factor``, else 0.1 ln(factor) + 1 (with DeepSeek's
    ``mscale`` / ``mscale_all_dim`` ratio where both are given), as transformers' ``_compute_yarn_parameters``."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _yarn_factor(config, scaling)
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all:
        return _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all))
    return _yarn_mscale(factor)


def _yarn_scaling(inv_freq: np.ndarray, scaling: dict, dim: int, theta: float, max_pos: int) -> np.ndarray:
    """YaRN (gpt-oss): frequencies that turn fewer than ``beta_slow`` times over the original context are
    interpolated (divided by ``factor``), those turning more than ``beta_fast`` times kept, a linear ramp over the
    dimensions between; ``truncate`` (default true, gpt-oss says false) rounds the ramp's ends to whole dims."""
    original = float(scaling["original_max_position_embeddings"])
    factor = float(scaling["factor"]) if scaling.get("factor") is not None else max_pos / original
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (the original frequency), 0: interpolate
    return (inv_freq / factor) * (1 - keep) + inv_freq * keep
