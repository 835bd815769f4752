"""``python -m jaxmap.quality``: what each ISQ type costs in accuracy and buys in memory and decode speed.

The scores themselves: :mod:`jaxmap.calibrate.quality`.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxmap.calibrate.quality import NEAR_TIE, Scores, near_ties, windows
from jaxmap.errors import ArgumentParser, UserError

TEXT = Path(__file__).resolve().parents[1] / "data" / "pride_and_prejudice_ch1.txt"
DEFAULT_TYPES = ("none", "native", "Q8_0", "Q6K", "Q5K", "Q4K", "Q4_0", "Q4_1", "Q3K", "Q2K", "INT8", "INT4",
                 "F8E4M3")
MIN_WINDOW = 16


def _weight_bytes(model) -> int:
    return sum(int(a.size) * a.dtype.itemsize for s in model.engine.stages for a in jax.tree_util.tree_leaves(s.params))


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
    from jaxmap.calibrate.imatrix import calibration_ids

    return calibration_ids(tokenizer, path if path is not None else TEXT, None, what="scored text")


def main(argv: list[str] | None = None) -> int:
    from jaxmap.cli.common import guarded

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
    from jaxmap.calibrate.imatrix import calibration_ids, collect
    from jaxmap.loading.imatrix_file import Imatrix

    if spec is None:
        return None
    if spec != "calibration":
        return Imatrix.load(spec)
    model = jaxmap.load(model_path, isq="none", max_seq_len=512, devices="0", progress=False)
    return collect(model, calibration_ids(model.tokenizer, None, None), progress=False)


if __name__ == "__main__":
    sys.exit(main())
