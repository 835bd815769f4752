"""``python -m jaxmap.imatrix``: measure an importance matrix for ISQ over calibration text and write it (.npz)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxmap.calibrate.imatrix import DEFAULT_CHUNK, MIN_CALIBRATION_TOKENS, _read_text, calibration_ids, collect
from jaxmap.errors import ArgumentParser, UserError

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    from jaxmap.cli.common import (
        add_distributed_arguments,
        add_mapping_arguments,
        add_model_arguments,
        guarded,
        setup_logging,
    )

    summary = __doc__.splitlines()[0].strip("`")
    parser = ArgumentParser(prog="python -m jaxmap.imatrix", description=summary)
    add_model_arguments(parser)
    add_mapping_arguments(parser)
    add_distributed_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="where to write the importance matrix (.npz)")
    parser.add_argument("--text", default=None, help="calibration text file (default: jaxmap's shipped one)")
    parser.add_argument("--max-tokens", type=int, default=None, help="use at most this many tokens of the text")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="tokens per independent sequence")
    parser.add_argument("--seed", type=int, default=0, help="random weights' seed (preset:NAME models)")
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    return guarded(_run, args)


def _run(args) -> int:
    from jaxmap.api import load
    from jaxmap.engine.compile_cache import enable_compile_cache
    from jaxmap.engine.multihost import is_primary, start_from_args

    if args.chunk < 1:
        raise UserError(f"--chunk must be at least 1, got {args.chunk}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.imatrix is not None:
        raise UserError("--imatrix is for loading quantized (generate, convert); this command writes one (-o)")
    if args.isq is not None and str(args.isq).strip().lower() not in ("none", "off", "float"):
        raise UserError("an importance matrix is measured on float weights: drop --isq (or pass --isq none)")
    output = Path(args.output)
    if not output.parent.is_dir():
        raise UserError(f"cannot write {output}: folder {output.parent} does not exist")
    if output.is_dir():
        raise UserError(f"cannot write {output}: it is a folder; give a file name such as "
                        f"{output / 'model.imatrix.npz'}")
    if args.text is not None:
        _read_text(Path(args.text), "calibration text")  # a bad text is reported before the model loads
    if start_from_args(args):
        args.quiet = True
    enable_compile_cache()
    model = load(args.model, dtype=args.dtype, max_seq_len=args.max_seq_len, layer_mode=args.layer_mode,
                 seed=args.seed, progress=not args.quiet, tp=args.tp, pp=args.pp, devices=args.devices,
                 device_layers=args.device_layers, topology=args.topology, plan=args.plan,
                 max_memory=args.max_memory, auto=args.auto, allow_disk=args.allow_disk,
                 offload_folder=args.offload_folder, isq=None if args.plan else "none")
    ids = calibration_ids(model.tokenizer, args.text, args.max_tokens)
    if len(ids) < MIN_CALIBRATION_TOKENS:
        log.warning("imatrix: only %d calibration tokens; a few thousand give a steadier measure (the shipped "
                    "text has about 3,300)", len(ids))
    result = collect(model, ids, args.chunk, progress=not args.quiet)
    if is_primary():  # every process measured the same; one writes
        result.save(output)
    log.info("imatrix: %d weights measured over %d tokens, written to %s", len(result.values), result.tokens, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
