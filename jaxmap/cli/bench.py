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
import re
import subprocess
import sys
import time
from collections.abc import Sequence

from jaxmap.cli.common import LAYER_MODES, guarded
from jaxmap.errors import ArgumentParser, UserError
from jaxmap.workload import median as _median
from jaxmap.workload import parse_workload, peak_rss_mib, prompt_ids

WORKLOAD = "16x1,128x1,16x8,128x8"  # PROMPT tokens x batch
NEW_TOKENS = 128
REPEATS = 3
def _worker_jaxmap(args) -> list[dict]:
    from jaxmap.api import load
    from jaxmap.engine.compile_cache import enable_compile_cache

    if not args.no_compile_cache:
        enable_compile_cache()
    t0 = time.perf_counter()
    model = load(args.model, dtype=args.dtype, max_seq_len=args.max_seq_len, progress=False, **parse_wish(args.wish))
    load_s = time.perf_counter() - t0
    if model.tokenizer is None:
        how = ("presets have random weights and no tokenizer" if model.source_path.startswith("preset:")
               else "add its tokenizer.json")
        raise UserError(f"{model.source_path} has no tokenizer, so the bench cannot encode its prompts ({how})")
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


def _worker_llamacpp(args) -> list[dict]:
    """llama.cpp through llama-cpp-python on the same GGUF, its own quantized types, as many threads as CPUs. Its
    Python API generates one sequence at a time, so rows with a batch above 1 are left out (shown as n/a)."""
    from llama_cpp import Llama

    from jaxmap.api import resolve_source

    source = resolve_source(args.model)
    path = os.path.abspath(source.path)
    source.close()
    threads = os.cpu_count() or 1
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=args.max_seq_len, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    load_s = time.perf_counter() - t0
    rows = []
    for n_prompt, batch in args.workload:
        if batch > 1:
            rows.append({"prompt": n_prompt, "batch": batch, "ttft_ms": None, "first_ttft_ms": None,
                         "compile_s": 0.0, "prefill_tps": None, "decode_tps": None, "load_s": load_s,
                         "peak_rss_mib": peak_rss_mib()})
            continue
        (ids,) = prompt_ids(lambda s: llm.tokenize(s.encode("utf-8"), add_bos=False, special=False), n_prompt, 1)
        runs = []
        for i in range(REPEATS + 1):  # the first run warms up, as jaxmap's compiling run does
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            prefill = time.perf_counter() - t0
            llm.reset()
            t0 = time.perf_counter()
            stream = llm.generate(ids, temp=0.0, top_k=1, reset=True)
            first = None
            for n, _ in enumerate(stream, 1):
                if first is None:
                    first = time.perf_counter() - t0
                if n == NEW_TOKENS:
                    break
            total = time.perf_counter() - t0
            if i:
                runs.append((prefill, first, total))
        rows.append({"prompt": n_prompt, "batch": 1, "ttft_ms": _median(r[1] * 1000 for r in runs),
                     "first_ttft_ms": None, "compile_s": 0.0,
                     "prefill_tps": _median(n_prompt / r[0] for r in runs),
                     "decode_tps": _median((NEW_TOKENS - 1) / max(r[2] - r[1], 1e-9) for r in runs),
                     "load_s": load_s, "peak_rss_mib": peak_rss_mib()})
    return rows


def run_worker(impl: str, args, wish: str = "", label: str = "") -> list[dict]:
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
        raise worker_failure(out, label or impl)
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker_failure(out: subprocess.CompletedProcess, label: str) -> Exception:
    """A worker's one-line user error stays one line (status 2); a crash keeps its traceback (status 1)."""
    lines = out.stderr.strip().splitlines()
    if out.returncode == UserError.exit_code and lines and lines[-1].startswith("error: "):
        message = lines[-1].removeprefix("error: ")
        return UserError(message if label == "jaxmap" else f"{label}: {message}")
    sys.stderr.write(out.stderr)
    return SystemExit(f"error: the {label} benchmark failed (exit {out.returncode})")


def print_table(results: dict[str, list[dict]]) -> None:
    head = (f"{'impl':<13} {'prompt':>6} {'batch':>5} {'TTFT ms':>8} {'1st TTFT':>8} {'compile s':>9} "
            f"{'prefill t/s':>11} {'decode t/s':>10} {'peak RSS MiB':>12}")
    print(head)
    print("-" * len(head))
    for impl, rows in results.items():
        for r in rows:
            if r["decode_tps"] is None:
                print(f"{impl:<13} {r['prompt']:>6} {r['batch']:>5} {'n/a (one sequence at a time)':>40}")
                continue
            first = f"{r['first_ttft_ms']:.0f}" if r["first_ttft_ms"] is not None else "-"
            print(f"{impl:<13} {r['prompt']:>6} {r['batch']:>5} {r['ttft_ms']:>8.0f} {first:>8} "
                  f"{r['compile_s']:>9.2f} {r['prefill_tps']:>11.1f} {r['decode_tps']:>10.1f} "
                  f"{r['peak_rss_mib']:>12.0f}")
    ours = next((rows for impl, rows in results.items() if impl not in PEERS), None)
    for peer in PEERS:
        if ours is None or peer not in results:
            continue
        print(f"\nratio jaxmap / {peer} (higher is better for jaxmap):")
        for a, b in zip(ours, results[peer], strict=True):
            if b["decode_tps"] is None:
                continue
            print(f"  prompt {a['prompt']:>4} batch {a['batch']}: decode {a['decode_tps'] / b['decode_tps']:.2f}x, "
                  f"prefill {a['prefill_tps'] / b['prefill_tps']:.2f}x, "
                  f"TTFT {b['ttft_ms'] / a['ttft_ms']:.2f}x")


PEERS = ("transformers", "llama.cpp")


WISH_INTS = ("tp", "pp")
WISH_TEXTS = ("devices", "device_layers", "topology", "max_memory", "isq", "imatrix", "layer_mode", "offload_folder")
WISH_COMMAS = ("devices", "max_memory")  # values such as devices=0,2 hold the separator
MAKE_WISH_KEYS = ("tp", "pp", "devices", "device_layers", "topology", "max_memory")


def parse_wish(text: str) -> dict:
    """A layout's ``KEY=VALUE,...`` as load() keywords: only placement keys (the bench sets the model, dtype and
    sequence length itself), tp and pp as positive whole numbers."""
    wish: dict = {}
    key = None
    for piece in text.split(",") if text.strip() else []:
        name, sep, value = piece.partition("=")
        if not sep and key in WISH_COMMAS:
            wish[key] += "," + piece.strip()
            continue
        key = name.strip()
        if not sep:
            raise UserError(f"{piece.strip()!r} is not KEY=VALUE; write e.g. tp=2,pp=1")
        if key not in WISH_INTS + WISH_TEXTS:
            raise UserError(f"unknown key {key!r}; use {', '.join(WISH_INTS + WISH_TEXTS)}")
        if key in wish:
            raise UserError(f"{key} is given twice")
        wish[key] = value.strip()
    for key, value in wish.items():
        if not value:
            raise UserError(f"{key}= has no value")
        if key in WISH_INTS:
            if not re.fullmatch(r"\d+", value) or int(value) < 1:
                raise UserError(f"{key} must be a positive whole number, got {value!r}")
            wish[key] = int(value)
    return wish


def parse_layouts(items: Sequence[str]) -> dict[str, str]:
    """``--layouts NAME:WISH ...`` -> {name: wish}, every wish checked before any worker spends minutes loading."""
    from jaxmap.planning.wishes import make_wish

    layouts: dict[str, str] = {}
    for item in items:
        name, _, wish = item.partition(":")
        name = name.strip()
        if not name or "=" in name:
            raise UserError(f"--layouts {item!r} is not NAME:WISH; write e.g. f32:isq=none tp2:tp=2,pp=1")
        if name in layouts:
            raise UserError(f"--layouts names {name!r} twice; give each layout its own name")
        try:
            keywords = parse_wish(wish)
            make_wish(**{k: v for k, v in keywords.items() if k in MAKE_WISH_KEYS})
            if keywords.get("layer_mode", "auto") not in LAYER_MODES:
                raise UserError(f"layer_mode must be one of {', '.join(LAYER_MODES)}, got {keywords['layer_mode']!r}")
        except UserError as exc:
            raise UserError(f"--layouts {name}: {exc}") from None
        layouts[name] = wish
    return layouts


def check_model(model: str | None, compare_transformers: bool, compare_llamacpp: bool = False) -> None:
    """``-m`` must resolve before any worker starts; transformers also needs real weights on disk, llama.cpp a
    GGUF file and llama-cpp-python."""
    from jaxmap.api import resolve_source

    source = resolve_source(model)
    try:
        if compare_transformers and str(source.path).startswith("preset:"):
            raise UserError(f"--compare-transformers needs weights on disk; {source.path} is a random-weight preset")
        if compare_llamacpp and not str(source.path).endswith(".gguf"):
            raise UserError(f"--compare-llamacpp runs llama.cpp on a GGUF file; {source.path} is not one")
    finally:
        source.close()
    if compare_llamacpp:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            raise UserError("--compare-llamacpp needs llama-cpp-python: pip install -e \".[bench]\" (it builds "
                            "llama.cpp from source, about 10 minutes)")


def configure(args) -> None:
    """Check the numeric flags and set the run's constants; the parent and each worker both call it."""
    global NEW_TOKENS, REPEATS
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    if args.new_tokens < 2:
        raise UserError(f"--new-tokens must be at least 2 (one for TTFT, the rest for decode), got {args.new_tokens}")
    if args.max_seq_len < 1:
        raise UserError(f"--max-seq-len must be at least 1, got {args.max_seq_len}")
    NEW_TOKENS, REPEATS = args.new_tokens, args.repeats
    args.workload = parse_workload(args.workload)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m jaxmap.bench", description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None, help="as for generate (default: SmolLM2-135M GGUF)")
    parser.add_argument("--dtype", default="float32",
                        help="compute dtype (default float32, what transformers runs; ISQ types via --layouts, "
                             "e.g. f32:isq=none q8:isq=Q8_0 native:isq=native)")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--workload", default=WORKLOAD,
                        help=f"comma-separated PROMPTxBATCH items (default: {WORKLOAD})")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed runs per row; medians are reported")
    parser.add_argument("--compare-transformers", action="store_true",
                        help="also run Hugging Face transformers (needs torch and transformers) on the same weights")
    parser.add_argument("--compare-llamacpp", action="store_true",
                        help="also run llama.cpp (llama-cpp-python, the bench extra) on the same GGUF in its own "
                             "quantized types; batch-1 rows only")
    parser.add_argument("--no-compile-cache", action="store_true", help="compile from scratch (cold start)")
    parser.add_argument("--layouts", nargs="+", default=None, metavar="NAME:WISH",
                        help="jaxmap layouts to compare in one run, e.g. 1dev:devices=0 tp3:tp=3,pp=1 pp2:pp=2,tp=1; "
                             f"keys: {', '.join(WISH_INTS + WISH_TEXTS)}")
    parser.add_argument("--cpu-devices", type=int, default=None,
                        help="give each run N virtual CPU devices (XLA_FLAGS), to measure mapping overhead on CPU")
    parser.add_argument("--serving", action="store_true",
                        help="serving workload: a server on 127.0.0.1, 1/4/8 concurrent streaming clients against "
                             "the same requests one after another (aggregate tokens/s, TTFT p50/p99)")
    parser.add_argument("--moe", action="store_true",
                        help="MoE workload: decode tokens/s of two random Qwen3-MoE-shaped models with the same "
                             "active size and 8 versus 64 experts (jaxmap.bench_moe)")
    parser.add_argument("--moe-apart", action="store_true",
                        help="MoE placement workload: prefill and decode tokens/s of a random 64-expert model with "
                             "its experts on the layer's device, computed on another CPU device (--cpu-moe) and "
                             "streamed from host memory (-ot exps=host) (jaxmap.bench_moe)")
    parser.add_argument("--profile", action="store_true",
                        help="trace the decode of the first --layouts entry (or the default layout) at batch 1 and "
                             "print where a token's time goes, by kind of op (jax.profiler over XLA's thunks)")
    parser.add_argument("--isq", default=None,
                        help="with --serving, --moe or --moe-apart: in-situ quantization type (e.g. Q8_0)")
    parser.add_argument("--worker", choices=("jaxmap", "transformers", "llama.cpp"), help=argparse.SUPPRESS)
    parser.add_argument("--wish", default="", help=argparse.SUPPRESS)
    return parser


def run_worker_here(args) -> int:
    """The worker process's body: one implementation, its rows as JSON on the last line of standard output."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    configure(args)
    workers = {"jaxmap": _worker_jaxmap, "transformers": _worker_transformers, "llama.cpp": _worker_llamacpp}
    rows = workers[args.worker](args)
    print(json.dumps(rows))
    return 0


def run(args) -> int:
    """Check every flag, then run each implementation (and layout) in its own worker and print the table."""
    from jaxmap.config.dtypes import parse_dtype

    configure(args)
    if args.cpu_devices is not None and args.cpu_devices < 1:
        raise UserError(f"--cpu-devices must be at least 1, got {args.cpu_devices}")
    parse_dtype(args.dtype)
    if args.serving:
        return run_serving(args)
    if args.moe:
        return run_moe(args)
    if args.moe_apart:
        return run_moe_apart(args)
    if args.profile:
        return run_profile(args)
    layouts = parse_layouts(args.layouts) if args.layouts else None
    check_model(args.model, args.compare_transformers, args.compare_llamacpp)
    if layouts:
        results = {name: run_worker("jaxmap", args, wish, f"layout {name}") for name, wish in layouts.items()}
    else:
        results = {"jaxmap": run_worker("jaxmap", args)}
    if args.compare_transformers:
        results["transformers"] = run_worker("transformers", args)
    if args.compare_llamacpp:
        results["llama.cpp"] = run_worker("llama.cpp", args)
    print(f"model: {args.model or 'SmolLM2-135M-Instruct (default GGUF)'}, {NEW_TOKENS} new tokens, "
          f"dtype {args.dtype or 'default'}, {os.cpu_count()} CPUs, median of {REPEATS} timed runs")
    print_table(results)
    return 0


def run_serving(args) -> int:
    """The serving workload, in this process (it measures the server, not a worker's start-up)."""
    from jaxmap.api import load
    from jaxmap.engine.compile_cache import enable_compile_cache
    from jaxmap.serving import SERVE_PREFILL_CHUNK
    from jaxmap.serving.bench import format_rows, format_stall, prefill_stall, serving_bench

    if not args.no_compile_cache:
        enable_compile_cache()
    model = load(args.model, dtype=args.dtype, max_seq_len=args.max_seq_len, max_batch_size=8, progress=False,
                 isq=args.isq, prefill_chunk=SERVE_PREFILL_CHUNK)  # as python -m jaxmap.serve runs
    rows = serving_bench(model, max_tokens=NEW_TOKENS)
    print(f"serving: model {args.model or 'default'}, dtype {args.dtype}, isq {args.isq or 'none'}, "
          f"{NEW_TOKENS} max tokens per request, 8 batch slots, {os.cpu_count()} CPUs")
    print(format_rows(rows))
    stall = []
    for chunk in (SERVE_PREFILL_CHUNK, 2048):  # serve's chunk, and generate's (a 1536-token prompt in one step)
        long_model = load(args.model, dtype=args.dtype, max_seq_len=2048, max_batch_size=8, progress=False,
                          isq=args.isq, prefill_chunk=chunk)
        stall.append(prefill_stall(long_model))
        del long_model
    print("a 1536-token prompt joins 7 streams:")
    print(format_stall(stall))
    return 0


def _run_in_process(args, title: str, rows, fmt) -> int:
    """One of the MoE workloads in this process: the compilation cache as asked, a header line, then its table."""
    from jaxmap.engine.compile_cache import enable_compile_cache

    if not args.no_compile_cache:
        enable_compile_cache()
    out = rows(NEW_TOKENS, REPEATS, dtype=args.dtype, isq=args.isq)
    print(f"{title}{NEW_TOKENS} new tokens at batch 1, dtype {args.dtype}, isq {args.isq or 'none'}, "
          f"{os.cpu_count()} CPUs, median of {REPEATS} timed runs")
    print(fmt(out))
    return 0


def run_moe(args) -> int:
    """The MoE decode workload, in this process (:mod:`jaxmap.bench_moe`)."""
    from jaxmap.bench_moe import format_rows, moe_rows

    return _run_in_process(args, "moe: ", moe_rows, format_rows)


def run_moe_apart(args) -> int:
    """The MoE placement workload, in this process, on 2 virtual CPU devices where jax has not started yet."""
    if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
    from jaxmap.bench_moe import apart_rows, format_apart

    return _run_in_process(args, "moe-apart: 128-token prompt, ", apart_rows, format_apart)


def run_profile(args) -> int:
    """Where a decode token's time goes (:mod:`jaxmap.bench_profile`), in this process."""
    from jaxmap.api import load
    from jaxmap.bench_profile import decode_profile, format_profile
    from jaxmap.engine.compile_cache import enable_compile_cache

    layouts = parse_layouts(args.layouts) if args.layouts else {"default": ""}
    name, wish = next(iter(layouts.items()))
    check_model(args.model, False)
    if not args.no_compile_cache:
        enable_compile_cache()
    model = load(args.model, dtype=args.dtype, max_seq_len=args.max_seq_len, progress=False, **parse_wish(wish))
    if model.tokenizer is None:
        raise UserError(f"{model.source_path} has no tokenizer, so the bench cannot encode its prompt")
    prompt = prompt_ids(lambda s: model.tokenizer.encode(s, add_special_tokens=False), args.workload[0][0], 1)[0]
    profile = decode_profile(model, prompt, min(NEW_TOKENS, 64))
    modes = ", ".join(sorted({s.mode for s in model.engine.stages}))
    print(f"decode profile: model {args.model or 'SmolLM2-135M-Instruct (default GGUF)'}, layout {name} "
          f"({wish or 'automatic'}; {modes}), dtype {args.dtype}, batch 1, {len(prompt)}-token prompt, "
          f"{os.cpu_count()} CPUs")
    print(format_profile(profile))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(run_worker_here if args.worker else run, args)


if __name__ == "__main__":
    sys.exit(main())
