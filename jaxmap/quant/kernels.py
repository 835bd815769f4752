"""Dequantization and the quantized matmuls (jnp, inside jit).

:func:`dense` hides the matmul: plain arrays take ``x @ w``, quantized ones are dequantized inside the jitted
program (:func:`qdot`). At one activation row (decode at batch 1) XLA:CPU fuses the unpacking into a matrix-vector
product per row class (even and odd rows: the two nibbles of a 4-bit byte), each reading the packed rows in order,
with the activation computed once beforehand (:func:`_materialized`; fused in, its producers were recomputed for every
output row). With more rows the weight is dequantized to float after its activation exists (:func:`_ones_after`) and
multiplied, as the left operand up to :data:`SMALL_ROWS` rows; a weight over :data:`CHUNK_BYTES` as float one row
class at a time.

Measured on one core (``taskset -c 1``; jit(qdot) against float32 ``x @ w``, same process, best of 7, weights in
cache; SmolLM2-135M's Q4_1 shapes): 1536x576 at 1 row 83 us (float32 56), at 8 rows 225 (178; before these forms
355); the 49152x576 LM head at 1 row 2.5 ms (4.3), at 8 rows 15 ms (14; before 70). At batch 1 the weights come from
memory, not cache, in a real decode: there SmolLM2's Q4_1 decode runs about 1.5x float32's speed on two
cores (README) and 2x on one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxmap.quant import native
from jaxmap.quant.mxfp4 import FP4_VALUES
from jaxmap.quant.qtensor import QTensor
from jaxmap.quant.types import QTYPES, _planes

# ---- unpacking ------------------------------------------------------------------------------------------------------

def _class_codes(planes: Sequence[jax.Array], widths: Sequence[int], classes: int, r: int) -> jax.Array:
    """Codes (int32) of the rows ``o`` with ``o % classes == r`` (``r`` may be traced): ``[rows / classes, n]``. A
    plane packing more rows per byte than there are classes serves several class rows from each byte row: broadcast
    over them and shifted by an iota (a per-row constant, so the unpacking stays vectorised along the row)."""
    out, shift = None, 0
    for plane, w in zip(planes, widths, strict=True):
        per = 8 // w
        rows, n = plane.shape
        if per <= classes:
            sel = plane.reshape(rows * per // classes, classes // per, n)
            sel = jax.lax.dynamic_index_in_dim(sel, r // per, 1, keepdims=False).astype(jnp.int32)
            part = sel if w == 8 else (sel >> ((r % per) * w)) & ((1 << w) - 1)
        else:
            shifts = ((jnp.arange(per // classes, dtype=jnp.int32) * classes + r) * w)[None, :, None]
            part = (plane.astype(jnp.int32)[:, None] >> shifts) & ((1 << w) - 1)
            part = part.reshape(rows * per // classes, n)
        out = part << shift if out is None else out | (part << shift)
        shift += w
    return out


def _class_rows(a: jax.Array, classes: int, r: int) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(a.reshape(a.shape[0] // classes, classes, *a.shape[1:]), r, 1, keepdims=False)


def _per_sub(d: jax.Array, codes: jax.Array | None, per: int, n_sub: int) -> jax.Array:
    """Per-sub-block factors ``[..., n_sub]`` from per-block ``d [..., n_block]`` (``per`` sub-blocks per block, the
    last block possibly short), times the sub-blocks' integer ``codes`` (K types' scale or min codes) if given."""
    if d.shape[-1] * per == n_sub:  # whole blocks
        if codes is None:
            return d if per == 1 else jnp.repeat(d, per, axis=-1)
        return (d[..., None] * codes.reshape(*d.shape, per)).reshape(codes.shape)
    a = jnp.repeat(d, per, axis=-1)[..., :n_sub]
    return a if codes is None else a * codes


SMALL_ROWS = 16  # products with at most this many activation rows take the weight as the left operand
CHUNK_BYTES = 1 << 22  # a weight larger than this as float is dequantized and multiplied in row classes this size


def _materialized(x: jax.Array) -> jax.Array:
    """``x`` computed once into its own buffer (times one), never recomputed inside a consumer's loop.

    XLA:CPU fuses the dequantization into a matrix-vector product's loop, and then fuses the vector's cheap
    elementwise producers (the norm's multiplies, SwiGLU's product, the previous product's row-class interleave, the
    embedding lookup) into that loop too, recomputing them for every output row (decode 2-5x slower). A reduction is
    never fused into a consumer that reuses its elements (``CpuInstructionFusion::ShouldFuse``); a product over
    ``[x, 1]`` is one XLA does not simplify away and YNNPACK does not take (it takes add/max/min reductions, and fuses
    their consumers in). An ``optimization_barrier`` is removed before fusion, as is a ``lax.cond`` whose branches
    are the same.
    """
    return jnp.stack([x, jnp.ones_like(x)]).prod(0)


def _ones_after(x: jax.Array, sub: int, dtype) -> jax.Array:
    """Ones ``[in / sub]`` computed from the bits of ``x``'s first row (an integer zero XLA does not fold), one per
    sub-block, so a weight's dequantization scaled by them cannot run before ``x`` exists, and a tensor-parallel
    ``x`` split along ``in`` (whole sub-blocks per shard) needs no communication for them.

    Without it XLA schedules every layer's dequantization (it reads only parameters) at the start of the program:
    every float weight alive at once in one temporary buffer, whose pages are mapped afresh on every call (decode at
    batch 8: 17k page faults per layer pair, 8x slower).
    """
    first = x.reshape(-1, x.shape[-1])[0, ::sub].astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(first, jnp.uint32)
    return ((bits >> 16) >> 16).astype(dtype) + 1


def _values(q, codes: jax.Array, dtype) -> jax.Array:
    """Value codes as the numbers they stand for: ``code - offset``, or (MXFP4) the FP4 E2M1 value of each code."""
    if q.kind == "mxfp4":
        return jnp.asarray(FP4_VALUES, dtype)[codes]
    return (codes - q.offset).astype(dtype)


def _scale_values(q, d: jax.Array, dtype) -> jax.Array:
    """Stored block scales as floats: MXFP4's E8M0 bytes are 2^(e - 127); the others are floats already."""
    if q.kind == "mxfp4":
        return jnp.ldexp(jnp.ones(d.shape, jnp.float32), d.astype(jnp.int32) - 127).astype(dtype)
    return d.astype(dtype)


def _codes(planes: Sequence[jax.Array], widths: Sequence[int]) -> jax.Array:
    """All codes (int32) in row order ``[rows, ...]``: each byte row broadcast over the rows it packs, shifted by an
    iota (a per-row constant, so the unpacking stays vectorised along the row)."""
    out, shift = None, 0
    for plane, w in zip(planes, widths, strict=True):
        per = 8 // w
        part = plane.astype(jnp.int32)
        if per > 1:
            shifts = (jnp.arange(per, dtype=jnp.int32) * w).reshape(1, per, *([1] * (plane.ndim - 1)))
            part = ((part[:, None] >> shifts) & ((1 << w) - 1)).reshape(plane.shape[0] * per, *plane.shape[1:])
        out = part if out is None else out | (part << shift)
        shift += w
    return out


# ---- scales and float weights ---------------------------------------------------------------------------------------

def _block_scales(w: QTensor, dtype, ones: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """Per sub-block scale ``a`` and offset ``b`` (None: no offset), ``[out, n_sub]`` in row order, times ``ones``
    (:func:`_ones_after`) when given. A K type's come from its scale/min code planes, computed once (materialised)
    rather than for every weight element."""
    q = QTYPES[w.qtype]
    out = w.shape[0]

    def scaled(a):
        return a if ones is None else a * ones

    if q.kind != "k":  # Q8K on a short row stores one d per sub-block group: repeat it per sub-block
        d = _scale_values(q, w.d, dtype)
        a = _per_sub(d, None, max(1, q.block // w.sub), w.shape[1] // w.sub) if w.sub else d
        return scaled(a.astype(dtype)), (None if w.m is None else w.m.astype(dtype))
    per, n_sub = q.block // w.sub, w.shape[1] // w.sub  # the last super-block may be short (see _per_sub)
    sc = (_codes(w.sc, _planes(q.scale_bits)) - q.scale_offset).astype(dtype).reshape(out, n_sub)
    a = _materialized(scaled(_per_sub(w.d.astype(dtype), sc, per, n_sub)))
    if w.dmin is None:
        return a, None
    mc = _codes(w.mc, _planes(q.min_bits)).astype(dtype).reshape(out, n_sub)
    return a, _materialized(scaled(-_per_sub(w.dmin.astype(dtype), mc, per, n_sub)))


def _apply_scales(v: jax.Array, a: jax.Array, b: jax.Array | None, sub: int) -> jax.Array:
    rows, n = v.shape
    v = v.reshape(rows, n // sub, sub) * a[..., None]
    if b is not None:
        v = v + b[..., None]
    return v.reshape(rows, n)


def _value_classes(qtype: str) -> int:
    """Row classes of a decode product: 2 where a value plane packs several rows per byte, else 1. Each class reads
    the 4-bit plane's rows in order; narrower planes serve their class rows by a per-row shift (one class per row
    sharing a byte, 8 for a 1-bit plane, read every plane with a stride: 2.5x slower out of cache for Q5_0)."""
    q = QTYPES[qtype]
    return 1 if q.kind == "fp8" or q.widths == (8,) else 2


def _class_weight(w: QTensor, classes: int, r, dtype, a, b) -> jax.Array:
    """The float rows ``o % classes == r`` of the weight, ``[out / classes, in]``: codes, offset, scale, min."""
    q = QTYPES[w.qtype]
    if q.kind == "fp8":
        v = _class_rows(w.q[0], classes, r).astype(dtype)
    else:
        v = _values(q, _class_codes(w.q, q.widths, classes, r), dtype)
    return _apply_scales(v, _class_rows(a, classes, r), None if b is None else _class_rows(b, classes, r), w.sub)


def _weight(w: QTensor, dtype, a, b) -> jax.Array:
    q = QTYPES[w.qtype]
    v = w.q[0].astype(dtype) if q.kind == "fp8" else _values(q, _codes(w.q, q.widths), dtype)
    return _apply_scales(v, a, b, w.sub)


def dequantize(w: QTensor, dtype=jnp.float32) -> jax.Array:
    """The float ``[out, in]`` weight."""
    return _weight(w, dtype, *_block_scales(w, dtype, None))


def _chunk_classes(w: QTensor, itemsize: int) -> int:
    """How many row classes to dequantize one at a time: 1 while the float weight fits :data:`CHUNK_BYTES`, else the
    fewest (doubling from the value classes) whose class does, keeping a multiple of 8 rows per class (so a
    column-parallel split of up to 8 shards still splits every class evenly)."""
    out, n = w.shape
    if out * n * itemsize <= CHUNK_BYTES:
        return 1
    k = _value_classes(w.qtype)
    while out // k * n * itemsize > CHUNK_BYTES and out % (2 * k) == 0 and (out // (2 * k)) % 8 == 0:
        k *= 2
    return k


# ---- products -------------------------------------------------------------------------------------------------------

def qdot(x: jax.Array, w: QTensor) -> jax.Array:
    """``x [..., in] @ W.T`` for a quantized ``W [out, in]``, in ``x``'s dtype. The form depends on the (static)
    number of activation rows:

    - one (decode at batch 1): one matrix-vector product per row class (:func:`_value_classes`), over a weight XLA
      dequantizes inside the product's loop; outputs interleaved into row order. ``x`` is materialised first
      (:func:`_materialized`), as are a K type's sub-block scales.
    - more: the weight is dequantized to float, after ``x`` exists (:func:`_ones_after`), and multiplied; a weight
      over :data:`CHUNK_BYTES` as float one row class at a time in a loop, so the float temporary stays that size.
      Up to :data:`SMALL_ROWS` rows (batched decode) the weight is the left operand, ``(W @ x.T).T``: the layout the
      GEMM reads fastest (``x @ W.T`` transposes it, 1.5-2.5x slower at 8 rows); prefill takes ``x @ W.T``.
    """
    lead, n = x.shape[:-1], x.shape[-1]
    if isinstance(w, native.LayerOf):  # one layer of a scanned stack, for the native kernel
        if math.prod(lead) <= native.max_rows(w.stack):
            return native.qmatvec(x, w.stack, w.index)
        w = w.sliced()
    rows, out = math.prod(lead), w.shape[0]
    if w.kernel == native.KERNEL and rows <= native.max_rows(w):
        return native.qmatvec(x, w)
    q = QTYPES[w.qtype]
    ones = _ones_after(x, w.sub, x.dtype) if rows > 1 or q.kind == "k" else None
    a, b = _block_scales(w, x.dtype, ones)
    if rows == 1:
        x = _materialized(x)
        classes = _value_classes(w.qtype)
        ys = [x @ _class_weight(w, classes, r, x.dtype, a, b).T for r in range(classes)]
        return ys[0] if classes == 1 else jnp.stack(ys, axis=-1).reshape(*lead, out)
    x2 = x.reshape(rows, n)
    small = rows <= SMALL_ROWS

    def product(weight):  # [rows_w, n] -> [rows_w, rows] (small) or [rows, rows_w]
        return _materialized(weight @ x2.T) if small else x2 @ weight.T  # kept [rows_w, rows]: XLA folds a .T

    classes = _chunk_classes(w, x.dtype.itemsize)
    if classes == 1:
        y = product(_weight(w, x.dtype, a, b))
    else:
        axis = 1 if small else 2  # the class axis of y: [out / classes, classes, rows] or [rows, out / classes, ...]

        def body(r, y):
            part = jnp.expand_dims(product(_class_weight(w, classes, r, x.dtype, a, b)), axis)
            return jax.lax.dynamic_update_slice_in_dim(y, part, r, axis)

        shape = (out // classes, classes, rows) if small else (rows, out // classes, classes)
        y = jax.lax.fori_loop(0, classes, body, jnp.zeros(shape, x.dtype))
        y = y.reshape((out, rows) if small else (rows, out))
    return (y.T if small else y).reshape(*lead, out)


def dense(x: jax.Array, w) -> jax.Array:
    """``x @ w`` for a plain ``[in, out]`` weight, or the quantized product for a :class:`QTensor` ``[out, in]``."""
    return qdot(x, w) if isinstance(w, (QTensor, native.LayerOf)) else x @ w


def dense_rows(x: jax.Array, w) -> jax.Array:
    """``x @ w.T`` for a plain ``[out, in]`` weight (the tied LM head), or the quantized product."""
    return qdot(x, w) if isinstance(w, (QTensor, native.LayerOf)) else jnp.einsum("...d,vd->...v", x, w.astype(x.dtype))


def take_rows(w, ids: jax.Array, dtype) -> jax.Array:
    """Embedding lookup: rows ``ids`` of a plain ``[vocab, embed]`` table or of a quantized one (dequantized)."""
    if not isinstance(w, QTensor):
        return jnp.take(w, ids, axis=0).astype(dtype)
    q = QTYPES[w.qtype]
    n = w.shape[1]

    def codes(planes, widths):
        out, shift = None, 0
        for plane, bits in zip(planes, widths, strict=True):
            per = 8 // bits
            sel = jnp.take(plane, ids // per, axis=0)
            part = sel.astype(jnp.int32) if bits == 8 else (
                (sel.astype(jnp.int32) >> ((ids % per) * bits)[..., None]) & ((1 << bits) - 1))
            out = part << shift if out is None else out | (part << shift)
            shift += bits
        return out

    lead = ids.shape
    if q.kind == "fp8":
        v = jnp.take(w.q[0], ids, axis=0).astype(dtype)
    else:
        v = _values(q, codes(w.q, q.widths), dtype)
    d = _scale_values(q, jnp.take(w.d, ids, axis=0), dtype)
    n_sub = n // w.sub
    if q.kind == "k":
        sc = (codes(w.sc, _planes(q.scale_bits)) - q.scale_offset).astype(dtype)
        a = _per_sub(d, sc, q.block // w.sub, n_sub)
        b = None
        if w.dmin is not None:
            mc = codes(w.mc, _planes(q.min_bits)).astype(dtype)
            dmin = jnp.take(w.dmin, ids, axis=0).astype(dtype)
            b = -_per_sub(dmin, mc, q.block // w.sub, n_sub)
    else:
        a = _per_sub(d, None, max(1, q.block // w.sub), n_sub)
        b = None if w.m is None else jnp.take(w.m, ids, axis=0).astype(dtype)
    v = v.reshape(*lead, n_sub, w.sub) * a[..., None]
    if b is not None:
        v = v + b[..., None]
    return v.reshape(*lead, n)

