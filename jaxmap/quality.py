"""``python -m jaxmap.quality``: what each ISQ type costs in accuracy and buys in memory and decode speed.

For one model (default: SmolLM2-135M-Instruct) and each ``--isq`` type, against the float32 run of the same
checkpoint (``isq="none"``; for the default GGUF that is its Q4_1 weights dequantized): mean absolute logit error,
mean KL divergence of the next-token distributions (reference || quantized; unlike the logit error it ignores a
shift of all of a position's logits, which changes no prediction) and top-1 agreement over every position of a
fixed public-domain text (the opening of *Pride and Prejudice*, 448 tokens), the text's perplexity, resident weight
bytes, and greedy decode tokens/s. Prints a Markdown table. ``--imatrix FILE`` (or ``calibration``: collected from
the float model over jaxmap's shipped calibration text) quantizes every row with an importance matrix.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import jax
import numpy as np

TEXT = Path(__file__).resolve().parent / "data" / "pride_and_prejudice_ch1.txt"
DEFAULT_TYPES = ("none", "native", "Q8_0", "Q6K", "Q5K", "Q4K", "Q4_0", "Q4_1", "Q3K", "Q2K", "INT8", "INT4",
                 "F8E4M3")


def _weight_bytes(model) -> int:
    return sum(int(a.size) * a.dtype.itemsize for s in model.engine.stages for a in jax.tree_util.tree_leaves(s.params))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _perplexity(logits: np.ndarray, ids: list[int]) -> float:
    logp = _log_softmax(logits[:-1])
    nll = -logp[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))


def _kl(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(reference || quantized) of the next-token distributions, in nats."""
    ref, got = _log_softmax(reference), _log_softmax(logits)
    return float((np.exp(ref) * (ref - got)).sum(-1).mean())


def measure(model_path, isq: str, ids: list[int], reference: np.ndarray | None, new_tokens: int, layer_mode: str,
            imatrix=None):
    import jaxmap

    t0 = time.perf_counter()
    model = jaxmap.load(model_path, isq=isq, max_seq_len=512, devices="0", progress=False, layer_mode=layer_mode,
                        imatrix=imatrix if isq not in ("none", "native") else None)
    load_s = time.perf_counter() - t0
    (logits,) = model.forward_logits([ids])
    row = {"isq": isq, "weights_mib": _weight_bytes(model) / 2**20, "ppl": _perplexity(logits, ids),
           "load_s": load_s}
    if reference is not None:
        row["mae"] = float(np.abs(logits - reference).mean())
        row["kl"] = _kl(reference, logits)
        row["top1"] = float((logits.argmax(-1) == reference.argmax(-1)).mean())
    model.generate([ids[:16]], max_new_tokens=4, stop_at_eos=False)  # compile the decode buckets
    result = model.generate([ids[:16]], max_new_tokens=new_tokens, stop_at_eos=False)[0]
    row["decode_tps"] = result.stats.decode_tokens_per_s
    return row, logits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxmap.quality", description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--types", default=",".join(DEFAULT_TYPES), help="comma-separated --isq values")
    parser.add_argument("--tokens", type=int, default=448, help="text tokens scored (at least 256)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens timed for decode speed")
    parser.add_argument("--layer-mode", default="auto")
    parser.add_argument("--imatrix", default=None,
                        help="quantize with this importance matrix (a file, or 'calibration': collect one from the "
                             "float model over jaxmap's shipped calibration text, which is not the scored text)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from jaxmap.api import resolve_source

    source = resolve_source(args.model)
    tokenizer = source.tokenizer()
    source.close()
    ids = tokenizer.encode(TEXT.read_text())[: args.tokens]
    print(f"model: {args.model or 'SmolLM2-135M-Instruct (default GGUF)'}; {len(ids)} tokens of {TEXT.name}; "
          f"device: {jax.devices()[0].device_kind}")
    imatrix = _imatrix(args.model, args.imatrix)
    if imatrix is not None:
        print(f"imatrix: {args.imatrix} ({imatrix.tokens} calibration tokens) for every quantized row")
    print("| isq | weights MiB | mean abs logit err | mean KL | top-1 agree | perplexity | decode tok/s | load s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    reference = None
    for isq in args.types.split(","):
        row, logits = measure(args.model, isq, ids, reference, args.new_tokens, args.layer_mode, imatrix)
        if reference is None:
            reference = logits
        print(f"| {isq} | {row['weights_mib']:.1f} | {row.get('mae', 0.0):.4f} | {row.get('kl', 0.0):.5f} | "
              f"{100 * row.get('top1', 1.0):.1f}% | "
              f"{row['ppl']:.3f} | {row['decode_tps']:.1f} | {row['load_s']:.1f} |", flush=True)
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
