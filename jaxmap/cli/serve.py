"""``python -m jaxmap.serve``: load and map a model as generate does, then serve it over an OpenAI-compatible HTTP
API with continuous batching (``pip install jaxmap[serve]``).

User errors (bad paths, flags, files) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from jaxmap.cli.common import (
    add_distributed_arguments,
    add_expert_arguments,
    add_mapping_arguments,
    add_model_arguments,
    expert_wish,
    guarded,
    setup_logging,
)
from jaxmap.errors import ArgumentParser, UserError
from jaxmap.serving import SERVE_PREFILL_CHUNK

log = logging.getLogger("jaxmap")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m jaxmap.serve", description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    add_mapping_arguments(parser)
    add_expert_arguments(parser)
    add_distributed_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    parser.add_argument("--served-model-name", default=None, help="the model's name in the API (default: -m)")
    parser.add_argument("--seed", type=int, default=0, help="random weights' seed for preset:NAME models")
    parser.set_defaults(max_batch_size=8)  # batch slots: the KV cache is planned for this many requests at once
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="prefill every prompt whole instead of reusing a cached prompt prefix's KV rows")
    parser.set_defaults(prefill_chunk=SERVE_PREFILL_CHUNK)  # see SERVE_PREFILL_CHUNK
    for action in parser._actions:
        if action.dest == "prefill_chunk":
            action.help = (f"prompt tokens per prefill step (default {SERVE_PREFILL_CHUNK} for serve): a newcomer's "
                           "prefill runs one chunk between two decode steps, and prefixes are cached in whole chunks")
    return parser


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be 0-65535, got {args.port}")
    if args.max_batch_size < 1:
        raise UserError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    if args.max_queue < 1:
        raise UserError(f"--max-queue must be at least 1, got {args.max_queue}")
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("the server needs uvicorn and starlette: pip install 'jaxmap[serve]'") from None
    _check_before_loading(args)
    from jaxmap.api import load
    from jaxmap.engine.compile_cache import enable_compile_cache
    from jaxmap.engine.program_store import enable_program_store
    from jaxmap.serving.app import serve

    enable_compile_cache()
    enable_program_store()
    batch = args.max_batch_size
    model = load(args.model, dtype=args.dtype, max_seq_len=args.max_seq_len, layer_mode=args.layer_mode,
                 seed=args.seed, progress=not args.quiet, tp=args.tp, pp=args.pp, devices=args.devices,
                 device_layers=args.device_layers, topology=args.topology, plan=args.plan,
                 save_plan=args.save_plan, max_batch_size=batch, max_memory=args.max_memory,
                 auto=args.auto, allow_disk=args.allow_disk, offload_folder=args.offload_folder, isq=args.isq,
                 imatrix=args.imatrix, prefill_chunk=args.prefill_chunk, **expert_wish(args))
    name = args.served_model_name or (str(args.model) if args.model else "jaxmap")
    serve(model, host=args.host, port=args.port, max_batch_size=batch, name=name, max_queue=args.max_queue,
          prefix_cache=not args.no_prefix_cache)
    return 0


def _check_before_loading(args: argparse.Namespace) -> None:
    """An unknown --dtype or --isq, or a model without a tokenizer (the API speaks text), is said before the
    weights load."""
    from jaxmap.api import resolve_source
    from jaxmap.config.dtypes import parse_dtype
    from jaxmap.quant import parse_isq

    if args.dtype is not None:
        parse_dtype(args.dtype)
    if args.isq is not None and args.isq.strip().lower() != "native":
        parse_isq(args.isq)
    source = resolve_source(args.model)
    try:
        if source.tokenizer() is None:
            raise UserError(f"{source.path} has no tokenizer, so it cannot be served (the API speaks text)")
    finally:
        source.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    return guarded(run, args)
