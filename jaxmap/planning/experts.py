"""Routed experts as placement units: where a MoE layer's experts live when they leave their layer's accelerator, and
how each phase computes them there.

Pure data, no jax. Experts are most of a mixture of experts' bytes and little of its work per token (a token reads
k of E), so when a model does not fit, the automatic fit moves routed experts off the accelerators first, the last
layers' first, before any attention layer or KV cache leaves (issue 17); attention, norms, router and shared experts
stay with their layer. Experts in host memory are either computed on the CPU device (the hidden state goes there and
back: ``2 x batch x tokens x hidden`` bytes per layer) or streamed to the layer's device (the routed experts' slices
while tokens x k < E, else the layer's whole stack; jaxmap.engine.remote_experts runs both); as llama.cpp does (its
``GGML_OP_OFFLOAD_MIN_BATCH``), a phase whose batch has fewer than 32 tokens computes them on the CPU, and a larger
one (a prompt chunk) has them copied in, the CPU being too slow for it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

from jaxmap.config import ModelConfig
from jaxmap.config.dtypes import parse_dtype
from jaxmap.config.hardware import Hardware
from jaxmap.errors import UserError
from jaxmap.families import layer_param_specs, outer_param_specs, stacked_experts
from jaxmap.planning.device_map import ExpertPlacement, format_bytes
from jaxmap.planning.fit import Budgets, Fill, expert_bytes, moe_layers
from jaxmap.planning.isq_types import layer_types

# The expert memory kinds the engine runs (jaxmap.engine.remote_experts) and the automatic fit may choose: computed
# on the CPU device (decode) or streamed (prefill) from host memory, streamed from host memory, read from disk.
RUNNABLE_KINDS = ("cpu", "host", "disk")

# Tokens per step from which experts held in host memory are copied to the accelerator rather than computed on the
# CPU (llama.cpp's GGML_OP_OFFLOAD_MIN_BATCH, 32).
OFFLOAD_MIN_BATCH = 32


def phases(kind: str, max_batch_size: int, chunk: int) -> tuple[str, str]:
    """(decode, prefill): how each phase computes experts of this memory kind (``cpu``, ``stream`` or ``device``)."""
    if kind == "device":
        return "device", "device"
    if kind in ("host", "disk"):
        return "stream", "stream"
    return tuple("stream" if tokens >= OFFLOAD_MIN_BATCH else "cpu"  # type: ignore[return-value]
                 for tokens in (max_batch_size, max_batch_size * chunk))


def moved_bytes(config: ModelConfig, how: str, tokens: int, experts: int, dtype: str) -> int:
    """Bytes one MoE layer moves over the host link in a step of ``tokens`` tokens: the hidden state there and back
    when computed on the CPU, the routed experts' slices when streamed while ``tokens x k < E`` (a decode step: the
    engine moves one slice per (token, expert) pair), else the layer's whole expert stack (``experts`` bytes)."""
    if how == "cpu":
        return 2 * tokens * config.hidden_size * parse_dtype(dtype).itemsize
    if how == "stream":
        pairs = tokens * config.num_experts_per_tok
        return experts * pairs // config.num_experts if pairs < config.num_experts else experts
    return 0


def auto_experts(config: ModelConfig, hardware: Hardware, budgets: Budgets, dtype: str, isq: list[str | None],
                 native_types: Mapping[str, str] | None, stored: Mapping[str, int] | None, max_batch_size: int,
                 chunk: int, allow_disk: bool,
                 run: Callable[[dict[int, tuple[int, int]], int], tuple[Fill, object]]) -> tuple[
                     tuple[Fill, object], list[ExpertPlacement], list[str]] | None:
    """The fewest routed experts (last layers first) whose leaving the accelerators lets every layer stay resident
    there. ``run(apart, apart_host)`` is the planner's layer fill. None when the model has no routed experts or
    when even the most experts host memory takes leave layers streaming (the plain layer fill decides then)."""
    layers = moe_layers(config)
    if not layers:
        return None
    cpu_compute = hardware.default_platform != "cpu" and "cpu" in RUNNABLE_KINDS
    host_kind = "cpu" if cpu_compute else "host"
    allow_disk = allow_disk and "disk" in RUNNABLE_KINDS
    room = budgets.host.usable
    room = 1 << 62 if room is None else room
    sizes = {i: expert_bytes(config, i, 1, dtype, {k: t.final for k, t in layer_types(
        config, i, 1, isq[i], native_types).items()}, stored) for i in layers}

    def placed(m: int) -> tuple[dict[int, tuple[str, int]], int] | None:
        """The last ``m`` MoE layers' experts: in host memory while it has room, then on disk."""
        out, used = {}, 0
        for i in reversed(layers[len(layers) - m:]):
            if used + sizes[i] <= room:
                used += sizes[i]
                out[i] = (host_kind, sizes[i])
            elif allow_disk:
                out[i] = ("disk", sizes[i])
            else:
                return None
        return out, used

    def attempt(m: int):
        where = placed(m)
        if where is None:
            return None
        kinds, used = where
        apart = {}
        for i, (kind, size) in kinds.items():
            decode, prefill = phases(kind, max_batch_size, chunk)
            apart[i] = (size, 2 * size if "stream" in (decode, prefill) else 0)
        try:
            return run(apart, used), kinds
        except UserError:  # this many experts apart still leaves no layout
            return None

    def resident(result) -> bool:
        return result is not None and all(k == "device" for k in result[0][0].kinds)

    lo, hi = 1, len(layers)
    while hi >= 1 and placed(hi) is None:  # host memory (and disk, where allowed) holds at most this many
        hi -= 1
    if hi < 1:
        return None
    best = attempt(hi)
    if not resident(best):
        # even every expert host memory holds leaves layers streaming: the plain layer fill decides (a streamed
        # layer moves its experts with it; experts apart from a streamed layer are not run)
        return None
    while lo < hi:  # the fewest experts apart that keep every layer resident
        mid = (lo + hi) // 2
        trial = attempt(mid)
        if resident(trial):
            best, hi = trial, mid
        else:
            lo = mid + 1
    (filled, home), kinds = best  # type: ignore[misc]
    experts = []
    for i in sorted(kinds):
        kind, size = kinds[i]
        decode, prefill = phases(kind, max_batch_size, chunk)
        devices = [hardware.host.name] if kind == "cpu" else [filled.devices[i].name]
        experts.append(ExpertPlacement(i, devices, kind, size, decode, prefill, "fit"))
    return (filled, home), experts, explain(config, experts, filled, dtype, max_batch_size, chunk)


def explain(config: ModelConfig, experts: list[ExpertPlacement], filled: Fill | None, dtype: str,
            max_batch_size: int, chunk: int) -> list[str]:
    """``experts of layers 30-47 in host memory, 32.10 GiB; attention and router on cuda[0]`` and what each phase
    moves."""
    out = []
    for kind, label in (("cpu", "in host memory"), ("host", "in host memory"), ("disk", "on disk"),
                        ("device", "on other devices")):
        group = [e for e in experts if e.memory_kind == kind]
        if not group:
            continue
        spans = _spans([e.layer for e in group])
        homes = sorted({d.name for d in filled.devices} if filled is not None else set())
        stay = f"; attention and router on {', '.join(homes)}" if homes else ""
        out.append(f"experts of layers {spans} {label}, {format_bytes(sum(e.bytes for e in group))}{stay}")
        e = group[0]
        for phase, how, tokens in (("decode", e.decode, max_batch_size), ("prefill", e.prefill,
                                                                           max_batch_size * chunk)):
            what = {"cpu": f"computed on {e.devices[0]} (the hidden state moves there and back)",
                    "stream": "streamed to the layer's device", "device": "computed where they are"}[how]
            moved = moved_bytes(config, how, tokens, e.bytes, dtype)
            out.append(f"experts {phase} ({tokens} token{'s' if tokens != 1 else ''} a step): {what}, "
                       f"{format_bytes(moved)} moved per layer"
                       + (f" (the CPU computes steps under {OFFLOAD_MIN_BATCH} tokens, as llama.cpp)"
                          if kind == "cpu" and phase == "decode" else ""))
    return out


def _spans(layers: list[int]) -> str:
    out: list[list[int]] = []
    for i in sorted(layers):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in out)


# ---- llama.cpp's flags: -ot / --override-tensor, --cpu-moe, --n-cpu-moe ---------------------------------------------

@dataclasses.dataclass(frozen=True)
class Forced:
    """Routed experts of ``layer`` placed by a flag: ``place`` cpu, host, disk or a device name."""

    layer: int
    place: str
    source: str


def tensor_names(config: ModelConfig, spec, stacked: Mapping[str, list[str]] | None = None) -> list[str]:
    """The names a placement regex is searched in for one tensor: jaxmap's (the Hugging Face name, stacked experts
    without their index), the GGUF name ``plan --json`` shows, and for stacked experts every per-expert Hugging Face
    name the folder stores (``...experts.7.gate_proj.weight``), so that a recipe written for either file reaches
    the same tensors."""
    stacked = stacked_experts(config) if stacked is None else stacked
    names = [spec.hf_name, spec.gguf_name] + list(stacked.get(spec.hf_name, []))
    return [n for n in names if n]


def explicit_experts(config: ModelConfig, hardware: Hardware, wish) -> list[Forced]:
    """The expert placements ``-ot``, a topology's ``/regex/`` entries with a device, ``--n-cpu-moe`` and
    ``--cpu-moe`` ask for, in that precedence (``-ot``: the first match wins; a topology: its last match, as
    documented), checked: one line for a flag the model or hardware cannot take."""
    overrides, cpu_moe, n_cpu_moe = wish.overrides, wish.cpu_moe, wish.n_cpu_moe
    placing = wish.topology is not None and any(e.device for e in wish.topology.patterns)
    if not overrides and not cpu_moe and n_cpu_moe is None and not (placing and moe_layers(config)):
        return []
    layers = moe_layers(config)
    name = config.name or "the model"
    n = config.num_hidden_layers
    if (cpu_moe or n_cpu_moe is not None) and not layers:
        flag = "--cpu-moe" if cpu_moe else "--n-cpu-moe"
        raise UserError(f"{flag}: {name} is a dense model (no routed experts to place on the CPU)")
    if n_cpu_moe is not None and (isinstance(n_cpu_moe, bool) or not isinstance(n_cpu_moe, int) or n_cpu_moe < 0
                                  or n_cpu_moe > n):
        raise UserError(f"--n-cpu-moe {n_cpu_moe}: {name} has {n} layers (write 0 to {n})")
    for o in overrides:
        if o.place not in ("cpu", "host", "disk") and hardware.find(o.place) is None:
            raise UserError(f"-ot {o.text!r}: names {hardware.lacks(o.place)}")
    expert_names: dict[int, list[str]] = {}
    other_names: list[str] = []
    stacked = stacked_experts(config)
    for i in range(n):
        for spec in layer_param_specs(config, i).values():
            if spec.role == "expert":
                expert_names.setdefault(i, []).extend(tensor_names(config, spec, stacked))
            else:
                other_names += tensor_names(config, spec, stacked)
    other_names += [t for s in outer_param_specs(config).values() for t in tensor_names(config, s, stacked)]
    out: dict[int, Forced] = {}
    for o in overrides:
        rx = re.compile(o.pattern)
        hits = [i for i in layers if any(rx.search(t) for t in expert_names[i])]
        if not hits:
            other = next((t for t in other_names if rx.search(t)), None)
            if other is not None:
                raise UserError(f"-ot {o.text!r} matches {other}, which is not a routed expert tensor: jaxmap places "
                                "routed experts by tensor, whole layers with -n or a topology")
            sample = expert_names[layers[0]][:2] if layers else other_names[:2]
            raise UserError(f"-ot {o.text!r} matches no tensor of {name} (names look like {', '.join(sample)})")
        for i in hits:
            out.setdefault(i, Forced(i, o.place, f"-ot {o.text}"))
    topology = wish.topology
    if topology is not None:  # /regex/ entries with a device: the last match wins, as for the outer weights
        for i in layers:
            entry = next((e for e in reversed(topology.patterns) if e.device is not None
                          and any(re.search(e.pattern, t) for t in expert_names[i])), None)
            if entry is not None:
                place = entry.device
                if place not in ("cpu", "host", "disk") and hardware.find(place) is None:
                    raise UserError(f"{topology.source}: entry {entry.where} names {hardware.lacks(place)}")
                out.setdefault(i, Forced(i, place, f"topology {entry.key}"))
    if n_cpu_moe:
        for i in layers:
            if i < n_cpu_moe:
                out.setdefault(i, Forced(i, "cpu", f"--n-cpu-moe {n_cpu_moe}"))
    if cpu_moe:
        for i in layers:
            out.setdefault(i, Forced(i, "cpu", "--cpu-moe"))
    return [out[i] for i in sorted(out)]


def forced_apart(config: ModelConfig, forced: list[Forced], dtype: str, isq: list[str | None],
                 native_types: Mapping[str, str] | None, stored: Mapping[str, int] | None, max_batch_size: int,
                 chunk: int) -> tuple[dict[int, tuple[int, int]], int]:
    """What the layer fill must know of forced placements: ``{layer: (bytes off the layer's device, buffers)}`` for
    experts off their layer's device, and the host memory they take."""
    apart, host = {}, 0
    for f in forced:
        if f.place not in ("cpu", "host", "disk") and not f.place.startswith("cpu["):
            continue  # another accelerator: the fill does not weigh it (the plan's accounting does)
        size = expert_bytes(config, f.layer, 1, dtype, {k: t.final for k, t in layer_types(
            config, f.layer, 1, isq[f.layer], native_types).items()}, stored)
        kind = _kind(f.place)
        decode, prefill = phases(kind, max_batch_size, chunk)
        apart[f.layer] = (size, 2 * size if "stream" in (decode, prefill) else 0)
        host += size if kind in ("cpu", "host") else 0
    return apart, host


def _kind(place: str) -> str:
    return place if place in ("cpu", "host", "disk") else "cpu" if place.startswith("cpu[") else "device"


def finish(config: ModelConfig, hardware: Hardware, forced: list[Forced], stages, dtype: str,
           stored: Mapping[str, int] | None, max_batch_size: int, chunk: int) -> list[ExpertPlacement]:
    """Forced placements as the plan's entries, against the final stages (their devices and types); an expert
    placed on its own layer's device needs no entry."""
    out = []
    for f in forced:
        stage = next(s for s in stages if s.start <= f.layer < s.end)
        types = stage.tensor_isq[f.layer - stage.start] if stage.tensor_isq is not None else {}
        kind = _kind(f.place)
        if kind == "device" and [hardware.find(f.place).name] == stage.devices:  # type: ignore[union-attr]
            continue
        devices = ([hardware.host.name] if f.place == "cpu" else [f.place] if kind in ("cpu", "device")
                   else list(stage.devices))
        tp = 1 if kind in ("cpu", "device") else stage.tp
        size = expert_bytes(config, f.layer, tp, stage.dtype, types, stored) * tp
        decode, prefill = phases(kind, max_batch_size, chunk)
        out.append(ExpertPlacement(f.layer, devices, kind, size, decode, prefill, f.source))
    return out
