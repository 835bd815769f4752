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
from jaxmap.planning.device_map import DeviceMemory, ExpertPlacement, Placement, Stage, format_bytes
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
                stored: Mapping[str, int] | None = None, ep: int = 1) -> int:
    """One decoder layer's weight bytes on one device under its final types (``{weight key: type}``); with ``ep``
    the routed experts' share is ``E / ep`` whole experts (over ``tp / ep`` inside each)."""
    itemsize = parse_dtype(dtype).itemsize
    counts = units(config)
    return sum(weight_bytes(p, types.get(k), tp, counts, itemsize, stored, ep)
               for k, p in layer_param_specs(config, layer).items())


def expert_bytes(config: ModelConfig, layer: int, tp: int, dtype: str, types: Mapping[str, str],
                 stored: Mapping[str, int] | None = None, ep: int = 1) -> int:
    """One MoE layer's routed experts (the stacked ``experts_*`` tensors) on one device of a ``tp``-way stage; 0 on
    a dense layer. Shared experts, router and attention are not counted: they stay with the layer."""
    itemsize = parse_dtype(dtype).itemsize
    counts = units(config)
    return sum(weight_bytes(p, types.get(k), tp, counts, itemsize, stored, ep)
               for k, p in layer_param_specs(config, layer).items() if p.role == "expert")


def moe_layers(config: ModelConfig) -> list[int]:
    """The decoder layers with routed experts."""
    if not getattr(config, "num_experts", 0):
        return []
    return [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]


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
            stored: Mapping[str, int] | None = None, prefill_chunk: int | None = None,
            experts: list[ExpertPlacement] | None = None) -> list[DeviceMemory]:
    """Bytes per memory under a plan: one row per device that holds or runs anything, then host and disk rows.

    ``experts``: MoE layers whose routed experts live apart from their layer: their bytes leave the layer's devices
    for the memory named, and a layer device that has them streamed in keeps two layers' experts of buffers."""
    rows: dict[str, DeviceMemory] = {}
    apart = {e.layer: e for e in experts or []}

    def row(name: str, kind: str = "device") -> DeviceMemory:
        if name not in rows:
            rows[name] = DeviceMemory(name, 0, 0, kind=kind)
        return rows[name]

    for s in stages:
        itemsize = parse_dtype(s.dtype).itemsize
        kv = sum(kv_cache_bytes(config, s.tp, itemsize, max_seq_len, max_batch_size, layer=i)
                 for i in range(s.start, s.end))
        widths = [types_bytes(config, i, s.tp, s.dtype, types, stored, s.ep)
                  for i, types in zip(range(s.start, s.end), s.tensor_isq, strict=True)]
        buffers = 0
        for j, (i, types) in enumerate(zip(range(s.start, s.end), s.tensor_isq, strict=True)):
            e = apart.get(i)
            if e is None:
                continue
            here = expert_bytes(config, i, s.tp, s.dtype, types, stored, s.ep)
            widths[j] -= here
            if e.memory_kind == "device":
                whole = expert_bytes(config, i, len(e.devices), s.dtype, types, stored)
                for d in e.devices:
                    row(d).weights_bytes += whole
            else:
                tier = "host" if e.memory_kind in ("host", "cpu") else "disk"
                row(tier, tier).weights_bytes += here * s.tp
                if "stream" in (e.decode, e.prefill):
                    buffers = max(buffers, 2 * here)
        for d in s.devices:
            r = row(d)
            r.kv_cache_bytes += kv
            r.activation_bytes = max(r.activation_bytes, activation_bytes(config, s.tp, itemsize, max_seq_len,
                                                                          max_batch_size, prefill_chunk))
            r.streaming_bytes = max(r.streaming_bytes, buffers)
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


@dataclasses.dataclass(frozen=True)
class Layout:
    """One candidate of the fill's search space, in layer order: ``pool[i]`` runs ``resident[i]`` layers held in
    its memory, then ``streamed[i]`` layers whose weights it streams (from host memory or disk, ``kinds``).

    The embeddings live with the first device that runs a layer, final norm and LM head with the last. A device
    that streams layers holds their KV cache and two layers of streaming buffers."""

    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    kinds: tuple[str, ...]  # per layer: device, host or disk

    def owners(self) -> list[int]:
        return [i for i, (r, s) in enumerate(zip(self.resident, self.streamed, strict=True)) for _ in range(r + s)]


@dataclasses.dataclass
class FillCosts:
    """What the fill's layouts cost, per memory: the arithmetic :func:`account` does for tp=1 stages, per layer."""

    weights: list[int]  # one layer's weight bytes
    kv: list[int]  # one layer's KV cache bytes
    activations: int  # one prefill step's temporaries on a device that runs layers
    embed: int  # the input embeddings (0 when they live in host memory)
    head: int  # final norm and untied LM head
    tied_head: int  # the tied LM head's own copy, needed when it is on another device than the embeddings
    usable: list[int]  # per pool device
    host_room: int  # the host tier, less embeddings kept there
    embed_on_host: bool = False
    # per layer: buffers its device keeps for routed experts streamed in from host memory (empty: none)
    buffers: list[int] = dataclasses.field(default_factory=list)

    def device_cost(self, start: int, end: int, streamed: int) -> int:
        """Bytes a device needs to run layers ``[start, end)``, the last ``streamed`` of them streamed."""
        n = len(self.weights)
        out = self.activations + sum(self.kv[start:end]) + sum(self.weights[start:end - streamed])
        if streamed:
            out += 2 * max(self.weights[end - streamed:end])
        if self.buffers:
            out += max(self.buffers[start:end])
        if start == 0:
            out += self.embed
        if end == n:
            out += self.head + (self.tied_head if start != 0 or self.embed_on_host else 0)
        return out

    def fits(self, layout: Layout) -> bool:
        """Whether every memory holds what ``layout`` puts in it (the brute-force oracle's check too)."""
        n, start = len(self.weights), 0
        for i, (r, s) in enumerate(zip(layout.resident, layout.streamed, strict=True)):
            if r + s and self.device_cost(start, start + r + s, s) > self.usable[i]:
                return False
            start += r + s
        if start != n or len(layout.kinds) != n:
            return False
        return sum(w for w, k in zip(self.weights, layout.kinds, strict=True) if k == "host") <= self.host_room


def fill(config: ModelConfig, pool: list[Device], budgets: Budgets, dtype: str, isq: list[str | None],
         max_seq_len: int, max_batch_size: int, allow_disk: bool, stored: Mapping[str, int] | None = None,
         native_types: Mapping[str, str] | None = None, embed_on_host: bool = False,
         prefill_chunk: int | None = None, apart: Mapping[int, tuple[int, int]] | None = None,
         apart_host: int = 0) -> Fill:
    """Layers on the pool's devices (one device per stage) while they fit, then streamed from host, then disk.

    A search, not a greedy fill (:func:`search`): over every split of the layers into runs per device (in pool
    order), each run resident layers then streamed ones, it takes one with the fewest streamed bytes, resident
    layers in proportion to free memory when none is streamed; streamed layers go to host memory while it has room,
    then to disk. Greedy filling could leave the device that runs offloaded layers no room for their KV cache and
    streaming buffers although another split fits (issue 17); the search refuses only when no split fits.

    ``embed_on_host``: the input embeddings live in host memory (the planner's choice when that frees accelerator
    memory), so the first device does not hold them and the host tier has that much less room. ``apart``: MoE
    layers whose routed experts leave the accelerators, ``{layer: (their bytes, buffers the layer's device keeps
    to stream them in)}``, ``apart_host`` the host memory they take."""
    costs = fill_costs(config, pool, budgets, dtype, isq, max_seq_len, max_batch_size, stored, native_types,
                       embed_on_host, prefill_chunk, apart, apart_host)
    best = search(costs, allow_disk)
    if best is None:
        raise UserError(_refusal(costs, pool, allow_disk, max_seq_len, max_batch_size))
    devices = [pool[i] for i in best.owners()]
    kinds = list(best.kinds)
    used = [d for d, r, s in zip(pool, best.resident, best.streamed, strict=True) if r + s]
    if not any(best.streamed):
        split = ", ".join(f"{c} on {d.name}" for d, c in zip(pool, best.resident, strict=True) if c)
        why = (f"the model does not fit the automatic layout; layers in proportion to free memory: {split}"
               if len(used) > 1 else f"everything on {used[0].name}")
        return Fill(devices, kinds, why)
    runners = [d.name for d, s in zip(pool, best.streamed, strict=True) if s]
    parts = [f"{kinds.count('device')} layers resident on {', '.join(d.name for d in used)}"]
    if kinds.count("host"):
        parts.append(f"{kinds.count('host')} streamed from host memory")
    if kinds.count("disk"):
        parts.append(f"{kinds.count('disk')} read from disk")
    why = (f"the model does not fit the accelerators: {'; '.join(parts)}; offloaded layers run on "
           f"{', '.join(runners)}, each layer's weights moved in while the previous one computes")
    return Fill(devices, kinds, why)


def fill_costs(config: ModelConfig, pool: list[Device], budgets: Budgets, dtype: str, isq: list[str | None],
               max_seq_len: int, max_batch_size: int, stored: Mapping[str, int] | None = None,
               native_types: Mapping[str, str] | None = None, embed_on_host: bool = False,
               prefill_chunk: int | None = None, apart: Mapping[int, tuple[int, int]] | None = None,
               apart_host: int = 0) -> FillCosts:
    """The per-layer and per-memory figures the fill's search weighs."""
    n_layers = config.num_hidden_layers
    itemsize = parse_dtype(dtype).itemsize
    w = [layer_weight_bytes(config, i, 1, dtype, isq[i], stored, native_types) for i in range(n_layers)]
    kv = [kv_cache_bytes(config, 1, itemsize, max_seq_len, max_batch_size, layer=i) for i in range(n_layers)]
    act = activation_bytes(config, 1, itemsize, max_seq_len, max_batch_size, prefill_chunk)
    native = NATIVE if (stored or native_types) and any(is_native(t) for t in isq) else None
    embed = outer_bytes(config, "embed", dtype, native, 1, stored, native_types)
    head = outer_bytes(config, "final_norm", dtype, None, 1)
    lm_head = outer_bytes(config, "lm_head", dtype, native, 1, stored, native_types)
    tied = config.tie_word_embeddings
    usable = [budgets.devices[d.name].usable for d in pool]
    host_room = budgets.host.usable
    host_room = (1 << 62 if host_room is None else host_room) - (embed if embed_on_host else 0) - apart_host
    apart = apart or {}
    w = [wi - apart.get(i, (0, 0))[0] for i, wi in enumerate(w)]
    buffers = [apart.get(i, (0, 0))[1] for i in range(n_layers)] if any(b for _, b in apart.values()) else []
    return FillCosts(w, kv, act, 0 if embed_on_host else embed, head + (0 if tied else lm_head),
                     lm_head if tied else 0, [1 << 62 if u is None else u for u in usable], host_room,
                     embed_on_host, buffers)


def search(costs: FillCosts, allow_disk: bool) -> Layout | None:
    """The preferred layout that fits, or None.

    Preferences: all layers resident in proportion to free memory; else all resident as they fit; else the fewest
    streamed bytes (then the earlier devices fuller, the streamed layers on the later ones), in host memory while
    it has room, the rest from disk. The fewest streamed bytes come from a dynamic programme over (device, layers
    placed so far): a device's run of layers ``[j, j')`` needs at least one streamed layer more than ``[j, j'-1)``
    once it streams any (drop the last layer of a split that fits: what is left fits), so a pointer finds each
    run's fewest in O(layers) per start, O(devices x layers²) in all. Fewest streamed bytes is also what makes
    ``--no-disk`` exact: a layout without disk exists iff the fewest streamed bytes fit host memory.
    """
    n, k = len(costs.weights), len(costs.usable)
    proportional = _proportional(costs)
    if proportional is not None:
        return proportional
    inf = (1 << 80, 0)
    # the fewest streamed bytes placing layers [0, j) on pool[:i], then the fewest streamed layers on earlier devices
    best: list[list[tuple[int, int]]] = [[inf] * (n + 1) for _ in range(k + 1)]
    parent: list[list[tuple[int, int] | None]] = [[None] * (n + 1) for _ in range(k + 1)]
    best[0][0] = (0, 0)
    tail = [0]  # tail[j]: the weights of layers [0, j)
    for wi in costs.weights:
        tail.append(tail[-1] + wi)
    for i in range(k):
        cap = costs.usable[i]
        for j in range(n + 1):
            if best[i][j] < inf and best[i][j] <= best[i + 1][j]:
                best[i + 1][j], parent[i + 1][j] = best[i][j], (j, 0)  # pool[i] runs nothing
        for j in range(n):
            if best[i][j] >= inf:
                continue
            lower = 0  # the fewest streamed layers of [j, end) is at least this
            for end in range(j + 1, n + 1):
                s = lower
                while s <= end - j and costs.device_cost(j, end, s) > cap:
                    s += 1
                if s > end - j:
                    break  # no split of [j, end) fits pool[i]: nor will a longer run
                lower = s + 1 if s else 0
                total = (best[i][j][0] + tail[end] - tail[end - s], best[i][j][1] + s * (k - 1 - i))
                if total <= best[i + 1][end]:
                    best[i + 1][end], parent[i + 1][end] = total, (j, s)
    if best[k][n] >= inf:
        return None
    resident, streamed, end = [0] * k, [0] * k, n
    for i in range(k, 0, -1):
        j, s = parent[i][end]  # type: ignore[misc]
        resident[i - 1], streamed[i - 1] = end - j - s, s
        end = j
    kinds = _kinds(costs, resident, streamed, allow_disk)
    return None if kinds is None else Layout(tuple(resident), tuple(streamed), kinds)


def _kinds(costs: FillCosts, resident: list[int], streamed: list[int], allow_disk: bool) -> tuple[str, ...] | None:
    """Per layer: resident ones on their device, streamed ones in host memory while it has room, then disk."""
    out, room, start = [], costs.host_room, 0
    for r, s in zip(resident, streamed, strict=True):
        out += ["device"] * r
        for layer in range(start + r, start + r + s):
            if costs.weights[layer] <= room:
                room -= costs.weights[layer]
                out.append("host")
            else:
                out.append("disk")
        start += r + s
    if "disk" in out and not allow_disk:
        return None
    return tuple(out)


def _proportional(costs: FillCosts) -> Layout | None:
    """Every layer resident, in proportion to the devices' free memory (each within its device), when that fits."""
    n, k = len(costs.weights), len(costs.usable)
    outer = [costs.embed if i == 0 else 0 for i in range(k)]
    outer[-1] += costs.head + (costs.tied_head if k > 1 or costs.embed_on_host else 0)
    free = [max(0, u - costs.activations - o) for u, o in zip(costs.usable, outer, strict=True)]
    total = sum(free)
    if total <= 0:
        return None
    bounds, acc = [], 0
    for f in free:
        acc += f
        bounds.append(round(n * acc / total))
    counts, start = [0] * k, 0
    for i in range(k):
        end = start
        limit = n if i == k - 1 else max(bounds[i], start)
        while end < limit and costs.device_cost(start, end + 1, 0) <= costs.usable[i]:
            end += 1
        counts[i], start = end - start, end
    layout = Layout(tuple(counts), (0,) * k, ("device",) * n)
    return layout if start == n and costs.fits(layout) else None


def _refusal(costs: FillCosts, pool: list[Device], allow_disk: bool, max_seq_len: int, max_batch_size: int) -> str:
    """Why no layout fits, with what would help."""
    if not allow_disk and (best := search(costs, True)) is not None:
        missing = sum(w for w, k in zip(costs.weights, best.kinds, strict=True) if k == "disk")
        return (f"the model does not fit: {best.kinds.count('disk')} layer(s) ({format_bytes(missing)}) fit neither "
                "the accelerators nor host memory, and --no-disk forbids the disk tier; allow disk offload (drop "
                "--no-disk), raise --max-memory, lower --max-seq-len, or quantize (--isq Q4K stores about a quarter "
                "of float16's bytes)")
    outer = costs.embed + costs.head + costs.activations
    big = max(range(len(pool)), key=lambda i: costs.usable[i])
    if costs.usable[big] < outer:
        return (f"the model does not fit: {pool[big].name} cannot even hold the embeddings/LM head and the "
                f"prefill activations ({format_bytes(outer)} with --max-seq-len {max_seq_len}, --max-batch-size "
                f"{max_batch_size}); lower those, raise --max-memory, or use more devices")
    n = len(costs.weights)
    kv, buffers = sum(costs.kv), 2 * max(costs.weights)
    room = sum(max(0, u - outer - buffers) for u in costs.usable)
    names = ", ".join(d.name for d in pool)
    return (f"the model does not fit: streaming every layer still needs {format_bytes(kv)} of KV cache for the "
            f"{n} layers (--max-seq-len {max_seq_len} x --max-batch-size {max_batch_size}) and two streaming "
            f"buffers of {format_bytes(buffers // 2)} on each device that streams, but {names} have "
            f"{format_bytes(room)} left for KV cache; lower --max-seq-len or --max-batch-size, or raise "
            "--max-memory")
