"""``python -m jaxmap.bench``: a fixed generation workload, measured for jaxmap and (optionally) transformers.

Each implementation runs in its own subprocess so that peak RSS is its own. Every row is run once to compile (its
compile time is reported), then ``--repeats`` times (default 3) timed; the table gives each figure's median over
those runs (on a shared 2-core machine single runs of the same program varied by up to 2x at batch 8). Speed claims
are ratios against the reference measured in the same run on the same machine, never absolute numbers from
elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence

WORKLOAD = ((16, 1), (128, 1), (16, 8), (128, 8))  # (prompt tokens, batch)
NEW_TOKENS = 128
REPEATS = 3
TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange grain, "
        "salt and cloth. Over the centuries the town grew into a busy port with a cathedral, a university and a "
        "famous market that drew merchants from every corner of the continent. ")


def prompt_ids(tokenizer, n_tokens: int, batch: int) -> list[list[int]]:
    """``batch`` prompts of exactly ``n_tokens`` ids each, cut from a fixed text (row i starts i words later)."""
    words = (TEXT * 40).split()
    rows = []
    for i in range(batch):
        ids = tokenizer(" ".join(words[i:]))[:n_tokens]
        rows.append(ids)
    return rows


def _median(values) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker_jaxmap(args) -> list[dict]:
    from jaxmap.api import load
    from jaxmap.compile_cache import enable_compile_cache

    if not args.no_compile_cache:
        enable_compile_cache()
    wish = dict(item.split("=", 1) for item in args.wish.split(",")) if args.wish else {}
    for key in ("tp", "pp"):
        if key in wish:
            wish[key] = int(wish[key])
    t0 = time.perf_counter()
    model = load(args.model, dtype=args.dtype, max_seq_len=args.max_seq_len, progress=False, **wish)
    load_s = time.perf_counter() - t0
    rows = []
    for n_prompt, batch in args.workload:
        ids = prompt_ids(lambda s: model.tokenizer.encode(s, add_special_tokens=False), n_prompt, batch)
        first = model.generate(ids, max_new_tokens=NEW_TOKENS, stop_at_eos=False)[0].stats
        timed = [model.generate(ids, max_new_tokens=NEW_TOKENS, stop_at_eos=False)[0].stats
                 for _ in range(REPEATS)]
        rows.append({"prompt": n_prompt, "batch": batch, "ttft_ms": _median(t.ttft_s * 1000 for t in timed),
                     "first_ttft_ms": first.ttft_s * 1000, "compile_s": first.compile_s,
                     "prefill_tps": _median(t.prefill_tokens_per_s for t in timed),
                     "decode_tps": _median(t.decode_tokens_per_s for t in timed),
                     "load_s": load_s, "peak_rss_mib": peak_rss_mib()})
    return rows


def _worker_transformers(args) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxmap.api import resolve_source

    source = resolve_source(args.model)
    path = os.path.abspath(source.path)
    source.close()
    folder, name = (os.path.dirname(path), os.path.basename(path)) if path.endswith(".gguf") else (path, None)
    kwargs = {"gguf_file": name} if name else {}
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, **kwargs).eval()
    load_s = time.perf_counter() - t0
    rows = []
    for n_prompt, batch in args.workload:
        ids = torch.tensor(prompt_ids(lambda s: tok(s, add_special_tokens=False)["input_ids"], n_prompt, batch))
        mask = torch.ones_like(ids)
        runs = []
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                model(ids, attention_mask=mask)
                prefill = time.perf_counter() - t0
                t0 = time.perf_counter()
                model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False)
                ttft = time.perf_counter() - t0
                t0 = time.perf_counter()
                model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                               do_sample=False)
                total = time.perf_counter() - t0
                runs.append((prefill, ttft, total))
        rows.append({"prompt": n_prompt, "batch": batch, "ttft_ms": _median(r[1] * 1000 for r in runs),
                     "first_ttft_ms": None, "compile_s": 0.0,
                     "prefill_tps": _median(n_prompt * batch / r[0] for r in runs),
                     "decode_tps": _median(batch * (NEW_TOKENS - 1) / max(r[2] - r[1], 1e-9) for r in runs),
                     "load_s": load_s, "peak_rss_mib": peak_rss_mib()})
    return rows


def run_worker(impl: str, args, wish: str = "") -> list[dict]:
    cmd = [sys.executable, "-m", "jaxmap.bench", "--worker", impl, "--new-tokens", str(NEW_TOKENS),
           "--repeats", str(REPEATS),
           "--workload", ",".join(f"{p}x{b}" for p, b in args.workload), "--max-seq-len", str(args.max_seq_len)]
    if wish:
        cmd += ["--wish", wish]
    if args.model:
        cmd += ["-m", args.model]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.no_compile_cache:
        cmd += ["--no-compile-cache"]
    env = dict(os.environ)
    if args.cpu_devices:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"error: the {impl} benchmark failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(results: dict[str, list[dict]]) -> None:
    head = (f"{'impl':<13} {'prompt':>6} {'batch':>5} {'TTFT ms':>8} {'1st TTFT':>8} {'compile s':>9} "
            f"{'prefill t/s':>11} {'decode t/s':>10} {'peak RSS MiB':>12}")
    print(head)
    print("-" * len(head))
    for impl, rows in results.items():
        for r in rows:
            first = f"{r['first_ttft_ms']:.0f}" if r["first_ttft_ms"] is not None else "-"
            print(f"{impl:<13} {r['prompt']:>6} {r['batch']:>5} {r['ttft_ms']:>8.0f} {first:>8} "
                  f"{r['compile_s']:>9.2f} {r['prefill_tps']:>11.1f} {r['decode_tps']:>10.1f} "
                  f"{r['peak_rss_mib']:>12.0f}")
    if "jaxmap" in results and "transformers" in results:
        print("\nratio jaxmap / transformers (higher is better for jaxmap):")
        for a, b in zip(results["jaxmap"], results["transformers"], strict=True):
            print(f"  prompt {a['prompt']:>4} batch {a['batch']}: decode {a['decode_tps'] / b['decode_tps']:.2f}x, "
                  f"prefill {a['prefill_tps'] / b['prefill_tps']:.2f}x, "
                  f"TTFT {b['ttft_ms'] / a['ttft_ms']:.2f}x")


def parse_workload(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def main(argv: Sequence[str] | None = None) -> int:
    global NEW_TOKENS, REPEATS
    parser = argparse.ArgumentParser(prog="python -m jaxmap.bench", description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None, help="as for generate (default: SmolLM2-135M GGUF)")
    parser.add_argument("--dtype", default="float32",
                        help="compute dtype (default float32, what transformers runs; ISQ types via --layouts, "
                             "e.g. f32:isq=none q8:isq=Q8_0 native:isq=native)")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--workload", type=parse_workload, default=list(WORKLOAD),
                        help="comma-separated PROMPTxBATCH items (default: 16x1,128x1,16x8,128x8)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed runs per row; medians are reported")
    parser.add_argument("--compare-transformers", action="store_true",
                        help="also run Hugging Face transformers (needs torch and transformers) on the same weights")
    parser.add_argument("--no-compile-cache", action="store_true", help="compile from scratch (cold start)")
    parser.add_argument("--layouts", nargs="+", default=None, metavar="NAME:WISH",
                        help="jaxmap layouts to compare in one run, e.g. 1dev:devices=0 tp3:tp=3,pp=1 pp2:pp=2,tp=1")
    parser.add_argument("--cpu-devices", type=int, default=0,
                        help="give each run N virtual CPU devices (XLA_FLAGS), to measure mapping overhead on CPU")
    parser.add_argument("--worker", choices=("jaxmap", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--wish", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    NEW_TOKENS = args.new_tokens
    if args.repeats < 1 or NEW_TOKENS < 2:
        parser.error("--repeats must be at least 1 and --new-tokens at least 2")
    REPEATS = args.repeats
    if args.worker:
        import logging

        logging.basicConfig(level=logging.WARNING)
        rows = _worker_jaxmap(args) if args.worker == "jaxmap" else _worker_transformers(args)
        print(json.dumps(rows))
        return 0
    if args.layouts:
        results = {}
        for item in args.layouts:
            name, _, wish = item.partition(":")
            results[name] = run_worker("jaxmap", args, wish)
    else:
        results = {"jaxmap": run_worker("jaxmap", args)}
    if args.compare_transformers:
        results["transformers"] = run_worker("transformers", args)
    print(f"model: {args.model or 'SmolLM2-135M-Instruct (default GGUF)'}, {NEW_TOKENS} new tokens, "
          f"dtype {args.dtype or 'default'}, {os.cpu_count()} CPUs, median of {REPEATS} timed runs")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
