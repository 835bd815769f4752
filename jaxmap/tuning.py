"""What ``python -m jaxmap.tune`` runs: each candidate layout in a fresh worker process (so compile caches and
memory do not leak between candidates), timed on a short workload and scored against the float32 model's logits.

The workers are ``python -m jaxmap.tune --worker SPEC``; :func:`worker` is their body. The parent
(:func:`run_candidates`) keeps the budget, the progress bar and the verdicts; the argument parsing and the table are
:mod:`jaxmap.cli.tune`'s.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxmap.errors import UserError
from jaxmap.planning.tune_candidates import Candidate
from jaxmap.progress import Progress
from jaxmap.workload import median, peak_rss_mib, prompt_ids

log = logging.getLogger(__name__)
REFERENCE = {"dtype": "float32", "isq": "none", "layer_mode": "auto", "tp": 1, "pp": 1}


def worker(spec: dict) -> dict:
    """Load one layout, score its logits on the quality text (or write them, for the reference) and time the
    workload. Returns the row; writes the layout's plan to ``spec["plan"]``."""
    from jaxmap.api import load
    from jaxmap.calibrate.imatrix import calibration_ids
    from jaxmap.calibrate.quality import Scores
    from jaxmap.engine.compile_cache import enable_compile_cache

    enable_compile_cache()
    t0 = time.perf_counter()
    model = load(spec["model"], max_seq_len=spec["max_seq_len"], progress=False, save_plan=spec.get("plan"),
                 **spec["layout"])
    load_s = time.perf_counter() - t0
    if model.tokenizer is None:
        raise UserError(f"{model.source_path} has no tokenizer, so tune cannot encode its workload")
    ids = calibration_ids(model.tokenizer, None, spec["quality_tokens"], what="quality text")
    (logits,) = model.forward_logits([ids])
    row: dict = {"load_s": load_s}
    if spec.get("reference_out"):
        np.save(spec["reference_out"], logits)
    else:
        scores = Scores()
        scores.add(logits, ids, np.load(spec["reference"]))
        row["kl"] = scores.row()["kl"]
        decode, ttft = [], []
        for n_prompt, batch in spec["workload"]:
            prompts = prompt_ids(lambda s: model.tokenizer.encode(s, add_special_tokens=False), n_prompt, batch)
            model.generate(prompts, max_new_tokens=spec["new_tokens"], stop_at_eos=False)  # compiles
            runs = [model.generate(prompts, max_new_tokens=spec["new_tokens"], stop_at_eos=False)[0].stats
                    for _ in range(spec["repeats"])]
            decode.append(median(r.decode_tokens_per_s for r in runs))
            ttft.append(median(r.ttft_s * 1000 for r in runs))
        row.update(decode_tps=median(decode), ttft_ms=median(ttft))
    row["peak_rss_mib"] = peak_rss_mib()
    return row


def _spawn(spec: dict, label: str) -> dict:
    """One worker process; a user error in it is a one-line failure of that candidate."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        out = subprocess.run([sys.executable, "-m", "jaxmap.tune", "--worker", f.name], capture_output=True,
                             text=True, env=dict(os.environ))
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        last = lines[-1].removeprefix("error: ") if lines else f"exit {out.returncode}"
        log.debug("%s failed:\n%s", label, out.stderr)
        return {"failed": last}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_candidates(model: str | None, candidates: list[Candidate], *, workload: list[tuple[int, int]],
                   new_tokens: int, repeats: int, max_seq_len: int, quality_tokens: int, max_kl: float,
                   budget_s: float | None, progress: bool = True,
                   work_dir: str | Path | None = None) -> tuple[list[dict], str | None]:
    """Run the reference, then each fitting candidate until the budget is spent. Returns one row per candidate
    (``verdict``: chosen, rejected, failed, refused or not tried) and the chosen one's plan file (in ``work_dir``,
    where the reference logits and every candidate's plan are written: the caller copies the plan and removes the
    folder; a new temporary folder when None), or None when none passed."""
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="jaxmap-tune-"))
    base = {"model": model, "max_seq_len": max_seq_len, "workload": workload, "new_tokens": new_tokens,
            "repeats": repeats, "quality_tokens": quality_tokens, "reference": str(work / "reference.npy")}
    t0 = time.perf_counter()
    fitting = [c for c in candidates if c.refused is None]
    bar = Progress(len(fitting) + 1, "tune", enabled=progress, unit="layouts")
    ref = _spawn({**base, "layout": REFERENCE, "reference_out": base["reference"]}, "reference")
    bar.update()
    if "failed" in ref:
        bar.close()
        raise UserError(f"the float32 reference run failed: {ref['failed']}")
    rows = []
    for i, cand in enumerate(candidates):
        row = {"candidate": cand.name, **cand.load_kwargs()}
        if cand.refused is not None:
            row.update(verdict="refused", why=cand.refused)
        elif budget_s is not None and time.perf_counter() - t0 > budget_s:
            row.update(verdict="not tried", why=f"--budget {budget_s:g} s spent")
        else:
            got = _spawn({**base, "layout": cand.load_kwargs(), "plan": str(work / f"plan-{i}.yaml")}, cand.name)
            bar.update()
            row.update(got)
            if "failed" in got:
                row.update(verdict="failed", why=got["failed"])
            elif got["kl"] > max_kl:
                row.update(verdict="rejected", why=f"KL {got['kl']:.4f} > --max-kl {max_kl:g}")
            else:
                row.update(verdict="ok", plan=str(work / f"plan-{i}.yaml"))
        rows.append(row)
    bar.close()
    passed = [r for r in rows if r["verdict"] == "ok"]
    if not passed:
        return rows, None
    best = max(passed, key=lambda r: r["decode_tps"])
    best["verdict"] = "chosen"
    return rows, best["plan"]
