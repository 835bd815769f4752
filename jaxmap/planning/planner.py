"""``plan(config, hardware, wish) -> DeviceMap``: where every layer lives and runs, decided as pure data.

Order of decisions: a base placement (``-n`` by hand, else automatic tensor x pipeline over the accelerators), then
a topology's per-layer devices override it, then consecutive layers on the same devices become one stage. The same
inputs always give the same plan. Automatic rules (mistral.rs's, kept): one device takes everything; several take
tensor parallel over all when the model's dimensions divide, else the largest tp that does with pipeline stages over
the remaining factor (equal layer ranges, earlier stages take the extra layer); devices that fit no grid stay idle
and the reason names them.

``-n`` on CPU-only hardware (the 8 virtual test devices): a bare ordinal N means ``cpu[N]`` and the remainder goes to
the host CPU device ``cpu[0]``, so ``-n 0`` and ``-n 16`` both put everything on ``cpu[0]`` there.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from itertools import groupby

from jaxmap.config import ModelConfig
from jaxmap.config.dtypes import parse_dtype
from jaxmap.config.hardware import Device, Hardware
from jaxmap.errors import UserError
from jaxmap.families import layer_param_specs, outer_param_specs, stacked_experts
from jaxmap.planning import expert_parallel
from jaxmap.planning.device_map import (
    DeviceMap,
    DeviceMemory,
    ExpertPlacement,
    Placement,
    Stage,
    config_fingerprint,
    format_bytes,
)
from jaxmap.planning.experts import auto_experts, explain, explicit_experts, finish, forced_apart, tensor_names
from jaxmap.planning.fit import Budgets, Fill, account, compute_budgets, fill, outer_bytes, pool_for
from jaxmap.planning.isq_types import assign_types, global_of, layer_request
from jaxmap.planning.memory import kv_cache_bytes
from jaxmap.planning.memory import prefill_chunk as prefill_chunk_for
from jaxmap.planning.wishes import Topology, Wish, format_device_layers

_OUTER_ROLES = {"embed": "embedding", "final_norm": "norm", "lm_head": "head"}  # DeviceMap key -> tensor role


@dataclasses.dataclass
class _Base:
    """The placement before a topology: one device group per layer, plus the explanation."""

    layers: list[tuple[Device, ...]]
    strategy: str
    reason: str
    idle: list[Device]
    warnings: list[str]


# ---- tensor-parallel sizes --------------------------------------------------------------------------------------

def tp_problems(config: ModelConfig, tp: int) -> list[str]:
    """Why ``tp`` devices cannot split this model (empty when they can); vocab never blocks (it replicates)."""
    h, kv, f = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    out = []
    if h % tp:
        out.append(f"{h} attention heads do not divide over {tp} devices")
    if kv % tp and tp % kv:
        out.append(f"{kv} kv heads neither divide over {tp} devices nor divide {tp}")
    if f % tp:
        out.append(f"intermediate size {f} does not divide over {tp} devices")
    return out


def valid_tp_sizes(config: ModelConfig) -> list[int]:
    return [t for t in range(1, config.num_attention_heads + 1) if not tp_problems(config, t)]


def _tp_refusal(config: ModelConfig, tp: int) -> UserError:
    allowed = ", ".join(map(str, valid_tp_sizes(config)))
    return UserError(
        f"--tp {tp} does not fit {config.name or 'the model'}: {'; '.join(tp_problems(config, tp))}; "
        f"{config.num_attention_heads} attention heads / {config.num_key_value_heads} kv heads / intermediate size "
        f"{config.intermediate_size} allow tp in {{{allowed}}}"
    )


# ---- device grouping: meshes follow the wires -------------------------------------------------------------------

def _snake_index(coords: tuple[int, ...], sizes: tuple[int, ...]) -> int:
    """Boustrophedon order over a grid (last axis major): consecutive indices are always grid neighbours."""
    index = 0
    for axis in reversed(range(len(coords))):
        c = coords[axis]
        if index % 2:
            c = sizes[axis] - 1 - c
        index = index * sizes[axis] + c
    return index


def wire_order(devices: Sequence[Device]) -> list[Device]:
    """Devices sorted so that neighbours on the fast links sit next to each other: process, then coords, then id."""
    with_coords = [d.coords for d in devices if d.coords]
    sizes = tuple(max(c[i] for c in with_coords) + 1 for i in range(len(with_coords[0]))) if with_coords else ()

    def key(d: Device) -> tuple[int, int, int, int]:
        snake = _snake_index(d.coords, sizes) if d.coords and len(d.coords) == len(sizes) else -1
        return (d.process_index, snake, d.id, d.ordinal)

    return sorted(devices, key=key)


def group_devices(devices: Sequence[Device], pp: int, tp: int) -> tuple[list[list[Device]], list[Device], list[str]]:
    """``pp`` groups of ``tp`` devices; a group stays inside one process and takes coordinate neighbours.

    Returns the groups (stage order), the devices left idle, and notes (a group that had to span processes).
    The engine builds each group's mesh with ``jax.make_mesh`` / ``mesh_utils.create_device_mesh`` over these ids.
    """
    groups: list[list[Device]] = []
    leftovers: list[Device] = []
    for _, devs in groupby(wire_order(devices), key=lambda d: d.process_index):
        devs = list(devs)
        full = len(devs) // tp * tp
        groups += [devs[i:i + tp] for i in range(0, full, tp)]
        leftovers += devs[full:]
    notes = []
    while len(groups) < pp and len(leftovers) >= tp:
        groups.append(leftovers[:tp])
        leftovers = leftovers[tp:]
        notes.append(f"tp group {', '.join(d.name for d in groups[-1])} spans processes (slower links)")
    idle = leftovers + [d for g in groups[pp:] for d in g]
    return groups[:pp], sorted(idle, key=lambda d: (d.platform, d.ordinal)), notes


def split_layers(num_layers: int, parts: int) -> list[tuple[int, int]]:
    """Equal contiguous ranges; the earlier ranges take the extra layers."""
    size, extra = divmod(num_layers, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


# ---- base placements ---------------------------------------------------------------------------------------------

def _pool(hardware: Hardware, wish: Wish) -> list[Device]:
    platform = hardware.default_platform
    if wish.devices is None:
        return hardware.accelerators
    pool = []
    for ordinal in wish.devices:
        dev = hardware.find(f"{platform}[{ordinal}]")
        if dev is None:
            raise UserError(f"--devices names "
                            f"{hardware.lacks(f'{platform}[{ordinal}]', [d.name for d in hardware.accelerators])}")
        pool.append(dev)
    return pool


def _automatic(config: ModelConfig, hardware: Hardware, wish: Wish, pool: list[Device]) -> _Base:
    n, layers = len(pool), config.num_hidden_layers
    valid = valid_tp_sizes(config)
    if wish.tp is not None:
        if wish.tp not in valid:
            raise _tp_refusal(config, wish.tp)
        tp, pp = wish.tp, wish.pp or max(1, min(n // wish.tp, layers))
    elif wish.pp is not None:
        if wish.pp > n:
            raise UserError(f"--pp {wish.pp} needs {wish.pp} devices; {_offer(pool)}")
        tp, pp = max(t for t in valid if t * wish.pp <= n), wish.pp
    else:
        tp = max(t for t in valid if t <= n)
        pp = max(1, min(n // tp, layers))
    if tp * pp > n:
        raise UserError(f"tp={tp} x pp={pp} needs {tp * pp} devices; {_offer(pool)}")
    if pp > layers:
        raise UserError(f"--pp {pp} is more stages than the model's {layers} layers")
    groups, idle, warnings = group_devices(pool, pp, tp)
    per_layer: list[tuple[Device, ...]] = []
    for group, (start, end) in zip(groups, split_layers(layers, pp), strict=True):
        per_layer += [tuple(group)] * (end - start)
    strategy = {(False, False): "single", (True, False): "tensor_parallel", (False, True): "pipeline",
                (True, True): "pipeline_x_tensor"}[(tp > 1, pp > 1)]
    return _Base(per_layer, strategy, _auto_reason(config, wish, n, tp, pp, idle, pool), idle, warnings)


def _offer(pool: Sequence[Device]) -> str:
    return f"{len(pool)} available ({', '.join(d.name for d in pool)})"


def _layout(tp: int, pp: int) -> str:
    if tp > 1 and pp > 1:
        return f"pipeline over {pp} stages x tensor parallel tp={tp}"
    if pp > 1:
        return f"pipeline over {pp} stages"
    return f"tensor parallel over {tp} devices" if tp > 1 else "one device"


def _auto_reason(config: ModelConfig, wish: Wish, n: int, tp: int, pp: int, idle: list[Device],
                 pool: list[Device]) -> str:
    if n == 1:
        return f"one device ({pool[0].name}): everything on it"
    if not wish.is_automatic and (wish.tp or wish.pp):
        asked = " ".join(f"--{k} {v}" for k, v in (("tp", wish.tp), ("pp", wish.pp)) if v)
        reason = f"{_layout(tp, pp)} as asked ({asked})"
    elif tp == n:
        reason = (f"tensor parallel over {n} devices: {config.num_attention_heads} attention heads, "
                  f"{config.num_key_value_heads} kv heads and intermediate size {config.intermediate_size} divide")
    else:
        reason = f"tensor parallel unavailable: {'; '.join(tp_problems(config, n))}; using {_layout(tp, pp)}"
    if tp > 1 and tp % config.num_key_value_heads == 0 and tp > config.num_key_value_heads:
        reason += f"; {config.num_key_value_heads} kv heads replicated on each of the {tp} devices of a stage"
    if idle:
        why = (f"the model has only {config.num_hidden_layers} layers" if pp == config.num_hidden_layers and
               pp * tp < n else f"{n} devices do not fill another tp={tp} group" if not wish.tp and not wish.pp
               else "not needed by the requested layout")
        reason += f"; {len(idle)} device(s) idle ({', '.join(d.name for d in idle)}): {why}"
    return reason


def _manual(config: ModelConfig, hardware: Hardware, pairs: list[tuple[int | None, int]]) -> _Base:
    platform, layers = hardware.default_platform, config.num_hidden_layers
    total = sum(n for _, n in pairs)
    spec = format_device_layers(pairs)
    if total > layers:
        raise UserError(f"-n {spec} places {total} layers but {config.name or 'the model'} has {layers}")
    per_layer: list[tuple[Device, ...]] = []
    for ordinal, count in pairs:
        name = f"{platform}[{0 if ordinal is None else ordinal}]"
        dev = hardware.find(name)
        if dev is None:
            raise UserError(f"-n {spec} names {hardware.lacks(name, [d.name for d in hardware.accelerators])}")
        per_layer += [(dev,)] * count
    host = hardware.host
    per_layer += [(host,)] * (layers - total)
    used = {d.name for g in per_layer for d in g}
    idle = [d for d in hardware.accelerators if d.name not in used]
    if total == 0:
        return _Base(per_layer, "cpu", f"-n {spec}: every layer on the CPU ({host.name})", idle, [])
    left = layers - total
    rest = f"; the remaining {left} layer{'s' if left != 1 else ''} on the CPU ({host.name})" if left > 0 else ""
    placed = ", ".join(f"{n} on {platform}[{0 if o is None else o}]" for o, n in pairs)
    idle_note = f"; idle (no layers from -n): {', '.join(d.name for d in idle)}" if idle else ""
    return _Base(per_layer, "manual", f"-n {spec}: {placed}{rest}{idle_note}", idle, [])


def _apply_topology(base: _Base, topology: Topology, config: ModelConfig, hardware: Hardware) -> int:
    """Topology devices override the base placement; returns how many layers it placed."""
    topology.check_layers(config.num_hidden_layers)
    placed = 0
    for layer in range(config.num_hidden_layers):
        win = topology.winner(layer)
        if win is None or win.device is None:
            continue
        dev = hardware.find(win.device)
        if dev is None:
            raise UserError(f"{topology.source}: entry {win.where} names {hardware.lacks(win.device)}")
        base.layers[layer] = (dev,)
        placed += 1
    base.warnings += [o.message() for o in topology.overrides()]
    used = {d.name for g in base.layers for d in g}
    base.idle = [d for d in hardware.accelerators if d.name not in used]
    return placed


# ---- the plan ----------------------------------------------------------------------------------------------------

def plan(
    config: ModelConfig,
    hardware: Hardware,
    wish: Wish | None = None,
    dtype: str = "float32",
    max_seq_len: int = 4096,
    max_batch_size: int = 1,
    stored_bytes: dict[str, int] | None = None,
    native_types: dict[str, str] | None = None,
    prefill_chunk: int | None = None,
) -> DeviceMap:
    """Decide the device map. Raises :class:`UserError` for a wish the model or hardware cannot take.

    For a checkpoint kept in its own quantized types (``isq="native"``): ``native_types`` maps tensor names to the
    jaxmap types they are stored in (the final types then follow from them) and ``stored_bytes`` to their bytes in
    the file (what a native tensor of unknown type counts); without either, native tensors count as float.
    ``prefill_chunk``: prompt tokens per prefill step (``--prefill-chunk``; :func:`memory.prefill_chunk`'s default),
    which sizes the activations the plan reserves.
    """
    wish = wish or Wish()
    dtype_name = parse_dtype(dtype).name
    expert_parallel.check_wish(config, wish.ep)  # --ep on a dense model, or not dividing the experts: one line
    for flag, value in (("--max-seq-len", max_seq_len), ("--max-batch-size", max_batch_size)):
        if value <= 0:
            raise UserError(f"{flag} must be at least 1, got {value}")
    chunk = prefill_chunk_for(max_seq_len, prefill_chunk)
    pool = pool_for(hardware, _pool(hardware, wish), wish.max_memory)
    budgets = compute_budgets(hardware, pool, wish.max_memory)
    base = (_manual(config, hardware, wish.device_layers) if wish.device_layers is not None
            else _automatic(config, hardware, wish, pool))
    strategy, reason = base.strategy, base.reason
    topology = wish.topology
    placed_by_topology = 0
    if topology is not None:
        placed_by_topology = _apply_topology(base, topology, config, hardware)
        if placed_by_topology == config.num_hidden_layers and (wish.tp or wish.pp):
            raise UserError("the topology places every layer on its own devices, so --tp/--pp have nothing to "
                            "place; drop them, or drop the topology's device entries")
        if placed_by_topology:
            strategy = "manual"
            what = "the topology" if topology.source == "topology" else f"topology {topology.source}"
            reason = (f"{what} places every layer" if placed_by_topology == config.num_hidden_layers else
                      f"{what} places {placed_by_topology} of {config.num_hidden_layers} layers; the rest: "
                      f"{base.reason}")
    if hardware.default_platform != "cpu" and all(d.platform == "cpu" for g in base.layers for d in g):
        strategy = "cpu"
    kinds = ["device"] * config.num_hidden_layers
    notes = list(budgets.notes)
    embed_home: Device | None = None
    experts: list[ExpertPlacement] = []
    expert_notes: list[str] = []
    forced = explicit_experts(config, hardware, wish)
    if wish.is_automatic and wish.auto and not placed_by_topology:
        trial = _stages(base.layers, kinds, config, hardware, wish, dtype_name, [])
        expert_parallel.apply(config, trial, wish.ep)
        trial_outer = _outer(trial, hardware, topology, config, [])
        assign_types(config, trial, trial_outer, wish.isq, native_types)
        memory = account(config, hardware, trial, trial_outer, max_seq_len, max_batch_size, dtype_name, budgets,
                         stored_bytes, chunk, finish(config, hardware, forced, trial, dtype_name, stored_bytes,
                                                     max_batch_size, chunk))
        if not all(m.fits for m in memory):
            over = next(m for m in memory if not m.fits)
            isq = [_layer_isq(wish, i, config) for i in range(config.num_hidden_layers)]
            apart, apart_host = forced_apart(config, forced, dtype_name, isq, native_types, stored_bytes,
                                             max_batch_size, chunk)
            moe = None if forced else auto_experts(
                               config, hardware, budgets, dtype_name, isq, native_types, stored_bytes,
                               max_batch_size, chunk, wish.allow_disk,
                               lambda apart, used: _fill(config, hardware, pool, budgets, dtype_name, isq,
                                                         max_seq_len, max_batch_size, wish, stored_bytes,
                                                         native_types, chunk, apart, used))
            if moe is not None:
                (filled, embed_home), experts, expert_notes = moe  # type: ignore[assignment]
            else:
                filled, embed_home = _fill(config, hardware, pool, budgets, dtype_name, isq, max_seq_len,
                                           max_batch_size, wish, stored_bytes, native_types, chunk, apart,
                                           apart_host)
            notes.append(f"the automatic layout ({strategy}) needs {format_bytes(over.total_bytes)} on {over.device}, "
                         f"which may use {format_bytes(max(0, (over.capacity_bytes or 0) - over.headroom_bytes))}")
            if embed_home is not None:
                table = outer_bytes(config, "embed", dtype_name, global_of(trial), 1, stored_bytes, native_types)
                notes.append(f"embeddings ({format_bytes(table)}) in host memory ({embed_home.name}): each step moves "
                             f"only the looked-up rows to {filled.devices[0].name}, which keeps that much more for "
                             "layers and KV cache (llama.cpp keeps token embeddings on the CPU too)")
            base.layers, kinds = [(d,) for d in filled.devices], filled.kinds
            used = {d.name for d in filled.devices}
            base.idle = [d for d in hardware.accelerators if d.name not in used]
            strategy = "offload" if any(k != "device" for k in kinds) else (
                "pipeline" if len(used) > 1 else "single")
            reason = filled.reason
            if experts:
                reason = (f"routed experts leave the accelerators first, the last layers' first: "
                          f"{expert_notes[0]}; then {reason}")
                notes += expert_notes
    elif not wish.auto:
        notes.append("automatic memory fitting is off (--no-auto): the layout is kept even where it does not fit")
    stages = _stages(base.layers, kinds, config, hardware, wish, dtype_name, base.warnings)
    ep_reason = expert_parallel.apply(config, stages, wish.ep)  # MoE layers' experts over the stage's devices
    if ep_reason:
        reason = f"{reason}; {ep_reason}"
    outer = _outer(stages, hardware, topology, config, base.warnings, embed_home)
    assign_types(config, stages, outer, wish.isq, native_types)
    if forced:
        experts = finish(config, hardware, forced, stages, dtype_name, stored_bytes, max_batch_size, chunk)
        notes += explain(config, experts, None, dtype_name, max_batch_size, chunk)
    memory = account(config, hardware, stages, outer, max_seq_len, max_batch_size, dtype_name, budgets, stored_bytes,
                     chunk, experts)
    _check_fit(memory, budgets, wish, base.warnings)
    notes += _window_note(config, dtype_name, max_seq_len, max_batch_size)
    idle = [d.name for d in base.idle]
    return DeviceMap(
        model=config.name or "unnamed", fingerprint=config_fingerprint(config), hardware=hardware.name or "hardware",
        platform=hardware.default_platform, num_layers=config.num_hidden_layers, stages=stages,
        embed=outer["embed"], final_norm=outer["final_norm"], lm_head=outer["lm_head"], strategy=strategy,
        reason=reason, memory=memory, idle_devices=idle, warnings=base.warnings, dtype=dtype_name,
        max_seq_len=max_seq_len, max_batch_size=max_batch_size, prefill_chunk=chunk,
        from_topology=topology is not None and any(e.device for e in topology.ranges), memory_notes=notes,
        experts=experts,
    )


def _window_note(config: ModelConfig, dtype: str, max_seq_len: int, max_batch_size: int) -> list[str]:
    """What sliding-window layers save: their KV cache is a ring of the window, not the whole context."""
    n = config.num_hidden_layers
    itemsize = parse_dtype(dtype).itemsize
    per_layer = [kv_cache_bytes(config, 1, itemsize, max_seq_len, max_batch_size, layer=i) for i in range(n)]
    full = kv_cache_bytes(config, 1, itemsize, max_seq_len, max_batch_size)
    sliding = sum(b < full for b in per_layer)
    if not sliding:
        return []
    return [f"KV cache: {sliding} of {n} layers attend over a sliding window and keep a ring of "
            f"{config.sliding_window} slots: {format_bytes(sum(per_layer))} in all at --max-seq-len {max_seq_len}, "
            f"not {format_bytes(n * full)}"]


def _layer_isq(wish: Wish, layer: int, config: ModelConfig) -> str | None:
    """A layer's ISQ request: its topology range's type (else ``--isq``), and the own types of the weights a
    ``/regex/`` entry with an ``isq`` matches (the last match wins, as for the outer weights), searched in the names
    ``-ot`` is searched in (the file's, the GGUF names ``plan --json`` shows, a folder's per-expert names)."""
    if wish.topology is None:
        return wish.isq
    base = wish.topology.layer_isq(layer, wish.isq)
    typing = [e for e in wish.topology.patterns if e.isq is not None]
    if not typing:
        return base
    stacked = stacked_experts(config)
    own: dict[str, str | None] = {}
    for key, spec in layer_param_specs(config, layer).items():
        if len(spec.shape) < 2 or spec.role == "expert" and len(spec.shape) != 3:
            continue  # norms and biases (gpt-oss's expert biases [E, out] too) stay float whatever a regex says
        names = tensor_names(config, spec, stacked)
        entry = next((e for e in reversed(typing) if any(re.search(e.pattern, n) for n in names)), None)
        if entry is not None and str(entry.isq).lower() != str(base).lower():
            own[key] = entry.isq
    return layer_request(base, own)


def _check_fit(memory: list[DeviceMemory], budgets: Budgets, wish: Wish, warnings: list[str]) -> None:
    """An automatic plan that still does not fit is an error; a hand-made layout that does not fit, a warning."""
    for m in memory:
        if m.fits:
            continue
        usable = max(0, (m.capacity_bytes or 0) - m.headroom_bytes)
        line = (f"{m.device} needs {format_bytes(m.total_bytes)} but may use {format_bytes(usable)}"
                f" (short by {format_bytes(m.total_bytes - usable)})")
        if wish.is_automatic and wish.auto and budgets.explicit and m.kind == "device":
            raise UserError(f"the model does not fit: {line}; raise --max-memory, lower --max-seq-len or "
                            "--max-batch-size, or quantize with --isq")
        hint = ("lower --max-seq-len, or let automatic mapping offload (drop -n/--tp/--pp/--devices/topology "
                "devices/--no-auto)" if m.kind == "device" else "raise --max-memory host:SIZE or allow the disk tier")
        warnings.append(f"{line}; {hint}")


def _stages(per_layer: list[tuple[Device, ...]], kinds: list[str], config: ModelConfig, hardware: Hardware,
            wish: Wish, dtype: str, warnings: list[str]) -> list[Stage]:
    """Consecutive layers on the same devices and memory kind form one stage; CPU stages on accelerator hardware
    run float32."""
    stages: list[Stage] = []
    for layer, group in enumerate(per_layer):
        isq = _layer_isq(wish, layer, config)
        names = [d.name for d in group]
        if stages and stages[-1].devices == names and stages[-1].memory_kind == kinds[layer]:
            stages[-1].end = layer + 1
            stages[-1].isq.append(isq)
            continue
        stage_dtype = dtype
        if hardware.default_platform != "cpu" and group[0].platform == "cpu" and dtype != "float32":
            stage_dtype = "float32"
        stages.append(Stage(layer, layer + 1, names, [d.id for d in group], {"tp": len(group)}, kinds[layer],
                            stage_dtype, [isq]))
    for s in stages:
        if s.dtype != dtype:
            warnings.append(f"layers {s.start}-{s.end - 1} on {s.devices[0]} run in float32 (CPUs lack fast {dtype})")
    return stages


def _outer_names(config: ModelConfig) -> dict[str, str]:
    """The file names of the tensors behind the DeviceMap's outer placements (the LM head's own name even when it
    is tied, so that a topology regex written for it is recognised)."""
    untied = config.with_changes(tie_word_embeddings=False)
    by_role = {s.role: s.hf_name for s in outer_param_specs(untied).values()}
    return {key: by_role[role] for key, role in _OUTER_ROLES.items()}


def _layer_weight_names(config: ModelConfig) -> list[str]:
    """Every decoder layer's weight names (what a topology regex may match besides the outer weights)."""
    return [n for i in range(config.num_hidden_layers) for s in layer_param_specs(config, i).values()
            for n in (s.hf_name, s.gguf_name) if n]


def _fill(config: ModelConfig, hardware: Hardware, pool: list[Device], budgets: Budgets, dtype: str,
          isq: list[str | None], max_seq_len: int, max_batch_size: int, wish: Wish, stored: dict[str, int] | None,
          native_types: dict[str, str] | None, prefill_chunk: int, apart: dict[int, tuple[int, int]] | None = None,
          apart_host: int = 0) -> tuple[Fill, Device | None]:
    """The automatic fill, and where the embeddings went: with the first device (None), or into host memory (the
    host device) when the layers do not all fit resident otherwise and moving the table frees accelerator memory."""
    host_helps = _host_embeddings_free_memory(config, hardware, pool, wish.topology)

    def run(on_host: bool) -> Fill:
        return fill(config, pool, budgets, dtype, isq, max_seq_len, max_batch_size, wish.allow_disk, stored,
                    native_types, embed_on_host=on_host, prefill_chunk=prefill_chunk, apart=apart,
                    apart_host=apart_host)

    refusal: UserError | None = None
    try:
        filled: Fill | None = run(False)
    except UserError as exc:
        if not host_helps:
            raise
        filled, refusal = None, exc
    if host_helps and (filled is None or any(k != "device" for k in filled.kinds)):
        try:
            moved = run(True)
        except UserError:
            if refusal is not None:
                raise refusal from None
        else:  # the table takes host room: worth it only if no layer goes to disk for it
            if filled is None or _offload_cost(moved) < _offload_cost(filled):
                return moved, hardware.host
    assert filled is not None
    return filled, None


def _offload_cost(filled: Fill) -> tuple[int, int]:
    """Layers read from disk, then layers streamed from host memory: what a fill's decode waits for, worst first."""
    return filled.kinds.count("disk"), filled.kinds.count("host")


def _host_embeddings_free_memory(config: ModelConfig, hardware: Hardware, pool: list[Device],
                                 topology: Topology | None) -> bool:
    """Whether keeping the input embeddings in host memory frees accelerator memory: on accelerators with memory of
    their own (not a CPU, not Apple's unified memory), unless the table must be on the one device anyway as the
    tied LM head, or a topology entry places the embeddings itself."""
    if hardware.default_platform == "cpu" or hardware.unified_memory or not pool or pool[0].platform == "cpu":
        return False
    if config.tie_word_embeddings and len(pool) == 1:
        return False
    return topology is None or topology.match_for_name(_outer_names(config)["embed"]) is None


def _outer(stages: list[Stage], hardware: Hardware, topology: Topology | None, config: ModelConfig,
           warnings: list[str], embed_home: Device | None = None) -> dict[str, Placement]:
    """Embeddings with the first stage (or on ``embed_home``, the host, when the planner moved them there), final
    norm and LM head with the last, unless a ``/regex/`` entry moves them."""
    defaults = {"embed": 0, "final_norm": len(stages) - 1, "lm_head": len(stages) - 1}
    out: dict[str, Placement] = {}
    names = _outer_names(config)
    for key, index in defaults.items():
        stage = stages[index]
        entry = topology.match_for_name(names[key]) if topology is not None else None
        isq = entry.isq if entry is not None else None
        if key == "embed" and embed_home is not None and entry is None:
            out[key] = Placement([embed_home.name], None, False, None, names[key],
                                 note=f"in host memory: only the looked-up rows move to {stages[0].devices[0]}")
            continue
        if entry is not None and entry.device is not None:
            dev = hardware.find(entry.device)
            if dev is None:
                raise UserError(f"{topology.source}: entry {entry.where} "  # type: ignore[union-attr]
                                f"names {hardware.lacks(entry.device)}")
            home = next((i for i, s in enumerate(stages) if s.devices == [dev.name]), None)
            out[key] = Placement([dev.name], home, False, isq, names[key])
            continue
        parallel = key != "final_norm" and stage.tp > 1 and config.vocab_size % stage.tp == 0
        if key != "final_norm" and stage.tp > 1 and not parallel:
            warnings.append(f"vocab size {config.vocab_size} does not divide over tp={stage.tp}: {key} replicated "
                            f"on each of {', '.join(stage.devices)}")
        out[key] = Placement(list(stage.devices), index, parallel, isq, names[key])
    if config.tie_word_embeddings and out["lm_head"].devices != out["embed"].devices:
        out["lm_head"].note = "its own copy of the tied embedding table"
    if topology is not None:
        layer_names = [s.hf_name for s in layer_param_specs(config, 0).values() if s.role != "expert"]
        for e in topology.patterns:
            if not any(re.search(e.pattern, n) for n in [*names.values(), *_layer_weight_names(config)]):
                warnings.append(f"topology: regex {e.where} matches no weight of this model, so it does nothing "
                                f"(names look like {', '.join(names.values())})")
            if e.device and any(re.search(e.pattern, n) for n in layer_names):
                warnings.append(f"topology: regex {e.where} matches decoder-layer weights; a regex device applies "
                                "only to embeddings, final norm and LM head (place layers with ranges)")
    return out
