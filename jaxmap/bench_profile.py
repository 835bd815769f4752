"""``python -m jaxmap.bench --profile``: where one decode token's time goes, op by op.

The decode of a loaded model is traced with ``jax.profiler`` (XLA:CPU records every thunk it runs: one event per
fused op, named as in the optimised HLO), and each op is put in a kind by what the compiled decode program says it
is: ``projections`` (a product with a weight: the quantized or float matrix-vector products), ``attention and KV
cache`` (reads of the cache bucket, the scores and the weighted values, the cache write), ``LM head and sampling``
(anything over the vocabulary), and ``other`` (norms, RoPE, residual adds, softmax's pieces). Ops may run side by
side on the CPU's cores, so their summed time can exceed the wall time per token; both are printed.

Only one- and multi-layer programs of resident stages (unrolled or scanned) are read: per-layer, streamed and disk
stages run many small programs whose HLO is not looked up here.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile
from typing import Any

KINDS = ("projections", "attention and KV cache", "LM head and sampling", "other")
_CONTAINERS = ("while", "conditional", "call")  # their bodies' ops are events of their own
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) (\w[\w\-]*)\((.*)$")


@dataclasses.dataclass
class OpRow:
    name: str
    kind: str
    shape: str
    ms: float  # per decode token
    calls: float  # per decode token


@dataclasses.dataclass
class DecodeProfile:
    wall_ms: float  # per decode token, from the traced generate's own timing
    tokens: int  # decode steps traced
    rows: list[OpRow]

    def by_kind(self) -> dict[str, tuple[float, float]]:
        out = {k: [0.0, 0.0] for k in KINDS}
        for r in self.rows:
            out[r.kind][0] += r.ms
            out[r.kind][1] += r.calls
        return {k: (v[0], v[1]) for k, v in out.items()}


def _instructions(hlo: str) -> dict[str, tuple[str, str, str]]:
    """op name -> (output shape, opcode, the text of what it calls: its fused computation, else its own line)."""
    comps: dict[str, str] = {}
    for block in re.split(r"\n(?=\S)", hlo):  # computations start at column 0
        head = re.match(r"(?:ENTRY )?%?([\w.\-]+) ", block)
        if head:
            comps[head.group(1)] = block
    out = {}
    for line in hlo.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            called = re.search(r"calls=%?([\w.\-]+)", line)
            out[m.group(1)] = (m.group(2), m.group(3), comps.get(called.group(1), line) if called else line)
    return out


def _dims(shape: str) -> list[int]:
    m = re.search(r"\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def classify(name: str, shape: str, opcode: str, body: str, vocab: int) -> str | None:
    """The kind of one op of a decode program (None: a container whose body's ops are counted instead)."""
    if opcode in _CONTAINERS:
        return None
    dims = _dims(shape)
    header = body.splitlines()[0] if body else ""  # a fused computation's parameters, or the op's own line
    if vocab in dims or any(vocab in _dims(s) for s in re.findall(r"\w+\[[\d,]*\]", header)):
        return "LM head and sampling"
    if len(dims) >= 4 or "dynamic-update-slice" in name or opcode == "dynamic-update-slice":
        return "attention and KV cache"  # decode's activations are [batch, tokens, features]; heads add axes
    if "dot" in name or " dot(" in body or "jaxmap_qmatvec" in body:  # XLA's products, or jaxmap's CPU kernel
        return "projections"
    return "other"


def _events(folder: str) -> list[dict[str, Any]]:
    files = sorted(glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)) or sorted(
        glob.glob(f"{folder}/**/*.json.gz", recursive=True))
    if not files:
        raise RuntimeError(f"jax.profiler wrote no trace under {folder}")
    with gzip.open(files[-1], "rt", encoding="utf-8") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]


def decode_profile(model, prompt: list[int], new_tokens: int = 32) -> DecodeProfile:
    """Trace ``new_tokens`` greedy tokens after ``prompt`` (batch 1) and sum each decode op's time per token.

    The trace starts when the first token arrives, so it holds the decode steps only (the prefill's ops are named
    alike); the wall time per token is an untraced run's."""
    import jax

    from jaxmap.engine.engine import attend_bucket

    if new_tokens < 2:
        raise ValueError("a decode profile needs at least 2 new tokens")
    engine = model.engine
    model.generate([prompt], max_new_tokens=new_tokens, stop_at_eos=False)  # compiles every program it needs
    untraced = model.generate([prompt], max_new_tokens=new_tokens, stop_at_eos=False)[0]  # the wall time per token
    with tempfile.TemporaryDirectory(prefix="jaxmap-profile-") as folder:
        started: list[bool] = []

        def start(_row: int, _token: int) -> None:
            if not started:
                jax.profiler.start_trace(folder, create_perfetto_trace=True)
                started.append(True)

        try:
            model.generate([prompt], max_new_tokens=new_tokens, stop_at_eos=False, on_token=start)
        finally:
            if started:
                jax.profiler.stop_trace()
        events = _events(folder)
    steps = new_tokens - 1
    ops: dict[str, tuple[str, str, str]] = {}
    bucket = attend_bucket(len(prompt) + new_tokens, engine.max_seq_len)
    for i, stage in enumerate(engine.stages):
        if stage.mode in ("unrolled", "scan"):
            ops.update(_instructions(engine.compiled_text(i, 1, 1, bucket)))
    total: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for e in events:
        total[e["name"]] += e.get("dur", 0.0)
        calls[e["name"]] += 1
    rows = []
    vocab = model.config.vocab_size
    for name in total:
        shape, opcode, body = ops.get(name, ("?", "fusion", ""))
        kind = classify(name, shape, opcode, body, vocab)
        if kind is not None:
            rows.append(OpRow(name, kind, shape, total[name] / 1000 / steps, calls[name] / steps))
    rows.sort(key=lambda r: -r.ms)
    tps = untraced.stats.decode_tokens_per_s
    return DecodeProfile(1000 / tps if tps else float("nan"), steps, rows)


def format_profile(p: DecodeProfile, top: int = 12) -> str:
    summed = sum(r.ms for r in p.rows)
    lines = [f"wall {p.wall_ms:.2f} ms per decode token ({1000 / p.wall_ms:.1f} tokens/s, {p.tokens} steps traced); "
             f"op time summed over XLA's thunks {summed:.2f} ms (ops may overlap on the cores; the trace adds its "
             "own cost to each)",
             f"{'kind':24s} {'ms/token':>9s} {'share':>6s} {'ops/token':>10s}"]
    for kind, (ms, n) in p.by_kind().items():
        lines.append(f"{kind:24s} {ms:9.2f} {ms / summed if summed else 0:6.0%} {n:10.0f}")
    lines.append(f"top {top} ops: {'ms/token':>9s} {'calls':>6s}  output")
    for r in p.rows[:top]:
        lines.append(f"  {r.name:34s} {r.ms:7.3f} {r.calls:6.1f}  {r.shape}  [{r.kind}]")
    return "\n".join(lines)
