"""The ``scan`` layer mode: one jitted program per stage step whose body is a ``jax.lax.scan`` over the stage's layers.

Why: an unrolled stage (:mod:`jaxmap.engine.engine`) is traced layer by layer and compiles into an executable that
holds every layer's code, so a start pays for tracing (or reading the program store) and for loading a large
executable from the persistent compilation cache, twice (prefill and decode); per-layer programs are small but pay
a dispatch per layer and per token. A scan traces one layer (or one period of layers) once and XLA compiles one loop
body, in one program per step.

How: a stage's layers are split into *segments* (:func:`segments`). A segment is a run of ``reps`` repetitions of a
*period* of ``p`` layers whose signatures (layer design, cache slots, the parameters' tree, shapes, dtypes, ISQ
types and shardings) repeat: Llama-like stages are one segment of period 1, Gemma 2's sliding/full alternation
period 2, Gemma 3's five sliding layers and one full period 6; a dense layer before MoE layers is a segment of its
own. Segments that repeat (``reps >= 2``) are scanned, each of the period's positions with its parameters stacked
along a new leading axis (QTensor leaves too) and its KV cache one buffer ``[reps, batch, kv_heads, slots,
head_dim]``, carried through the loop and written in place at ``[layer, ...]`` (:func:`jaxmap.engine.blocks.attention`
with ``layer``): the cache is never a scan output stacked afresh, which would copy it every token. A segment that
does not repeat runs unrolled inside the same program.

Stacking copies the weights once, at start, one tensor name at a time (the per-layer arrays of a name are dropped
once their stack exists, so host or device memory holds the model plus one name's stack at most). The stage's
``params["layers"]`` is then a :class:`LayerView` over the stacks: per-layer dicts on demand (a slice, copied), and
the stacks themselves as its pytree leaves, so byte counts and ``block_until_ready`` see each weight once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxmap.engine import layers
from jaxmap.quant import native

log = logging.getLogger(__name__)
MAX_PERIOD = 8  # longest repeating pattern looked for (Gemma 3's is 6)


@dataclasses.dataclass(frozen=True)
class Segment:
    """Layers ``start .. start + period * reps - 1`` (stage-relative): ``reps`` repetitions of ``period`` layers."""

    start: int
    period: int
    reps: int

    @property
    def end(self) -> int:
        return self.start + self.period * self.reps

    @property
    def scanned(self) -> bool:
        return self.reps >= 2


def segments(signatures: Sequence[Any], max_period: int = MAX_PERIOD) -> list[Segment]:
    """Cover ``signatures`` (one per layer, equal where layers may share a loop body) with segments, greedily from the
    first layer: at each position the period whose repetitions cover most layers (the shortest on a tie); where
    nothing repeats, one layer on its own."""
    n, i, out = len(signatures), 0, []
    while i < n:
        best = Segment(i, 1, 1)
        for p in range(1, max_period + 1):
            reps = 1
            while i + (reps + 1) * p <= n and all(signatures[i + reps * p + j] == signatures[i + j] for j in range(p)):
                reps += 1
            if reps >= 2 and p * reps > best.period * best.reps:
                best = Segment(i, p, reps)
        out.append(best)
        i = best.end
    return out


def _leaf_signature(leaf: Any) -> tuple:
    return (getattr(leaf, "shape", None), str(getattr(leaf, "dtype", None)), repr(getattr(leaf, "sharding", None)))


def layer_signature(params: dict, design, slots: int) -> tuple:
    """What two layers must share to run as one loop body: design, cache slots, the parameters' tree (QTensor types
    and shapes are static fields of the tree) and every leaf's shape, dtype and sharding."""
    leaves, tree = jax.tree.flatten(params)
    return design, slots, str(tree), tuple(_leaf_signature(a) for a in leaves)


def _stacked_sharding(sharding):
    """The sharding of a stack of arrays placed with ``sharding``: the same, with the new leading axis whole."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec), memory_kind=sharding.memory_kind)
    return sharding  # one device: the stack sits on it


@jax.tree_util.register_pytree_node_class
class LayerView(Sequence):
    """A scan stage's ``params["layers"]``: the per-layer parameter dicts, read out of the segments' stacks.

    Indexing copies one layer's slice out (for tests and tools that look at one layer); as a pytree its leaves are
    the stacks, each weight once."""

    def __init__(self, segs: Sequence[Segment], stacks: Sequence[tuple]):
        self.segs, self.stacks = tuple(segs), tuple(stacks)
        self._n = self.segs[-1].end if self.segs else 0

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(self._n))]
        j = j + self._n if j < 0 else j
        for seg, stack in zip(self.segs, self.stacks, strict=True):
            if seg.start <= j < seg.end:
                rep, pos = divmod(j - seg.start, seg.period)
                return stack[pos] if not seg.scanned else jax.tree.map(lambda a, r=rep: a[r], stack[pos])
        raise IndexError(j)

    def tree_flatten(self):
        return (self.stacks,), self.segs

    @classmethod
    def tree_unflatten(cls, segs, children):
        return cls(segs, children[0])


@dataclasses.dataclass
class ScanLayout:
    """A scan stage's segments and their parameters (per segment a tuple of ``period`` dicts, stacked if scanned)."""

    segments: tuple[Segment, ...]
    params: tuple

    def describe(self) -> str:
        return ", ".join(f"{s.reps}x{s.period}" if s.scanned else "1" for s in self.segments)


@functools.cache
def _stacker(sharding) -> Any:
    return jax.jit(lambda *a: jnp.stack(a), out_shardings=sharding)


def _stack(arrays: list) -> jax.Array:
    """One stacked array of a scanned run's per-layer arrays, placed as they were with a whole leading axis.

    On one CPU device the arrays are host memory already: stacking them with numpy and placing the result costs a
    copy, where a jitted ``jnp.stack`` per leaf shape costs a lowering and a compilation each (too small for the
    persistent cache to keep), 0.42 s of the default model's warm start for its 23 leaves. Sharded or accelerator
    arrays stack in a program, on their devices."""
    sharding = _stacked_sharding(arrays[0].sharding)
    devices = sharding.device_set
    if len(devices) == 1 and next(iter(devices)).platform == "cpu" and sharding.memory_kind in (None, "device"):
        return jax.device_put(np.stack([np.asarray(a) for a in arrays]), sharding)
    return _stacker(sharding)(*arrays)


def prepare(stage, designs: Sequence, kv_slots: Sequence[int]) -> ScanLayout | None:
    """Stack a resident stage's alike layers (see the module docstring); ``None`` when no run of layers repeats (the
    stage then unrolls). Replaces ``stage.params["layers"]`` by a :class:`LayerView`."""
    per_layer = list(stage.params["layers"])
    sigs = [layer_signature(p, designs[j], kv_slots[j]) for j, p in enumerate(per_layer)]
    segs = segments(sigs)
    if not any(s.scanned for s in segs):
        return None
    out = []
    for seg in segs:
        if not seg.scanned:
            out.append(tuple(per_layer[seg.start:seg.end]))
            continue
        stacks = []
        for pos in range(seg.period):
            members = [per_layer[seg.start + r * seg.period + pos] for r in range(seg.reps)]
            stacked = {}
            for name in list(members[0]):
                stacked[name] = jax.tree.map(lambda *a: _stack(list(a)), *[m[name] for m in members])
                for m in members:  # drop the per-layer arrays of this name: memory holds one name twice at most
                    m.pop(name)
            stacks.append(stacked)
        out.append(tuple(stacks))
    per_layer.clear()
    layout = ScanLayout(tuple(segs), tuple(out))
    stage.params["layers"] = LayerView(layout.segments, layout.params)
    log.debug("stage %d-%d scans its layers: %s", stage.start, stage.end, layout.describe())
    return layout


def new_cache(layout: ScanLayout, stage, batch: int, kv_heads: int, head_dim: int, kv_slots: Sequence[int],
              zeros) -> list:
    """A scan stage's KV buffers: per scanned segment one (K, V) stack ``[reps, batch, kv_heads, slots, head_dim]``
    per position of its period; per unrolled layer its own (K, V) as in the other modes. ``zeros(shape, sharding)``
    makes a buffer."""
    out = []
    for seg in layout.segments:
        for pos in range(seg.period):
            slots = kv_slots[stage.start + seg.start + pos]
            shape = (batch, kv_heads, slots, head_dim)
            if seg.scanned:
                shape, sharding = (seg.reps, *shape), _stacked_sharding(stage.cache_sharding)
            else:
                sharding = stage.cache_sharding
            out.append((zeros(shape, sharding), zeros(shape, sharding)))
    return out


def run_layers(layout: ScanLayout, seg_params: Sequence[tuple], caches: Sequence[tuple], x, start, ctx,
               designs: Sequence, shape, config) -> tuple[jax.Array, list]:
    """The stage's layers inside its step program: scanned segments as ``lax.scan`` with the cache stacks carried
    (written in place at each layer's entry), the others one after another."""
    new_caches: list = []
    ci = 0
    for seg, params in zip(layout.segments, seg_params, strict=True):
        seg_designs = designs[seg.start:seg.start + seg.period]
        seg_caches = tuple(caches[ci:ci + seg.period])
        ci += seg.period
        if not seg.scanned:
            for p, (kc, vc), d in zip(params, seg_caches, seg_designs, strict=True):
                x, kc, vc = layers.decoder_layer(p, x, kc, vc, start, ctx, shape.attend_len, config, d,
                                                 history=shape.history)
                new_caches.append((kc, vc))
            continue

        sliced, rebuild = native.split_stacked(params)  # the native kernel's weights stay whole (read in place)

        def body(carry, xs, seg_designs=seg_designs, rebuild=rebuild):
            h, cs = carry
            index, ps = xs
            ps = rebuild(ps, index)
            out = []
            for p, (kc, vc), d in zip(ps, cs, seg_designs, strict=True):
                h, kc, vc = layers.decoder_layer(p, h, kc, vc, start, ctx, shape.attend_len, config, d,
                                                 history=shape.history, layer=index)
                out.append((kc, vc))
            return (h, tuple(out)), None

        (x, seg_caches), _ = jax.lax.scan(body, (x, seg_caches), (jnp.arange(seg.reps, dtype=jnp.int32), sliced))
        new_caches.extend(seg_caches)
    return x, new_caches


def pin_caches(caches: Sequence[tuple], stage) -> list:
    """The stage's new KV buffers constrained to the shardings they were made with (a scan's stacks: the stacked
    one), for every layer mode: on a multi-device stage an expert-parallel layer's 2-D expert mesh (ep x tp/ep over
    the same devices) can otherwise make XLA pick a cache sharding the stage's 1-D mesh cannot express."""
    if len(stage.cache_sharding.device_set) < 2:
        return list(caches)
    stacked = _stacked_sharding(stage.cache_sharding)
    return [tuple(jax.lax.with_sharding_constraint(c, stacked if c.ndim == 5 else stage.cache_sharding)
                  for c in pair) for pair in caches]


def key_parts(layout: ScanLayout) -> tuple:
    """What of the layout goes into a stored program's key (beside the arguments' tree, which holds the stacks)."""
    return ("scan", layout.segments)
