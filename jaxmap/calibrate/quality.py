"""The scores behind ``python -m jaxmap.quality``: what each ISQ type costs in accuracy.


For one model (default: SmolLM2-135M-Instruct) and each ``--isq`` type, against the float32 run of the same
checkpoint (``isq="none"``; for the default GGUF that is its Q4_1 weights dequantized): mean absolute logit error,
mean KL divergence of the next-token distributions (reference || quantized; unlike the logit error it ignores a
shift of all of a position's logits, which changes no prediction) and top-1 agreement over every scored position,
the text's perplexity, resident weight bytes, and greedy decode tokens/s. Prints a Markdown table.

The scored text is a fixed public-domain one (the opening of *Pride and Prejudice*, 448 tokens) unless ``--text``
names another; a long text is scored in consecutive windows of ``--tokens`` tokens. Top-1 agreement is a count over
few hundred positions, so the table gives its 95% (Wilson) interval and how many positions are near-ties: reference
top-2 log-probabilities closer than :data:`NEAR_TIE` nats, where any small perturbation may swap the winner.
``--imatrix FILE`` (or ``calibration``: collected from the float model over jaxmap's shipped calibration text)
quantizes every row with an importance matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

NEAR_TIE = 0.05  # nats between the reference's two most likely tokens


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _nll(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """Negative log-likelihood of each next token of ``ids`` (one fewer than the positions)."""
    logp = _log_softmax(logits[:-1])
    return -logp[np.arange(len(ids) - 1), ids[1:]]


def _kl_rows(reference: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(reference || quantized) of each position's next-token distribution, in nats."""
    ref, got = _log_softmax(reference), _log_softmax(logits)
    return (np.exp(ref) * (ref - got)).sum(-1)


def _kl(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(reference || quantized) of the next-token distributions, in nats."""
    return float(_kl_rows(reference, logits).mean())


def near_ties(reference: np.ndarray, margin: float = NEAR_TIE) -> np.ndarray:
    """Positions whose reference top-2 log-probabilities are within ``margin`` nats (log-prob gaps equal logit
    gaps, so this reads the logits directly)."""
    top2 = np.partition(reference, -2, axis=-1)[..., -2:]
    return (top2[..., 1] - top2[..., 0]) < margin


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``hits / n`` (95% for the default ``z``): unlike the normal
    approximation it stays inside [0, 1] and is honest near 100%, where top-1 agreement lives."""
    if n <= 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Scores:
    """One type's accumulated agreement with the reference over every window."""

    positions: int = 0
    hits: int = 0
    tie_misses: int = 0
    abs_err: float = 0.0
    kl: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)

    def add(self, logits: np.ndarray, ids: list[int], reference: np.ndarray | None) -> None:
        self.nll.extend(_nll(logits, ids).tolist())
        if reference is None:
            return
        agree = logits.argmax(-1) == reference.argmax(-1)
        self.positions += len(agree)
        self.hits += int(agree.sum())
        self.tie_misses += int((~agree & near_ties(reference)).sum())
        self.abs_err += float(np.abs(logits - reference).sum() / logits.shape[-1])
        self.kl.extend(_kl_rows(reference, logits).tolist())

    def row(self) -> dict:
        out = {"ppl": float(np.exp(np.mean(self.nll)))}
        if self.positions:
            lo, hi = wilson(self.hits, self.positions)
            out.update(mae=self.abs_err / self.positions, kl=float(np.mean(self.kl)),
                       top1=self.hits / self.positions, top1_lo=lo, top1_hi=hi,
                       misses=self.positions - self.hits, tie_misses=self.tie_misses)
        return out


def windows(ids: list[int], size: int, limit: int) -> list[list[int]]:
    """Consecutive windows of ``size`` tokens (a shorter tail is dropped unless it is the only window)."""
    out = [ids[i:i + size] for i in range(0, len(ids), size)]
    if len(out) > 1 and len(out[-1]) < size:
        out.pop()
    return out[:limit]


