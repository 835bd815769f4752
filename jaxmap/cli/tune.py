"""``python -m jaxmap.tune``: measure the layouts that fit this machine and save the fastest good one as a plan.

Every candidate (dtype x ISQ type x layer mode x tp/pp split, less what you fix with --dtype/--isq/--layer-mode/--tp/
--pp, less what the planner refuses) runs in its own process on a short workload; one whose mean KL against the
float32 model on the packaged calibration text exceeds --max-kl is rejected. The fastest decode among the rest is
chosen; --save-plan writes its plan, which generate --plan replays (tp/pp, dtype, isq, layer mode).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
from collections.abc import Sequence

from jaxmap.cli.common import LAYER_MODES, guarded, read_model_facts, setup_logging
from jaxmap.errors import ArgumentParser, UserError

MAX_KL = 0.05
WORKLOAD = "32x1"
NEW_TOKENS = 16


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m jaxmap.tune", description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default=None, help="as for generate (default: SmolLM2-135M GGUF)")
    p.add_argument("--dtype", default=None, help="fix the dtype (default: try float32 and bfloat16)")
    p.add_argument("--isq", default=None, help="fix the ISQ type (default: try --isq-candidates)")
    p.add_argument("--isq-candidates", default=None,
                   help="comma-separated ISQ types to try (default: native,Q8_0,none,Q4K for a GGUF, "
                        "Q8_0,none,Q4K otherwise)")
    p.add_argument("--layer-mode", choices=LAYER_MODES, default="auto", help="fix the layer mode (default: try all)")
    p.add_argument("--tp", type=int, default=None, help="fix tensor parallel size")
    p.add_argument("--pp", type=int, default=None, help="fix pipeline stages")
    p.add_argument("--max-kl", type=float, default=MAX_KL,
                   help=f"reject candidates whose mean KL (nats) against the float32 model exceeds this "
                        f"(default {MAX_KL})")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="start no new candidate after this many seconds (default: no limit)")
    p.add_argument("--workload", default=WORKLOAD, help=f"PROMPTxBATCH items as bench's (default {WORKLOAD})")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help=f"tokens generated (default {NEW_TOKENS})")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per candidate after the compiling one")
    p.add_argument("--quality-tokens", type=int, default=64, help="calibration-text tokens scored for KL")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--save-plan", default=None, help="write the chosen layout's plan (load it with --plan)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def run(args) -> int:
    from jaxmap.config.hardware import Hardware
    from jaxmap.planning.tune_candidates import enumerate_candidates
    from jaxmap.tuning import run_candidates
    from jaxmap.workload import parse_workload

    if args.budget is not None and not (math.isfinite(args.budget) and args.budget > 0):
        raise UserError(f"--budget must be a positive number of seconds, got {args.budget:g}")
    if not (math.isfinite(args.max_kl) and args.max_kl >= 0):
        raise UserError(f"--max-kl must be a number >= 0, got {args.max_kl:g}")
    for flag, value, least in (("--new-tokens", args.new_tokens, 2), ("--repeats", args.repeats, 1),
                               ("--quality-tokens", args.quality_tokens, 2), ("--max-seq-len", args.max_seq_len, 1)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    workload = parse_workload(args.workload)
    need = max(p for p, _ in workload) + args.new_tokens
    if args.max_seq_len < max(need, args.quality_tokens):
        raise UserError(f"--max-seq-len {args.max_seq_len} is below the workload's {need} tokens or "
                        f"--quality-tokens {args.quality_tokens}")
    facts = read_model_facts(args.model, native=True)
    gguf = str(args.model or "").endswith(".gguf") or args.model is None and facts.types is not None
    isqs = [t.strip() for t in args.isq_candidates.split(",") if t.strip()] if args.isq_candidates else None
    if isqs is not None:
        from jaxmap.quant import parse_isq

        if not isqs:
            raise UserError("--isq-candidates is empty; write e.g. --isq-candidates none,Q8_0")
        for t in isqs:
            if t not in ("none", "native"):
                parse_isq(t)
    fixed = {"dtype": args.dtype, "isq": args.isq, "layer_mode": args.layer_mode, "tp": args.tp, "pp": args.pp}
    candidates = enumerate_candidates(facts.config, Hardware.from_jax(), fixed, isqs, gguf, args.max_seq_len,
                                      stored_bytes=facts.stored, native_types=facts.types)
    with tempfile.TemporaryDirectory(prefix="jaxmap-tune-") as work:  # reference logits, candidates' plans
        rows, plan = run_candidates(args.model, candidates, workload=workload, new_tokens=args.new_tokens,
                                    repeats=args.repeats, max_seq_len=args.max_seq_len,
                                    quality_tokens=args.quality_tokens, max_kl=args.max_kl, budget_s=args.budget,
                                    progress=not args.quiet and not args.json, work_dir=work)
        if plan is not None and args.save_plan:
            shutil.copyfile(plan, args.save_plan)
    for r in rows:
        r.pop("plan", None)
    if args.json:
        print(json.dumps({"rows": rows, "saved_plan": args.save_plan if plan else None}, indent=1))
    else:
        _table(args, rows, workload)
        if plan is None:
            print("no candidate passed; nothing saved")
        elif args.save_plan:
            print(f"plan of the chosen layout written to {args.save_plan} (python -m jaxmap.generate --plan "
                  f"{args.save_plan})")
    return 0 if plan is not None else 1


def _table(args, rows: list[dict], workload) -> None:
    import os

    print(f"model: {args.model or 'SmolLM2-135M-Instruct (default GGUF)'}; workload {args.workload}, "
          f"{args.new_tokens} new tokens; KL bound {args.max_kl:g}; {os.cpu_count()} CPUs (figures indicative)")
    print("| candidate | decode tok/s | TTFT ms | peak RSS MiB | KL | verdict |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        nums = (f"{r['decode_tps']:.1f} | {r['ttft_ms']:.0f} | {r['peak_rss_mib']:.0f} | {r['kl']:.4f}"
                if "decode_tps" in r else "- | - | - | -")
        verdict = r["verdict"] + (f" ({r['why']})" if r.get("why") else "")
        print(f"| {r['candidate']} | {nums} | {verdict} |")


def run_worker(args) -> int:
    from jaxmap.tuning import worker

    logging.basicConfig(level=logging.WARNING)
    with open(args.worker) as f:
        spec = json.load(f)
    spec["workload"] = [tuple(w) for w in spec["workload"]]
    print(json.dumps(worker(spec)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return guarded(run_worker, args)
    setup_logging(False, True)
    return guarded(run, args)


if __name__ == "__main__":
    sys.exit(main())
