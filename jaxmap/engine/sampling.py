"""Choosing the next token from logits, inside the jitted step so that only token ids cross to the host.

The *shape* of the sampler (greedy or not, top-k's k, whether top-p or a repetition penalty apply) is static and
picks the compiled program; the *values* (temperature, top-p, penalty) are traced, so changing them never recompiles.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

from jaxmap.errors import UserError


def _real(x) -> bool:
    """A finite real number (NaN and infinities compare False everywhere and would slip through range checks)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What the user asked for. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not _real(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature (--temperature) must be a finite number >= 0, got {self.temperature!r}")
        if not _integer(self.top_k) or self.top_k < 0:
            raise UserError(f"top_k (--top-k) must be a whole number >= 0 (0 turns it off), got {self.top_k!r}")
        if not _real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p (--top-p) must be in (0, 1], got {self.top_p!r}")
        if not _real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty (--repetition-penalty) must be a finite number > 0, got "
                            f"{self.repetition_penalty!r}")
        if not _integer(self.seed) or not -(2**63) <= self.seed < 2**63:
            raise UserError(f"seed (--seed) must be a whole number between -2**63 and 2**63 - 1, got {self.seed!r}")

    @property
    def shape(self) -> SamplerShape:
        greedy = self.temperature == 0.0
        return SamplerShape(
            greedy=greedy,
            top_k=0 if greedy else self.top_k,
            use_top_p=not greedy and self.top_p < 1.0,
            use_penalty=self.repetition_penalty != 1.0,
        )

    def values(self) -> jnp.ndarray:
        """Traced values: [temperature, top_p, repetition_penalty]."""
        return jnp.asarray([max(float(self.temperature), 1e-6), self.top_p, self.repetition_penalty], jnp.float32)


@dataclasses.dataclass(frozen=True)
class SamplerShape:
    """The static part of sampling: one compiled program per distinct shape."""

    greedy: bool = True
    top_k: int = 0
    use_top_p: bool = False
    use_penalty: bool = False


def apply_repetition_penalty(logits: jnp.ndarray, seen: jnp.ndarray, penalty: jnp.ndarray) -> jnp.ndarray:
    """CTRL-style penalty as transformers applies it: divide positive logits of seen tokens, multiply negative ones."""
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def sample(logits: jnp.ndarray, seen: jnp.ndarray, values: jnp.ndarray, key: jax.Array,
           shape: SamplerShape) -> jnp.ndarray:
    """Next token ids [B] from float32 logits [B, V]."""
    temperature, top_p, penalty = values[0], values[1], values[2]
    if shape.use_penalty:
        logits = apply_repetition_penalty(logits, seen, penalty)
    if shape.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if shape.top_k and shape.top_k < logits.shape[-1]:  # k >= the vocabulary keeps every token: no top-k
        top_logits, top_ids = jax.lax.top_k(logits, shape.top_k)
    else:
        top_ids = jnp.argsort(-logits, axis=-1)
        top_logits = jnp.take_along_axis(logits, top_ids, axis=-1)
    if shape.use_top_p:
        probs = jax.nn.softmax(top_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each candidate
        top_logits = jnp.where(before < top_p, top_logits, -jnp.inf)  # the first candidate always survives
    choice = jax.random.categorical(key, top_logits, axis=-1)
    return jnp.take_along_axis(top_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def mark_seen(seen: jnp.ndarray, tokens: jnp.ndarray) -> jnp.ndarray:
    """Set ``seen[b, tokens[b]]``; tokens is [B] or [B, T] (negative ids are ignored)."""
    tokens = tokens.reshape(tokens.shape[0], -1)
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
    valid = tokens >= 0
    return seen.at[rows, jnp.where(valid, tokens, 0)].max(valid)
