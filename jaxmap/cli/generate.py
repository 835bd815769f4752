"""``python -m jaxmap.generate``: load a model, map it onto the devices present, and stream text.

User errors (bad paths, flags, files, prompts) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from jaxmap.cli.common import (
    add_distributed_arguments,
    add_expert_arguments,
    add_mapping_arguments,
    add_model_arguments,
    add_sampling_arguments,
    exit_process,  # noqa: F401 (the entry module's exit, re-exported)
    expert_wish,
    guarded,
    setup_logging,
)
from jaxmap.errors import ArgumentParser, UserError

log = logging.getLogger("jaxmap")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m jaxmap.generate", description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    add_mapping_arguments(parser)
    add_expert_arguments(parser)
    add_distributed_arguments(parser)
    parser.add_argument("-p", "--prompt", action="append", default=None,
                        help="a prompt (repeat for a batch); read from standard input when absent")
    add_sampling_arguments(parser)
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    parser.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default=None,
                        help="with --chat on a harmony model (gpt-oss): the 'Reasoning:' level its template puts in "
                             "the system message (the template's default is medium); refused for other templates")
    parser.add_argument("--show-reasoning", action="store_true",
                        help="with --chat on a harmony model: also print the analysis channel (the model's "
                             "reasoning), to standard error, dimmed on a terminal; by default only the final answer "
                             "is printed")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per prompt (prompt, token_ids, text, stats) instead of text")
    return parser


def format_stats(stats) -> str:
    return (f"prompt tokens: {stats.prompt_tokens}, generated tokens: {stats.generated_tokens}, "
            f"time to first token: {stats.ttft_s * 1000:.0f} ms, prefill: {stats.prefill_tokens_per_s:.1f} tokens/s, "
            f"decode: {stats.decode_tokens_per_s:.1f} tokens/s, compile: {stats.compile_s:.2f} s")


def run(args: argparse.Namespace) -> int:
    from jaxmap.engine.multihost import start_from_args

    if start_from_args(args):  # before any use of jax; processes other than 0 print nothing
        args.quiet = True
    t_import = time.perf_counter()
    from jaxmap.api import load
    from jaxmap.engine.compile_cache import enable_compile_cache
    from jaxmap.engine.program_store import enable_program_store
    from jaxmap.engine.sampling import SamplingParams
    from jaxmap.loading.harmony import Delta, HarmonyStream
    from jaxmap.loading.tokenizer import encode_prompt
    from jaxmap.planning.context import run_max_seq_len

    log.debug("import phase: %.2f s (jax and jaxmap's engine)", time.perf_counter() - t_import)
    prompts = read_prompts(args.prompt)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    check_type_flags(args.dtype, args.isq)
    if args.reasoning_effort is not None and not args.chat:
        raise UserError("--reasoning-effort needs --chat (it is a setting of the chat template)")
    tokenizer, config = check_tokenizer(args.model, args.chat, args.reasoning_effort)
    enable_compile_cache()
    enable_program_store()
    batch = max(len(prompts), args.max_batch_size) if args.plan is None else None  # a plan keeps its own
    seq = args.max_seq_len
    if seq is None and args.plan is None and args.save_plan is None:  # a saved plan keeps the model's default
        need = max(len(encode_prompt(tokenizer, p, args.chat, args.reasoning_effort)) for p in prompts)
        seq = run_max_seq_len(config, need + args.max_new_tokens)
    model = load(args.model, dtype=args.dtype, max_seq_len=seq, layer_mode=args.layer_mode,
                 seed=args.seed, progress=not args.quiet, tp=args.tp, pp=args.pp, devices=args.devices,
                 device_layers=args.device_layers, topology=args.topology, plan=args.plan,
                 save_plan=args.save_plan, max_batch_size=batch, max_memory=args.max_memory,
                 auto=args.auto, allow_disk=args.allow_disk, offload_folder=args.offload_folder, isq=args.isq,
                 imatrix=args.imatrix, prefill_chunk=args.prefill_chunk, **expert_wish(args))
    if seq is not None and args.max_seq_len is None:  # said once loaded: a failed start stays one error line
        log.info("KV cache: %d slots per sequence, sized for this run (longest prompt %d tokens + %d new; "
                 "--max-seq-len sets it)", seq, need, args.max_new_tokens)

    stream = not args.json and len(prompts) == 1
    harmony = args.chat and model.tokenizer.harmony
    decoder = model.tokenizer.stream_decoder() if stream and not harmony else None
    channels = HarmonyStream(model.tokenizer) if stream and harmony else None
    show_reply = ReplyPrinter(args.show_reasoning, args.quiet)

    def on_token(row: int, token: int) -> None:
        if channels is not None:
            show_reply(channels.push(token))
        else:
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()

    results = model.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, chat=args.chat,
                             stop_at_eos=not args.ignore_eos, on_token=on_token if stream else None,
                             reasoning_effort=args.reasoning_effort)
    if args.json:
        for result in results:
            print(json.dumps(result.to_json(), ensure_ascii=False))
    elif stream:
        if channels is not None:
            show_reply(channels.finish())
            sys.stdout.write("\n")
        else:
            sys.stdout.write(decoder.flush() + "\n")
    else:
        for i, result in enumerate(results):
            print(f"--- prompt {i + 1}: {result.prompt!r}")
            if harmony:
                show_reply(Delta(result.reasoning or "", result.text))
                for call in result.tool_calls or ():
                    print(f"[tool call {call['name']}: {call['arguments']}]")
                print()
            else:
                print(result.text)
    if not args.json and not args.quiet:
        print(format_stats(results[0].stats if len(results) == 1 else _batch_stats(results)), file=sys.stderr)
    return 0


class ReplyPrinter:
    """A harmony reply's pieces: the final channel to standard output, the reasoning to standard error (dimmed on
    a terminal) when asked for, else one hint there that the model is reasoning (on a terminal, unless quiet); tool
    calls as one bracketed line each."""

    def __init__(self, show_reasoning: bool, quiet: bool):
        self.show, self.hint = show_reasoning, not quiet and sys.stderr.isatty()

    def __call__(self, delta) -> None:
        if delta.reasoning and self.show:
            dim = sys.stderr.isatty()
            sys.stderr.write(("\x1b[2m" if dim else "") + delta.reasoning + ("\x1b[0m" if dim else ""))
            sys.stderr.flush()
        elif delta.reasoning and self.hint:
            sys.stderr.write("(reasoning; --show-reasoning prints it)\n")
            sys.stderr.flush()
            self.hint = False
        if delta.content:
            sys.stdout.write(delta.content)
        for call in getattr(delta, "tool_calls", ()):
            sys.stdout.write(f"\n[tool call {call.name}: {call.arguments}]\n")
        sys.stdout.flush()


def read_prompts(given: list[str] | None) -> list[str]:
    """``-p`` prompts, or standard input as one prompt (one trailing newline dropped: ``echo text |`` means
    ``-p text``); empty or non-UTF-8 prompts are refused before any model is loaded."""
    from jaxmap.loading.tokenizer import check_utf8

    if given is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise UserError("no prompt: pass --prompt TEXT or pipe text on standard input")
        text = sys.stdin.read()
        given = [text[:-1] if text.endswith("\n") else text]
        if not given[0]:
            raise UserError("standard input is empty: pipe a prompt, or pass --prompt TEXT")
    for i, prompt in enumerate(given):
        if not prompt:
            raise UserError(f"prompt {i + 1} of {len(given)} is empty" if len(given) > 1 else "the prompt is empty")
        check_utf8(prompt)
    return given


def check_type_flags(dtype: str | None, isq: str | None) -> None:
    """An unknown --dtype or --isq is said before anything is opened."""
    from jaxmap.config.dtypes import parse_dtype
    from jaxmap.quant import parse_isq

    if dtype is not None:
        parse_dtype(dtype)
    if isq is not None and isq.strip().lower() != "native":
        parse_isq(isq)


def check_tokenizer(model, chat: bool, reasoning_effort: str | None = None):
    """Text prompts need a tokenizer, --chat its template, and --reasoning-effort a template that reads it: known
    from the source's small files, so say so before the weights load rather than after. Returns the tokenizer and
    the model's config (what sizes the run's KV cache)."""
    from jaxmap.api import resolve_source
    from jaxmap.loading.harmony import check_reasoning_effort

    source = resolve_source(model)
    try:
        tokenizer = source.tokenizer()
        if tokenizer is None:
            how = ("presets have random weights and no tokenizer" if str(source.path).startswith("preset:")
                   else "add its tokenizer.json")
            raise UserError(f"{source.path} has no tokenizer, so text prompts cannot be encoded ({how})")
        if chat and not tokenizer.chat_template:
            raise UserError(f"{source.path} has no chat template: drop --chat")
        check_reasoning_effort(reasoning_effort, tokenizer.chat_template)
        return tokenizer, source.config
    finally:
        source.close()


def _batch_stats(results):
    import dataclasses

    first = results[0].stats
    return dataclasses.replace(first, prompt_tokens=sum(r.stats.prompt_tokens for r in results),
                               generated_tokens=sum(r.stats.generated_tokens for r in results))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    return guarded(run, args)
