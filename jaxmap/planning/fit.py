"""Memory-aware placement: what each memory may hold (budgets), what a plan puts in it (accounting), and the
automatic fill that decides which layers stay on accelerators, which go to host memory and which to disk.

Pure data, no jax. The rules (issue "automatic memory-aware mapping"):

- Budgets: an accelerator may use its allocator limit less what is already in use, less a headroom
  (:func:`jaxmap.planning.memory.headroom`); ``--max-memory`` caps a device or the host exactly (no headroom is
  taken from an explicit cap: it is the user's figure, as in accelerate). When ``--max-memory`` names
  accelerators, only those are used (accelerate's convention). CPU devices of CPU-only hardware share the
  host's available memory.
- The host tier holds offloaded layers' weights in pinned host memory: the host's available memory less its
  headroom, at most the CUDA pinned pool (64 GB unless ``XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB``). There is no host tier
  on unified memory (Apple silicon) nor on CPU-only hardware (it would be the same memory) unless ``--max-memory
  host:SIZE`` asks for one.
- Fill: when the automatic layout (tensor parallel, else pipeline) fits, nothing changes. Otherwise layers go to
  the accelerators one device per pipeline stage, in proportion to each device's free memory; what does not fit
  runs on the last device with its weights streamed from host memory, then from disk (unless ``--no-disk``). The
  device running streamed layers holds their KV cache and two layers of streaming buffers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from jaxmap.config import ModelConfig
from jaxmap.config.dtypes import parse_dtype
from jaxmap.config.hardware import Device, Hardware
from jaxmap.errors import UserError
from jaxmap.families import layer_param_specs
from jaxmap.planning.device_map import DeviceMemory, Placement, Stage, format_bytes
from jaxmap.planning.isq_types import NATIVE, is_native, layer_types, outer_spec, outer_type, units, weight_bytes
from jaxmap.planning.memory import (
    CUDA_PINNED_POOL_DEFAULT_GB,
    activation_bytes,
    headroom,
    kv_cache_bytes,
)

HOST = "host"


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the plan may use on one memory: ``capacity`` (limit less in use, or the explicit cap) less ``headroom``."""

    capacity: int | None
    headroom: int = 0
    why: str = ""

    @property
    def usable(self) -> int | None:
        return None if self.capacity is None else max(0, self.capacity - self.headroom)


@dataclasses.dataclass
class Budgets:
    devices: dict[str, Budget]
    host: Budget
    notes: list[str]
    explicit: bool  # --max-memory was given


def pool_for(hardware: Hardware, pool: list[Device], max_memory: dict[str, int] | None) -> list[Device]:
    """The devices automatic mapping may use: those ``--max-memory`` names when it names any (accelerate)."""
    if not max_memory:
        return pool
    named = [d for d in pool if _cap_key(d, max_memory) is not None]
    for key in max_memory:
        if key == HOST:
            continue
        name = key if "[" in key else f"{hardware.default_platform}[{key}]"
        if hardware.find(name) is None:
            raise UserError(f"--max-memory names {hardware.lacks(name)}")
    return named or pool


def _cap_key(dev: Device, max_memory: dict[str, int]) -> str | None:
    for key in (dev.name, str(dev.ordinal)):
        if key in max_memory:
            return key
    return None


def compute_budgets(hardware: Hardware, pool: list[Device], max_memory: dict[str, int] | None) -> Budgets:
    max_memory = max_memory or {}
    notes: list[str] = []
    host_avail = hardware.host_memory_bytes
    cpu_only = hardware.default_platform == "cpu"
    shared = [d for d in pool if d.platform == "cpu" and d.memory_bytes is None and _cap_key(d, max_memory) is None]
    out: dict[str, Budget] = {}
    for dev in pool:
        key = _cap_key(dev, max_memory)
        avail = None if dev.memory_bytes is None else dev.memory_bytes - (dev.used_bytes or 0)
        if key is not None:
            cap = max_memory[key] if avail is None else min(max_memory[key], avail)
            out[dev.name] = Budget(cap, 0, f"--max-memory {key}:{format_bytes(max_memory[key])}")
        elif avail is not None:
            used = f", {format_bytes(dev.used_bytes)} already in use" if dev.used_bytes else ""
            out[dev.name] = Budget(avail, headroom(avail), f"allocator limit {format_bytes(dev.memory_bytes)}{used}")
        elif dev in shared and host_avail is not None:
            share = host_avail // len(shared)
            out[dev.name] = Budget(share, headroom(share, host=True),
                                   f"1/{len(shared)} of the host's {format_bytes(host_avail)} available")
        else:
            out[dev.name] = Budget(None, 0, "capacity unknown")
    if HOST in max_memory:
        host = Budget(max_memory[HOST], 0, f"--max-memory host:{format_bytes(max_memory[HOST])}")
    elif hardware.unified_memory:
        host = Budget(0, 0, "unified memory: accelerator and host share one pool, no host tier")
    elif cpu_only:
        host = Budget(0, 0, "CPU-only hardware: host memory is the devices' memory (no separate host tier; "
                            "--max-memory host:SIZE makes one)")
    elif host_avail is None:
        host = Budget(None, 0, "host memory unknown")
    else:
        room = headroom(host_avail, host=True)
        host = Budget(host_avail, room, f"host memory available {format_bytes(host_avail)}")
        if hardware.default_platform == "cuda":
            pool_gb = float(os.environ.get("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", CUDA_PINNED_POOL_DEFAULT_GB))
            pinned = int(pool_gb * (1 << 30))
            if pinned < host_avail - room:
                host = Budget(pinned, 0, f"CUDA pinned host pool {pool_gb:g} GB (XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB)")
    for name, b in out.items():
        if b.capacity is not None:
            notes.append(f"{name}: may use {format_bytes(b.usable or 0)} ({b.why}; headroom "
                         f"{format_bytes(b.headroom)})")
    if host.capacity:
        notes.append(f"host tier: may use {format_bytes(host.usable or 0)} ({host.why}; headroom "
                     f"{format_bytes(host.headroom)})")
    elif host.capacity == 0:
        notes.append(f"host tier: none ({host.why})")
    return Budgets(out, host, notes, bool(max_memory))


# ---- bytes ----------------------------------------------------------------------------------------------------------
# Counted from each weight's final type (jaxmap.planning.isq_types): the DeviceMap's stored types for a plan, the same
# decision made on the spot for the fill's trial layouts.

def layer_weight_bytes(config: ModelConfig, layer: int, tp: int, dtype: str, isq: str | None,
                       stored: Mapping[str, int] | None = None,
                       native_types: Mapping[str, str] | None = None) -> int:
    """One decoder layer's weight bytes on one device of a ``tp``-way stage (ISQ on its 2-D projections).

    ``native_types`` maps tensor names to the jaxmap types a quantized checkpoint stores them in: with
    ``isq="native"`` those are the requested types. ``stored`` maps them to their bytes in the file: a native tensor
    whose type is not known counts those (else its float size).
    """
    types = {k: t.final for k, t in layer_types(config, layer, tp, isq, native_types).items()}
    return types_bytes(config, layer, tp, dtype, types, stored)


def types_bytes(config: ModelConfig, layer: int, tp: int, dtype: str, types: Mapping[str, str],
                stored: Mapping[str, int] | None = None) -> int:
    """One decoder layer's weight bytes on one device under its final types (``{weight key: type}``)."""
    itemsize = parse_dtype(dtype).itemsize
    counts = units(config)
    return sum(weight_bytes(p, types.get(k), tp, counts, itemsize, stored)
               for k, p in layer_param_specs(config, layer).items())


def outer_bytes(config: ModelConfig, key: str, dtype: str, isq: str | None, shards: int,
                stored: Mapping[str, int] | None = None, native_types: Mapping[str, str] | None = None) -> int:
    """An outer placement's tensor on one of ``shards`` devices, with ``isq`` its requested type."""
    t = outer_type(config, key, isq, shards, native_types)
    return _outer_final_bytes(config, key, dtype, None if t is None else t.final, shards, stored)


def _outer_final_bytes(config: ModelConfig, key: str, dtype: str, final: str | None, shards: int,
                       stored: Mapping[str, int] | None) -> int:
    _, spec = outer_spec(config, key)
    return weight_bytes(spec, final, shards, units(config), parse_dtype(dtype).itemsize, stored)


def account(config: ModelConfig, hardware: Hardware, stages: list[Stage], outer: dict[str, Placement],
            max_seq_len: int, max_batch_size: int, dtype: str, budgets: Budgets | None,
            stored: Mapping[str, int] | None = None, prefill_chunk: int | None = None) -> list[DeviceMemory]:
    """Bytes per memory under a plan: one row per device that holds or runs anything, then host and disk rows."""
    rows: dict[str, DeviceMemory] = {}

    def row(name: str, kind: str = "device") -> DeviceMemory:
        if name not in rows:
            rows[name] = DeviceMemory(name, 0, 0, kind=kind)
        return rows[name]

    for s in stages:
        itemsize = parse_dtype(s.dtype).itemsize
        kv = sum(kv_cache_bytes(config, s.tp, itemsize, max_seq_len, max_batch_size, layer=i)
                 for i in range(s.start, s.end))
        widths = [types_bytes(config, i, s.tp, s.dtype, types, stored)
                  for i, types in zip(range(s.start, s.end), s.tensor_isq, strict=True)]
        for d in s.devices:
            r = row(d)
            r.kv_cache_bytes += kv
            r.activation_bytes = max(r.activation_bytes, activation_bytes(config, s.tp, itemsize, max_seq_len,
                                                                          max_batch_size, prefill_chunk))
            if s.memory_kind == "device":
                r.weights_bytes += sum(widths)
            else:
                r.streaming_bytes = max(r.streaming_bytes, 2 * max(widths))
                tier = row(s.memory_kind, s.memory_kind)
                tier.weights_bytes += sum(widths) if d == s.devices[0] else 0
    for key, place in outer.items():
        if key == "lm_head" and config.tie_word_embeddings and place.devices == outer["embed"].devices:
            continue  # tied: the embedding table already there serves as the head
        stage_dtype = stages[place.stage].dtype if place.stage is not None else dtype
        share = _outer_final_bytes(config, key, stage_dtype, place.tensor_isq, len(place.devices), stored)
        for d in place.devices:
            row(d).weights_bytes += share
    order = {d.name: i for i, d in enumerate(hardware.devices)}
    out = sorted((r for r in rows.values() if r.kind == "device"), key=lambda r: order.get(r.device, len(order)))
    for r in out:
        dev = hardware.find(r.device)
        b = budgets.devices.get(r.device) if budgets is not None else None
        if b is not None:
            r.capacity_bytes, r.headroom_bytes = b.capacity, b.headroom
        elif dev is not None:
            r.capacity_bytes = dev.memory_bytes or (hardware.host_memory_bytes if dev.platform == "cpu" else None)
    if HOST in rows:
        r = rows[HOST]
        r.device = "pinned_host"
        if budgets is not None:
            r.capacity_bytes, r.headroom_bytes = budgets.host.capacity, budgets.host.headroom
        out.append(r)
    if "disk" in rows:
        rows["disk"].device = "offload"
        out.append(rows["disk"])
    return out


# ---- the automatic fill ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Fill:
    """Per layer: the device that runs it and where its weights live; plus the explanation."""

    devices: list[Device]
    kinds: list[str]
    reason: str


def fill(config: ModelConfig, pool: list[Device], budgets: Budgets, dtype: str, isq: list[str | None],
         max_seq_len: int, max_batch_size: int, allow_disk: bool, stored: Mapping[str, int] | None = None,
         native_types: Mapping[str, str] | None = None, embed_on_host: bool = False,
         prefill_chunk: int | None = None) -> Fill:
    """Layers on the pool's devices (one device per stage) while they fit, then host, then disk.

    ``embed_on_host``: the input embeddings live in host memory (the planner's choice when that frees accelerator
    memory), so the first device does not hold them and the host tier has that much less room."""
    n_layers = config.num_hidden_layers
    itemsize = parse_dtype(dtype).itemsize
    w = [layer_weight_bytes(config, i, 1, dtype, isq[i], stored, native_types) for i in range(n_layers)]
    kv = [kv_cache_bytes(config, 1, itemsize, max_seq_len, max_batch_size, layer=i) for i in range(n_layers)]
    act = activation_bytes(config, 1, itemsize, max_seq_len, max_batch_size, prefill_chunk)
    first, last = pool[0], pool[-1]
    native = NATIVE if (stored or native_types) and any(is_native(t) for t in isq) else None
    embed = outer_bytes(config, "embed", dtype, native, 1, stored, native_types)
    head = outer_bytes(config, "final_norm", dtype, None, 1)
    if not (config.tie_word_embeddings and first is last):
        head += outer_bytes(config, "lm_head", dtype, native, 1, stored, native_types)
    if embed_on_host and config.tie_word_embeddings and first is last:
        head += outer_bytes(config, "lm_head", dtype, native, 1, stored, native_types)  # the head's own copy
    free: dict[str, int] = {}
    for d in pool:
        usable = budgets.devices[d.name].usable
        usable = 1 << 62 if usable is None else usable
        on_first = embed if d is first and not embed_on_host else 0
        free[d.name] = usable - act - on_first - (head if d is last else 0)
    if free[first.name] < 0 or free[last.name] < 0:
        short = first if free[first.name] < 0 else last
        raise UserError(f"the model does not fit: {short.name} cannot even hold the embeddings/LM head and the "
                        f"prefill activations ({format_bytes(embed + head + act)} with --max-seq-len {max_seq_len}, "
                        f"--max-batch-size {max_batch_size}); lower those, raise --max-memory, or use more devices")

    # 1. all resident, in proportion to free memory
    counts = _proportional(w, kv, pool, free)
    if counts is not None:
        devices = [d for d, c in zip(pool, counts, strict=True) for _ in range(c)]
        split = ", ".join(f"{c} on {d.name}" for d, c in zip(pool, counts, strict=True) if c)
        why = (f"the model does not fit the automatic layout; layers in proportion to free memory: {split}"
               if len(pool) > 1 else f"everything on {first.name}")
        return Fill(devices, ["device"] * n_layers, why)

    # 2. greedy on every device but the last, then the last runs the rest, streaming what it cannot hold
    devices: list[Device] = []
    for d in pool[:-1]:
        room = free[d.name]
        while len(devices) < n_layers and w[len(devices)] + kv[len(devices)] <= room:
            room -= w[len(devices)] + kv[len(devices)]
            devices.append(d)
    placed = len(devices)
    rest = n_layers - placed
    room = free[last.name] - 2 * max(w[placed:]) - sum(kv[placed:])
    if room < 0:
        raise UserError(
            f"the model does not fit: {last.name} runs the {rest} offloaded layers and needs "
            f"{format_bytes(sum(kv[placed:]) + 2 * max(w[placed:]))} for their KV cache (--max-seq-len {max_seq_len} x "
            f"--max-batch-size {max_batch_size}) and two streaming buffers but has {format_bytes(free[last.name])} "
            "left; lower --max-seq-len or --max-batch-size, or raise --max-memory")
    resident = 0
    while placed + resident < n_layers and w[placed + resident] <= room:
        room -= w[placed + resident]
        resident += 1
    devices += [last] * (n_layers - placed)
    kinds = ["device"] * (placed + resident)
    streamed = list(range(placed + resident, n_layers))
    host_room = budgets.host.usable
    host_room = (1 << 62 if host_room is None else host_room) - (embed if embed_on_host else 0)
    on_host = 0
    while on_host < len(streamed) and w[streamed[on_host]] <= host_room:
        host_room -= w[streamed[on_host]]
        on_host += 1
    on_disk = len(streamed) - on_host
    if on_disk and not allow_disk:
        missing = sum(w[i] for i in streamed[on_host:])
        raise UserError(
            f"the model does not fit: {on_disk} layer(s) ({format_bytes(missing)}) fit neither the accelerators nor "
            f"host memory, and --no-disk forbids the disk tier; allow disk offload (drop --no-disk), raise "
            f"--max-memory, lower --max-seq-len, or quantize (--isq Q4K stores about a quarter of float16's bytes)")
    kinds += ["host"] * on_host + ["disk"] * on_disk
    parts = [f"{kinds.count('device')} layers resident on {', '.join(d.name for d in pool)}"]
    if on_host:
        parts.append(f"{on_host} streamed from host memory")
    if on_disk:
        parts.append(f"{on_disk} read from disk")
    why = (f"the model does not fit the accelerators: {'; '.join(parts)}; offloaded layers run on {last.name}, "
           "each layer's weights moved in while the previous one computes")
    return Fill(devices, kinds, why)


def _proportional(w: list[int], kv: list[int], pool: list[Device], free: dict[str, int]) -> list[int] | None:
    """Layer counts per device in proportion to free memory, each within its device; None when they cannot all fit."""
    n = len(w)
    total_free = sum(max(0, free[d.name]) for d in pool)
    if total_free <= 0:
        return None
    bounds, acc = [], 0
    for d in pool:
        acc += max(0, free[d.name])
        bounds.append(round(n * acc / total_free))
    counts, start = [], 0
    for d, bound in zip(pool, bounds, strict=True):
        room, end = free[d.name], start
        while end < n and end < max(bound, start) and w[end] + kv[end] <= room:
            room -= w[end] + kv[end]
            end += 1
        if d is pool[-1]:
            while end < n and w[end] + kv[end] <= room:
                room -= w[end] + kv[end]
                end += 1
        counts.append(end - start)
        start = end
    if start < n:  # proportional shares overflowed a device: fill greedily instead
        counts, start = [], 0
        for d in pool:
            room, end = free[d.name], start
            while end < n and w[end] + kv[end] <= room:
                room -= w[end] + kv[end]
                end += 1
            counts.append(end - start)
            start = end
    return counts if start == n else None
