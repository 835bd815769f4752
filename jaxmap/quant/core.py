"""Weight-only quantization: the types, the packed storage (:class:`QTensor`), host-side quantizers, ``dense``.

Every quantized weight is stored ``[out, in]`` (a projection in Hugging Face's orientation, the embedding table as it
is) and quantized along the input (contraction) dimension in blocks, so a column-parallel split of ``out`` and a
row-parallel split of ``in`` both keep whole blocks. Values are unsigned integer *codes* packed into bit planes of
width 8, 4, 2 or 1 (a 6-bit code is a 4-bit plane plus a 2-bit plane, 5 = 4 + 1, 3 = 2 + 1) across *output rows*:
byte ``[j, i]`` of a ``w``-bit plane holds column ``i`` of rows ``8/w * j + k`` at shift ``k * w`` (:func:`pack_np`),
so every row's codes stay contiguous along the contraction. A weight is ``a * (code - offset) + b`` with ``a`` and
``b`` per sub-block:

- Q4_0/Q5_0/Q8_0: ``a`` = a float16 scale per 32; Q4_1/Q5_1 add a float16 ``b`` (min) per 32 (GGUF's blocks).
- K types (256-element super-blocks): one float16 ``d`` (and ``dmin``) per 256, integer scale codes (and min codes)
  per 16 or 32, packed in bit planes like the values: ``a = d * scale_code``, ``b = -dmin * min_code``. The bit
  counts are GGUF's, so bits per weight match GGUF exactly (Q8K leaves out GGUF's ``bsums``, used only by ggml's
  kernels). A row whose length is a multiple of the sub-block (``short_unit``) but not of 256 ends in a *short*
  super-block: its own ``d`` (and ``dmin``) over its fewer sub-blocks. Scale codes are stored one per sub-block
  (``[out, n_sub]``), so no padding is needed; only the unsplit (one input shard) layout may have one, as a split
  input must give every shard the same layout (see :func:`fits`).
- INT8 / F8E4M3: one float32 scale per output channel (stored once per input shard); INT4: symmetric 4-bit with a
  float16 scale per group of 128 inputs.

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

import concurrent.futures
import dataclasses
import functools
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmap.errors import UserError
from jaxmap.quant.types import (
    GGUF_NATIVE,
    IMPORTANCE_TYPES,
    QTYPES,
    QType,
    _planes,
    fits,
)

# ---- storage --------------------------------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QTensor:
    """A quantized ``[out, in]`` weight: every array has the rows (packed) on axis 0 and the input on axis 1; see the
    module docstring.

    ``q``: value-code planes ``[out * w / 8, in]`` (uint8; float8 ``[out, in]`` for F8E4M3); ``d``: float scale per
    block ``[out, n_block]`` (``n_block`` rounded up: a short last super-block has its own); ``m``: float16 min per
    block (Q4_1, Q5_1) ``[out, n_block]``; ``dmin``: K types' min scale ``[out, n_block]``; ``sc`` / ``mc``: K
    types' scale / min code planes ``[out * w / 8, n_sub]``, one code per sub-block of ``sub`` inputs.
    """

    q: tuple
    d: jax.Array
    m: jax.Array | None = None
    dmin: jax.Array | None = None
    sc: tuple = ()
    mc: tuple = ()
    qtype: str = dataclasses.field(default="Q8_0", metadata={"static": True})
    shape: tuple = dataclasses.field(default=(0, 0), metadata={"static": True})  # (out, in)
    sub: int = dataclasses.field(default=32, metadata={"static": True})  # elements per value group

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(self))

    @property
    def dtype(self):  # what a caller casting "the weight" sees; compute happens in the activation dtype
        return jnp.float32


def is_quantized(x) -> bool:
    return isinstance(x, QTensor)


def shardings_for(qt: QTensor, out_axis, in_axis, mesh) -> QTensor:
    """A QTensor of NamedShardings: every array follows its weight's split (rows on ``out_axis``, groups on
    ``in_axis``), so scales sit with the blocks they scale."""
    from jax.sharding import NamedSharding, PartitionSpec

    def spec(a):
        return NamedSharding(mesh, PartitionSpec(out_axis, in_axis, *([None] * (a.ndim - 2))))

    return jax.tree_util.tree_map(spec, qt)


# ---- bit planes -----------------------------------------------------------------------------------------------------

def pack_np(codes: np.ndarray, widths: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Unsigned codes ``[rows, n]`` -> bit planes ``[rows * w / 8, n]`` (uint8), low bits in the first plane.

    A ``w``-bit plane packs ``8 / w`` consecutive rows per byte row: byte ``[j, i]`` holds rows ``8/w * j + k`` at
    shift ``k * w``. Packing across rows (not along the contraction) keeps each row's inner loop contiguous, which
    XLA:CPU fuses into the matrix-vector product (measured: 1.8 ms for a 49152x576 4-bit LM head against 10-20 ms
    for nibbles packed along the row, and 3.3 ms in float32).
    """
    codes = codes.astype(np.uint8)
    planes, shift = [], 0
    rows, n = codes.shape
    for w in widths:
        per = 8 // w
        part = ((codes >> shift) & ((1 << w) - 1)).reshape(rows // per, per, n)
        byte = np.zeros((rows // per, n), np.uint8)
        for k in range(per):
            byte |= (part[:, k] << (k * w)).astype(np.uint8)
        planes.append(byte)
        shift += w
    return tuple(planes)


def unpack_np(planes: Sequence[np.ndarray], widths: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`pack_np`: int32 codes ``[rows, n]``."""
    out, shift = None, 0
    for plane, w in zip(planes, widths, strict=True):
        per = 8 // w
        part = np.stack([(plane >> (k * w)) & ((1 << w) - 1) for k in range(per)], axis=1)
        part = part.reshape(-1, plane.shape[-1]).astype(np.int32)
        out = part << shift if out is None else out | (part << shift)
        shift += w
    return out


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


# ---- host-side quantization ---------------------------------------------------------------------------------------

def _round(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 0.5)


def importance_weights(importance: np.ndarray | None, n: int) -> np.ndarray | None:
    """A weight per input column from an importance vector ``[in]`` (mean squared activation of that input): floored
    at 1% of its mean, so a column the calibration text never exercised is still fitted, not ignored."""
    if importance is None:
        return None
    imp = np.asarray(importance, np.float32).reshape(-1)
    if imp.shape != (n,):
        raise ValueError(f"importance has {imp.size} entries for a weight with {n} inputs")
    mean = float(imp.mean()) if imp.size else 0.0
    if not np.isfinite(mean) or mean <= 0:
        return None
    return np.maximum(imp, np.float32(0.01 * mean)) / np.float32(mean)


def quantize(w: np.ndarray, qtype: str, in_shards: int = 1, importance: np.ndarray | None = None) -> QTensor:
    """Quantize a float ``[out, in]`` matrix (host numpy) into ``qtype`` (already chosen to fit ``in_shards``).

    ``importance`` (``[in]``, from an importance matrix: :mod:`jaxmap.imatrix`): each block's scales (and mins) are
    fitted to minimise the error weighted by it, so inputs that carry more activation energy are represented more
    precisely (llama.cpp's imatrix quantization; here also for Q8_0 and INT4, see :data:`IMPORTANCE_TYPES`)."""
    q = QTYPES[qtype]
    w = np.asarray(w, np.float32)
    out, n = w.shape
    if not fits(qtype, n, in_shards):
        raise ValueError(f"{qtype} does not fit a row of {n} inputs split {in_shards} ways (choose_type first)")
    weights = importance_weights(importance, n) if qtype in IMPORTANCE_TYPES else None
    if q.kind == "simple":
        return _from_gguf_simple(w, q, weights)
    if q.kind == "k":
        return _quantize_k(w, q, weights)
    if q.kind == "int4":
        g = w.reshape(out, n // q.block, q.block)
        if weights is not None:
            # codes -8..7 as Q4_0's: a signed scale puts the block's extreme on -8
            (scale,) = _chunked(lambda r, wt: (_search_symmetric(r, wt, 8),), g,
                                weights.reshape(1, n // q.block, q.block))
            d = scale.astype(np.float16)
        else:
            d = (np.abs(g).max(-1) / 7).astype(np.float16)
        inv = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d.astype(np.float32)))
        codes = np.clip(_round(g * inv[..., None]), -8, 7) + 8
        return QTensor(pack_np(codes.reshape(out, n), q.widths), d, qtype=qtype, shape=(out, n), sub=q.sub)
    # per-channel (INT8, F8E4M3) or per-256 (Q8K) float32 scales
    if q.block:  # Q8K: a short last block (its own scale) where 256 does not divide the row
        group = math.gcd(n, q.block)
        blocks = -(-n // q.block)
        top = np.abs(_pad_to(w, blocks * q.block).reshape(out, blocks, q.block)).max(-1)
    else:
        group = n // in_shards
        top = np.abs(w).max(-1, keepdims=True)  # one scale over the whole row, stored once per shard
    if q.kind == "fp8":
        d = (top / 448.0).astype(np.float32)
    else:
        d = (top / 127.0).astype(np.float32)
    if not q.block:
        d = np.repeat(d, in_shards, axis=1)
    inv = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d))
    if q.block:
        inv = np.repeat(inv, q.block // group, axis=1)[:, :n // group]
    scaled = w.reshape(out, -1, group) * inv[..., None]
    if q.kind == "fp8":
        values = scaled.reshape(out, n).astype(jnp.float8_e4m3fn)
        return QTensor((values,), d, qtype=qtype, shape=(out, n), sub=group)
    codes = np.clip(_round(scaled), -127, 127) + 128
    return QTensor((codes.reshape(out, n).astype(np.uint8),), d, qtype=qtype, shape=(out, n), sub=group)


def _pad_to(w: np.ndarray, n: int) -> np.ndarray:
    """``w [out, in]`` with zero columns appended up to ``n`` (itself when ``in == n``)."""
    return w if w.shape[1] == n else np.pad(w, ((0, 0), (0, n - w.shape[1])))


def _from_gguf_simple(w: np.ndarray, q: QType, weights: np.ndarray | None = None) -> QTensor:
    """GGUF's ``_0``/``_1`` blocks with a least-squares scale (and min) search per block: the same blocks as
    llama.cpp's, lower error than its plain max (Q8_0, Q4_0, Q5_0) or min/max (Q4_1, Q5_1). ``weights`` ``[in]``:
    the error each search minimises is weighted per input column (an importance matrix)."""
    out, n = w.shape
    x = w.reshape(out, n // q.block, q.block)
    wb = None if weights is None else weights.reshape(1, n // q.block, q.block)
    if q.bits == 8:
        d, codes = _chunked(_search_q8_0, x, wb)
        return QTensor(pack_np(codes.reshape(out, n) + q.offset, q.widths), d, qtype=q.name, shape=(out, n),
                       sub=q.sub)
    levels = 1 << q.bits
    if q.has_min:
        scale, mins = _chunked(lambda r: _search_affine(r, wb, levels - 1, -1.0, 0.1, 20), x)
        d, m = scale.astype(np.float16), (-mins).astype(np.float16)
        a, b = d.astype(np.float32)[..., None], m.astype(np.float32)[..., None]
        codes = np.where(a == 0, 0, np.clip(_round((x - b) / np.where(a == 0, 1, a)), 0, levels - 1))
    else:
        (scale,) = _chunked(lambda r: (_search_symmetric(r, wb, q.offset),), x)
        d, m = scale.astype(np.float16), None
        a = d.astype(np.float32)[..., None]
        codes = np.clip(_round(x / np.where(a == 0, 1, a)), -q.offset, q.offset - 1) + q.offset
        codes = np.where(a == 0, q.offset, codes)
    return QTensor(pack_np(codes.reshape(out, n), q.widths), d, m=m, qtype=q.name, shape=(out, n), sub=q.sub)


def host_threads() -> int:
    """Threads for host-side quantization: the cores this process may run on (``JAXMAP_QUANT_THREADS`` overrides)."""
    env = os.environ.get("JAXMAP_QUANT_THREADS")
    if env:
        if not env.strip().isdigit() or int(env) < 1:
            raise UserError(f"JAXMAP_QUANT_THREADS must be a positive integer, got {env!r}")
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="jaxmap-quant")


def _chunked(fn, x: np.ndarray, *args, elements: int | None = None):
    """``fn(x, *args)`` (a tuple of arrays over ``x``'s leading axis) over slices of that axis of about ``elements``
    elements (whole multiples of 8 rows, so row-packed planes are unaffected), keeping temporaries cache-sized. The
    slices run on :func:`host_threads` threads (numpy releases the GIL in its array loops). Measured on 2 cores, a
    4096x4096 matrix: Q8_0 1.4 s on one thread with 64K-element slices, 0.9-1.0 s on two with 256K (two threads on
    64K slices: no faster, the interpreter's share between numpy calls serialises them); Q4K 1.8 -> 1.0-1.4 s."""
    threads = host_threads()
    elements = elements or (1 << 18 if threads > 1 else 1 << 16)
    step = max(8, elements // max(1, x[0].size) // 8 * 8)
    if x.shape[0] <= step:
        return fn(x, *args)
    starts = range(0, x.shape[0], step)
    if threads > 1:
        parts = list(_pool(threads).map(lambda i: fn(x[i:i + step], *args), starts))
    else:
        parts = [fn(x[i:i + step], *args) for i in starts]
    return tuple(np.concatenate(p) for p in zip(*parts, strict=True))


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("...i,...i->...", a, b)


def _search_symmetric(x: np.ndarray, weights: np.ndarray | None, nmax: int, steps: int = 9) -> np.ndarray:
    """llama.cpp's ``make_qx_quants``: the scale ``s`` of ``x ~ s * L`` over the last axis, codes ``L`` in
    ``[-nmax, nmax - 1]``: of ``2 * steps + 1`` trial scales around ``extreme / -nmax`` (rounding ``x`` with each),
    the codes whose weighted least-squares scale leaves the least error, and that scale. ``weights`` None: all 1."""
    idx = np.abs(x).argmax(-1)[..., None]
    extreme = np.take_along_axis(x, idx, -1)
    extreme = np.where(extreme == 0, 1, extreme)
    best = np.full(x.shape[:-1], -1.0, np.float32)
    scale = np.zeros(x.shape[:-1], np.float32)
    for k in range(-steps, steps + 1):
        L = np.clip(np.rint(x * (-(nmax + 0.1 * k) / extreme)), -nmax, nmax - 1)
        wl = L if weights is None else weights * L
        sumlx, suml2 = _dot(wl, x), _dot(wl, L)
        ok = suml2 > 0
        suml2 = np.where(ok, suml2, 1)
        score = np.where(ok, sumlx * sumlx / suml2, 0)  # the error this scale removes
        better = score > best
        best = np.where(better, score, best)
        scale = np.where(better, sumlx / suml2, scale)
    return scale


# Q8_0's trial scales: the block's largest |x| over these (llama.cpp's 127 first; 128 only where that extreme is
# negative, as code -128 exists). On standard normal 32-blocks they cut the RMS error by 12% (127..112 by 0.5: 13%).
_Q8_0_DIVISORS = (128, 127, 126, 125, 124, 123, 122, 121, 120)


# With an importance matrix, more trial divisors (every integer 128..112): the weighted optimum lies further from
# amax / 127 than the plain one. Measured on SmolLM2 (Q8_0, imatrix from a license text, scored on the quality
# text): mean KL 0.00037 with the trials above, 0.00028 with these (unweighted: 0.00067).
_Q8_0_WEIGHTED_DIVISORS = tuple(range(128, 111, -1))


def _search_q8_0(x: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 blocks ``x [..., 32]`` -> float16 scales ``[...]`` and codes in ``[-128, 127]``: llama.cpp's
    ``amax / 127`` (bit-exact with gguf's reference quantizer) unless a trial scale leaves less squared error. Each
    trial ``amax / t`` (:data:`_Q8_0_DIVISORS`) is rounded to float16 and the block rounded with it, then the
    least-squares scale of those codes (rounded to float16) re-rounds the block once more; every candidate is
    scored by its own float16 scale, so the result is never worse than the reference's. ``weights`` (broadcast
    against ``x``): the squared error and the least-squares refit are weighted by it, over
    :data:`_Q8_0_WEIGHTED_DIVISORS`."""
    from gguf.quants import np_roundf

    amax = np.abs(x).max(-1)
    neg = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0] < 0
    d0 = amax / np.float32(127)
    inv = np.where(d0 == 0, np.float32(0), 1 / np.where(d0 == 0, np.float32(1), d0))
    codes = np_roundf(x * inv[..., None])  # the reference, as gguf computes it
    d = d0.astype(np.float16)

    wts = np.ones((1,) * x.ndim, np.float32) if weights is None else weights

    def error(scale, L):
        return (wts * np.square(scale.astype(np.float32)[..., None] * L - x)).sum(-1)

    best = error(d, codes)

    def consider(scale):  # a float16 scale: its codes, and keep it where it fits better
        nonlocal best, d, codes
        s = scale.astype(np.float32)
        L = np.clip(np.rint(x / np.where(s == 0, 1, s)[..., None]), -128, 127)
        err = error(scale, L)
        better = (err < best) & (s > 0)
        best, d = np.where(better, err, best), np.where(better, scale, d)
        codes = np.where(better[..., None], L, codes)
        return L

    for t in _Q8_0_DIVISORS if weights is None else _Q8_0_WEIGHTED_DIVISORS:
        if t > 127 and not neg.any():
            continue
        trial = np.where(neg, amax / np.float32(t), amax / np.float32(min(t, 127)))
        L = consider(trial.astype(np.float16))
        wl = L if weights is None else wts * L
        ll = _dot(wl, L)
        consider(np.where(ll > 0, _dot(wl, x) / np.where(ll > 0, ll, 1), 0).astype(np.float16))
    return d, codes.astype(np.int32)


def _search_affine(x: np.ndarray, weights: np.ndarray | None, nmax: int, rmin: float, rdelta: float, nstep: int):
    """llama.cpp's ``make_qkx2_quants``: ``x ~ s * L + m`` over the last axis (``m <= 0``, ``L`` in ``[0, nmax]``),
    from min/max, then ``nstep + 1`` trial scales ``(nmax + rmin + rdelta * i) / (max - min)`` whose rounded codes
    are refitted by weighted least squares; keeps the lowest weighted error. Returns ``s`` and ``-m`` (the stored,
    non-negative min). ``weights`` None: all 1."""
    lo = np.minimum(x.min(-1), 0)
    span = x.max(-1) - lo
    flat = span <= 0
    span = np.where(flat, 1, span)
    xs = x - lo[..., None]
    w = np.ones_like(x) if weights is None else weights
    sw, sx, sxx = w.sum(-1), _dot(w, x), _dot(w * x, x)

    def error(s, m, sl, sl2, sxl):  # sum w (s L + m - x)^2, expanded
        return s * s * sl2 + 2 * s * m * sl - 2 * s * sxl + m * m * sw - 2 * m * sx + sxx

    scale, mn = span / nmax, lo
    best = None
    for i in range(-1, nstep + 1):
        L = np.clip(np.rint(xs * ((nmax + (0 if i < 0 else rmin + rdelta * i)) / span)[..., None]), 0, nmax)
        wl = L if weights is None else w * L
        sl, sl2, sxl = wl.sum(-1), _dot(wl, L), _dot(wl, x)
        if i < 0:  # the plain min/max fit
            best = error(scale, mn, sl, sl2, sxl)
            continue
        det = sw * sl2 - sl * sl
        ok = det > 0
        det = np.where(ok, det, 1)
        s, m = (sw * sxl - sx * sl) / det, (sl2 * sx - sl * sxl) / det
        pos = m > 0  # the min must stay <= 0: refit the scale alone
        s = np.where(pos, sxl / np.where(sl2 > 0, sl2, 1), s)
        m = np.where(pos, 0, m)
        err = error(s, m, sl, sl2, sxl)
        better = ok & (err < best)
        best = np.where(better, err, best)
        scale, mn = np.where(better, s, scale), np.where(better, m, mn)
    return np.where(flat, 0, scale), np.where(flat, -lo, -mn)


def _best_k_codes(x, weights, a_cands, b_cands, levels, lo):
    """For each sub-block, the candidate ``(a, b)`` (``x ~ a * L + b``) with the lowest weighted error after
    re-rounding the value codes; returns the chosen candidate's index."""
    best = idx = None
    for k, (a, b) in enumerate(zip(a_cands, b_cands, strict=True)):
        a3, b3 = a[..., None], b[..., None]
        L = np.clip(_round((x - b3) / np.where(a3 == 0, 1, a3)), lo, lo + levels - 1)
        err = (weights * (a3 * L + b3 - x) ** 2).sum(-1)
        if best is None:
            best, idx = err, np.zeros(err.shape, np.int32)
        else:
            better = err < best
            best, idx = np.where(better, err, best), np.where(better, k, idx)
    return idx


def _quantize_k(w: np.ndarray, q: QType, weights: np.ndarray | None = None) -> QTensor:
    """K types: a scale search per sub-block (llama.cpp's ``make_qkx2_quants`` / ``make_qx_quants``), the
    sub-block scales (and mins) quantized against the super-block's ``d`` (``dmin``), then each sub-block picks the
    neighbouring scale/min codes (+-1) whose re-rounded values fit it best (llama.cpp rounds them once)."""
    out, n = w.shape
    blocks, n_sub = -(-n // q.block), n // q.sub
    # A short last super-block is searched padded with zero sub-blocks: they get scale and min 0, so the super-block's
    # d/dmin (maxima over its sub-blocks) and every real sub-block's codes are those of the short block alone.
    x = _pad_to(w, blocks * q.block).reshape(out, blocks, q.block // q.sub, q.sub)
    importance = None if weights is None else np.pad(weights, (0, blocks * q.block - n), constant_values=1).reshape(
        1, blocks, q.block // q.sub, q.sub)
    codes, d, dmin, sc, mc = _chunked(_k_rows, x, q, importance)
    codes = codes.reshape(out, -1)[:, :n]
    sc, mc = sc.reshape(out, -1)[:, :n_sub], mc.reshape(out, -1)[:, :n_sub]
    if q.has_min:
        return QTensor(pack_np(codes, q.widths), d, dmin=dmin, sc=pack_np(sc, _planes(q.scale_bits)),
                       mc=pack_np(mc, _planes(q.min_bits)), qtype=q.name, shape=(out, n), sub=q.sub)
    return QTensor(pack_np(codes, q.widths), d, sc=pack_np(sc + q.scale_offset, _planes(q.scale_bits)), qtype=q.name,
                   shape=(out, n), sub=q.sub)


def _k_rows(x: np.ndarray, q: QType, importance: np.ndarray | None = None):
    """:func:`_quantize_k` for rows ``x [rows, n_block, subs, sub]``: value codes, ``d``, ``dmin``, scale/min codes.
    ``importance`` (broadcast against ``x``) multiplies the per-value error weights below, as llama.cpp's imatrix
    quantization does."""
    levels = 1 << q.bits
    # Symmetric types (Q6K, Q3K) fit plain squared error: llama.cpp's x^2 weights (rmse_type 1) measured worse here
    # (Q6K on SmolLM2: mean abs logit error 0.30, rms + |x| weights 0.25, unweighted 0.22, like the old min/max).
    if not q.has_min:
        weights = np.ones_like(x)
    elif q.name == "Q2K":
        weights = np.abs(x)
    else:
        weights = np.sqrt((x * x).mean(-1, keepdims=True)) + np.abs(x)
    if importance is not None:
        weights = weights * importance
    if q.has_min:
        rmin, nstep = (-1.0, 20) if q.bits == 4 else (-0.5, 15)
        scale, mins = _search_affine(x, weights, levels - 1, rmin, 0.1, nstep)
        smax, mmax = (1 << q.scale_bits) - 1, (1 << q.min_bits) - 1
        d = (scale.max(-1) / smax).astype(np.float16)
        dmin = (mins.max(-1) / mmax).astype(np.float16)
        df, dminf = d.astype(np.float32)[..., None], dmin.astype(np.float32)[..., None]
        sc0 = np.clip(_round(scale / np.where(df == 0, 1, df)), 0, smax)
        mc0 = np.clip(_round(mins / np.where(dminf == 0, 1, dminf)), 0, mmax)
        pairs = [(np.clip(sc0 + i, 0, smax), np.clip(mc0 + j, 0, mmax)) for i in (0, -1, 1) for j in (0, -1, 1)]
        pick = _best_k_codes(x, weights, [df * s for s, _ in pairs], [-dminf * m for _, m in pairs], levels, 0)
        sc = np.choose(pick, [s for s, _ in pairs])
        mc = np.choose(pick, [m for _, m in pairs])
        a, bias = (df * sc)[..., None], (dminf * mc)[..., None]
        codes = np.clip(_round((x + bias) / np.where(a == 0, 1, a)), 0, levels - 1)
        return np.where(a == 0, 0, codes), d, dmin, sc, mc
    half = levels // 2
    scale = _search_symmetric(x, weights, half)
    sc_half = 1 << (q.scale_bits - 1)
    smax = sc_half - 1
    d = (np.abs(scale).max(-1) / smax).astype(np.float16)
    df = d.astype(np.float32)[..., None]
    sc0 = np.clip(_round(scale / np.where(df == 0, 1, df)), -sc_half, smax)
    cands = [np.clip(sc0 + i, -sc_half, smax) for i in (0, -1, 1)]
    pick = _best_k_codes(x, weights, [df * s for s in cands], [np.zeros_like(sc0)] * 3, levels, -half)
    sc = np.choose(pick, cands)
    a = (df * sc)[..., None]
    codes = np.clip(_round(x / np.where(a == 0, 1, a)), -half, half - 1) + half
    return np.where(a == 0, half, codes), d, d, sc, sc


# ---- GGUF blocks -> QTensor (integer repacking, no float detour) ----------------------------------------------------

def from_gguf(raw: np.ndarray, gguf_type: str, shape: Sequence[int]) -> QTensor:
    """GGUF quantized rows (``[out, bytes per row]`` uint8) of a ``[out, in]`` tensor -> the matching QTensor."""
    out, n = shape
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(out, -1)
    if gguf_type in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        name = gguf_type
        q = QTYPES[name]
        nb = n // 32
        head = 4 if q.has_min else 2
        extra = 4 if q.bits == 5 else 0
        body = 32 if q.bits == 8 else 16
        blocks = raw.reshape(out, nb, head + extra + body)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0] if q.has_min else None
        payload = blocks[..., head + extra:]
        if q.bits == 8:
            codes = (payload.view(np.int8).astype(np.int32) + 128)
        else:
            codes = np.concatenate([payload & 15, payload >> 4], axis=-1).astype(np.int32)
            if q.bits == 5:
                qh = blocks[..., head:head + 4].copy().view(np.uint32)[..., 0]
                high = (qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1
                codes = codes | (high.astype(np.int32) << 4)
        return QTensor(pack_np(codes.reshape(out, n), q.widths), d, m=m, qtype=name, shape=(out, n), sub=32)
    if gguf_type == "Q4_K":
        q = QTYPES["Q4K"]
        blocks = raw.reshape(out, n // 256, 144)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
        dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        s = blocks[..., 4:16].astype(np.int32)
        sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
        mc = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
        qs = blocks[..., 16:].reshape(out, n // 256, 4, 32)
        codes = np.stack([qs & 15, qs >> 4], axis=3).reshape(out, n // 32, 32)  # per 64: low nibbles, then high
        return QTensor(pack_np(codes.reshape(out, n), q.widths), d, dmin=dmin, sc=pack_np(sc.reshape(out, -1), (4, 2)),
                       mc=pack_np(mc.reshape(out, -1), (4, 2)),
                       qtype="Q4K", shape=(out, n), sub=32)
    if gguf_type == "Q6_K":
        q = QTYPES["Q6K"]
        blocks = raw.reshape(out, n // 256, 210)
        ql = blocks[..., 0:128].reshape(out, -1, 2, 64).astype(np.int32)
        qh = blocks[..., 128:192].reshape(out, -1, 2, 32).astype(np.int32)
        scales = blocks[..., 192:208].view(np.int8).astype(np.int32)
        d = blocks[..., 208:210].copy().view(np.float16)[..., 0]
        parts = [(ql[..., 0:32] & 15) | ((qh & 3) << 4), (ql[..., 32:64] & 15) | (((qh >> 2) & 3) << 4),
                 (ql[..., 0:32] >> 4) | (((qh >> 4) & 3) << 4), (ql[..., 32:64] >> 4) | (((qh >> 6) & 3) << 4)]
        codes = np.stack(parts, axis=3).reshape(out, n // 16, 16)  # element order within each 128: 4 runs of 32
        return QTensor(pack_np(codes.reshape(out, n), q.widths), d, sc=pack_np((scales + 128).reshape(out, -1), (8,)),
                       qtype="Q6K", shape=(out, n),
                       sub=16)
    raise UserError(f"GGUF type {gguf_type} cannot be loaded natively (supported: {', '.join(GGUF_NATIVE)})")


# ---- dequantization and matmul (jnp, inside jit) --------------------------------------------------------------------

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


def _block_scales(w: QTensor, dtype, ones: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """Per sub-block scale ``a`` and offset ``b`` (None: no offset), ``[out, n_sub]`` in row order, times ``ones``
    (:func:`_ones_after`) when given. A K type's come from its scale/min code planes, computed once (materialised)
    rather than for every weight element."""
    q = QTYPES[w.qtype]
    out = w.shape[0]

    def scaled(a):
        return a if ones is None else a * ones

    if q.kind != "k":  # Q8K on a short row stores one d per sub-block group: repeat it per sub-block
        a = _per_sub(w.d.astype(dtype), None, max(1, q.block // w.sub), w.shape[1] // w.sub) if w.sub else w.d
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
        v = (_class_codes(w.q, q.widths, classes, r) - q.offset).astype(dtype)
    return _apply_scales(v, _class_rows(a, classes, r), None if b is None else _class_rows(b, classes, r), w.sub)


def _weight(w: QTensor, dtype, a, b) -> jax.Array:
    q = QTYPES[w.qtype]
    v = w.q[0].astype(dtype) if q.kind == "fp8" else (_codes(w.q, q.widths) - q.offset).astype(dtype)
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
    rows, out = math.prod(lead), w.shape[0]
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
    return qdot(x, w) if isinstance(w, QTensor) else x @ w


def dense_rows(x: jax.Array, w) -> jax.Array:
    """``x @ w.T`` for a plain ``[out, in]`` weight (the tied LM head), or the quantized product."""
    return qdot(x, w) if isinstance(w, QTensor) else jnp.einsum("...d,vd->...v", x, w.astype(x.dtype))


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
        v = (codes(w.q, q.widths) - q.offset).astype(dtype)
    d = jnp.take(w.d, ids, axis=0).astype(dtype)
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


def split_of(spec, sharding) -> tuple[int, int, object, object, int, int]:
    """``(out, in, out_axis, in_axis, in_shards, out_shards)`` of a 2-D weight placed with ``sharding`` (the
    sharding of its float ``spec`` layout); a QTensor is ``[out, in]`` whatever the float layout."""
    out, n = spec.hf_shape if spec.transpose else spec.shape
    pspec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
    out_axis, in_axis = (pspec[1], pspec[0]) if spec.transpose else (pspec[0], pspec[1])
    mesh = sharding.mesh
    in_shards = mesh.shape[in_axis] if in_axis else 1
    out_shards = mesh.shape[out_axis] if out_axis else 1
    return out, n, out_axis, in_axis, in_shards, out_shards


def leaf_shardings(spec, sharding, qt):
    """The shardings of ``qt``'s leaves for a weight whose float layout is placed with ``sharding``."""
    _, _, out_axis, in_axis, _, _ = split_of(spec, sharding)
    return shardings_for(qt, out_axis, in_axis, sharding.mesh)
