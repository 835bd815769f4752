"""``python -m jaxmap.quality``: what each ISQ type costs in accuracy and buys in memory and decode speed.

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

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from jaxmap.errors import ArgumentParser, UserError

TEXT = Path(__file__).resolve().parent / "data" / "pride_and_prejudice_ch1.txt"
DEFAULT_TYPES = ("none", "native", "Q8_0", "Q6K", "Q5K", "Q4K", "Q4_0", "Q4_1", "Q3K", "Q2K", "INT8", "INT4",
                 "F8E4M3")
NEAR_TIE = 0.05  # nats between the reference's two most likely tokens
MIN_WINDOW = 16


def _weight_bytes(model) -> int:
    return sum(int(a.size) * a.dtype.itemsize for s in model.engine.stages for a in jax.tree_util.tree_leaves(s.params))


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


def measure(model_path, isq: str, texts: list[list[int]], references: list[np.ndarray] | None, new_tokens: int,
            layer_mode: str, imatrix=None) -> tuple[dict, list[np.ndarray]]:
    """Load ``model_path`` with ``isq``, score every window against ``references`` (None: this is the reference)
    and time greedy decode. Returns the table row and this run's logits per window."""
    import jaxmap

    t0 = time.perf_counter()
    seq = max(len(w) for w in texts) + max(new_tokens, 4) + 16
    model = jaxmap.load(model_path, isq=isq, max_seq_len=seq, devices="0", progress=False, layer_mode=layer_mode,
                        imatrix=imatrix if isq not in ("none", "native") else None)
    load_s = time.perf_counter() - t0
    scores, all_logits = Scores(), []
    for i, ids in enumerate(texts):
        (logits,) = model.forward_logits([ids])
        scores.add(logits, ids, None if references is None else references[i])
        all_logits.append(logits)
    row = {"isq": isq, "weights_mib": _weight_bytes(model) / 2**20, "load_s": load_s, **scores.row()}
    prompt = texts[0][:16]
    model.generate([prompt], max_new_tokens=4, stop_at_eos=False)  # compile the decode buckets
    result = model.generate([prompt], max_new_tokens=new_tokens, stop_at_eos=False)[0]
    row["decode_tps"] = result.stats.decode_tokens_per_s
    return row, all_logits


def _format(row: dict) -> str:
    if "top1" in row:
        agree = (f"{100 * row['top1']:.1f}% ({100 * row['top1_lo']:.1f}-{100 * row['top1_hi']:.1f}) | "
                 f"{row['misses']} ({row['tie_misses']})")
        errs = f"{row['mae']:.4f} | {row['kl']:.5f}"
    else:
        agree, errs = "reference | -", "- | -"
    return (f"| {row['isq']} | {row['weights_mib']:.1f} | {errs} | {agree} | {row['ppl']:.3f} | "
            f"{row['decode_tps']:.1f} | {row['load_s']:.1f} |")


def _types(spec: str) -> list[str]:
    from jaxmap.quant import parse_isq

    types = [t.strip() for t in spec.split(",") if t.strip()]
    if not types:
        raise UserError("--types is empty: give comma-separated --isq values, e.g. none,Q8_0,Q4K")
    for t in types:
        if t not in ("none", "native"):
            parse_isq(t)  # one line naming the known types
    return types


def _text_ids(tokenizer, path: str | None) -> list[int]:
    from jaxmap.imatrix import calibration_ids

    return calibration_ids(tokenizer, path if path is not None else TEXT, None, what="scored text")


def main(argv: list[str] | None = None) -> int:
    from jaxmap.generate import guarded

    parser = ArgumentParser(prog="python -m jaxmap.quality", description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--types", default=",".join(DEFAULT_TYPES),
                        help="comma-separated --isq values; the first is the reference (default starts with none)")
    parser.add_argument("--text", default=None, help="UTF-8 text to score (default: jaxmap's Pride and Prejudice)")
    parser.add_argument("--tokens", type=int, default=448, help="tokens per scored window (the issue asks >= 256)")
    parser.add_argument("--windows", type=int, default=16, help="score at most this many windows of the text")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens timed for decode speed")
    parser.add_argument("--layer-mode", default="auto")
    parser.add_argument("--imatrix", default=None,
                        help="quantize with this importance matrix (a file, or 'calibration': collect one from the "
                             "float model over jaxmap's shipped calibration text, which is not the scored text)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    return guarded(_run, args)


def _run(args) -> int:
    from jaxmap.api import resolve_source

    if args.tokens < MIN_WINDOW:
        raise UserError(f"--tokens must be at least {MIN_WINDOW}, got {args.tokens}")
    if args.windows < 1:
        raise UserError(f"--windows must be at least 1, got {args.windows}")
    if args.new_tokens < 1:
        raise UserError(f"--new-tokens must be at least 1, got {args.new_tokens}")
    types = _types(args.types)
    source = resolve_source(args.model)
    try:
        tokenizer = source.tokenizer()
    finally:
        source.close()
    ids = _text_ids(tokenizer, args.text)
    if len(ids) < 2:
        raise UserError(f"the text has {len(ids)} token(s); at least 2 are needed to score a prediction")
    texts = windows(ids, args.tokens, args.windows)
    name = Path(args.text).name if args.text else TEXT.name
    scored = sum(len(w) for w in texts)
    print(f"model: {args.model or 'SmolLM2-135M-Instruct (default GGUF)'}; {scored} tokens of {name} in "
          f"{len(texts)} window(s) of up to {args.tokens}; reference: {types[0]}; "
          f"device: {jax.devices()[0].device_kind}")
    imatrix = _imatrix(args.model, args.imatrix)
    if imatrix is not None:
        print(f"imatrix: {args.imatrix} ({imatrix.tokens} calibration tokens) for every quantized row")
    references = None
    for isq in types:
        row, logits = measure(args.model, isq, texts, references, args.new_tokens, args.layer_mode, imatrix)
        if references is None:
            references = logits
            ties = sum(int(near_ties(r).sum()) for r in references)
            print(f"top-1: agreement with the reference, with its 95% interval; misses: positions whose predicted "
                  f"token differs, in brackets those among the {ties} near-ties (reference top two within "
                  f"{NEAR_TIE} nats)")
            print("| isq | weights MiB | mean abs logit err | mean KL | top-1 agree (95%) | misses (near-tie) | "
                  "perplexity | decode tok/s | load s |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(_format(row), flush=True)
    return 0


def _imatrix(model_path, spec: str | None):
    """The ``--imatrix`` argument: None, a file, or ``calibration`` (collected here from the float model)."""
    import jaxmap
    from jaxmap.imatrix import Imatrix, calibration_ids, collect

    if spec is None:
        return None
    if spec != "calibration":
        return Imatrix.load(spec)
    model = jaxmap.load(model_path, isq="none", max_seq_len=512, devices="0", progress=False)
    return collect(model, calibration_ids(model.tokenizer, None, None), progress=False)


if __name__ == "__main__":
    sys.exit(main())
