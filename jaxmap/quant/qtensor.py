"""The packed storage of a quantized weight: :class:`QTensor`, its bit planes, its shardings.

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
  input must give every shard the same layout (see :func:`~jaxmap.quant.types.fits`).
- INT8 / F8E4M3: one float32 scale per output channel (stored once per input shard); INT4: symmetric 4-bit with a
  float16 scale per group of 128 inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

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
    ``kernel``: what multiplies it at decode (see :mod:`jaxmap.quant.native`).
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
    # what runs its products at a few activation rows: "xla" (jnp, kernels.qdot) or "cpu" (jaxmap's native CPU
    # kernel, jaxmap.quant.native; set where the weight is placed on one CPU device)
    kernel: str = dataclasses.field(default="xla", metadata={"static": True})

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(self))

    @property
    def dtype(self):  # what a caller casting "the weight" sees; compute happens in the activation dtype
        return jnp.float32


def is_quantized(x) -> bool:
    return isinstance(x, QTensor)


def shardings_for(qt: QTensor, out_axis, in_axis, mesh, lead: tuple = ()) -> QTensor:
    """A QTensor of NamedShardings: every array follows its weight's split (rows on ``out_axis``, groups on
    ``in_axis``), so scales sit with the blocks they scale. ``lead``: the mesh axes of a stack's leading dimensions
    (stacked experts: the experts axis, None while every device holds every expert)."""
    from jax.sharding import NamedSharding, PartitionSpec

    def spec(a):
        return NamedSharding(mesh, PartitionSpec(*lead, out_axis, in_axis, *([None] * (a.ndim - 2 - len(lead)))))

    return jax.tree_util.tree_map(spec, qt)


def is_stack(spec) -> bool:
    """A stack of 2-D weights quantized one by one (MoE experts, jaxmap's ``[E, in, out]``): each expert a QTensor
    ``[out, in]``, stacked along a leading axis of every leaf (:func:`stack`)."""
    return len(spec.shape) == 3 and getattr(spec, "role", None) == "expert"


def split_of(spec, sharding) -> tuple[int, int, object, object, int, int]:
    """``(out, in, out_axis, in_axis, in_shards, out_shards)`` of a 2-D weight (or of each weight of a stack,
    :func:`is_stack`) placed with ``sharding`` (the sharding of its float ``spec`` layout); a QTensor is
    ``[out, in]`` whatever the float layout."""
    lead = len(spec.shape) - 2
    shape = spec.shape[lead:]
    out, n = tuple(reversed(shape)) if spec.transpose or lead else shape
    pspec = (tuple(sharding.spec) + (None,) * (len(spec.shape) - len(sharding.spec)))[lead:]
    out_axis, in_axis = (pspec[1], pspec[0]) if spec.transpose or lead else (pspec[0], pspec[1])
    mesh = sharding.mesh
    in_shards = mesh.shape[in_axis] if in_axis else 1
    out_shards = mesh.shape[out_axis] if out_axis else 1
    return out, n, out_axis, in_axis, in_shards, out_shards


def leaf_shardings(spec, sharding, qt):
    """The shardings of ``qt``'s leaves for a weight whose float layout is placed with ``sharding``."""
    _, _, out_axis, in_axis, _, _ = split_of(spec, sharding)
    lead = len(spec.shape) - 2
    axes = (tuple(sharding.spec) + (None,) * lead)[:lead]
    return shardings_for(qt, out_axis, in_axis, sharding.mesh, axes)


def stack(parts: Sequence[QTensor]) -> QTensor:
    """QTensors of one type and shape (a layer's experts) as one, each leaf stacked along a new leading axis."""
    first = parts[0]
    if any(p.qtype != first.qtype or p.shape != first.shape or p.sub != first.sub for p in parts):
        raise ValueError("stacked QTensors must share type, shape and sub-block")
    return jax.tree_util.tree_map(lambda *a: np.stack(a), *parts)


# ---- bit planes -----------------------------------------------------------------------------------------------------

def pack_np(codes: np.ndarray, widths: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Unsigned codes ``[rows, n]`` -> bit planes ``[rows * w / 8, n]`` (uint8), low bits in the first plane.

    A ``w``-bit plane packs ``8 / w`` consecutive rows per byte row: byte ``[j, i]`` holds rows ``8/w * j + k`` at
    shift ``k * w``. Packing across rows (not along the contraction) keeps each row's inner loop contiguous, which
    XLA:CPU fuses into the matrix-vector product (measured: 1.8 ms for a 49152x576 4-bit LM head against 10-20 ms
    for nibbles packed along the row, and 3.3 ms in float32).
    """
    codes = codes.astype(np.uint8, copy=False)
    planes, shift = [], 0
    rows, n = codes.shape
    for w in widths:
        per = 8 // w
        part = ((codes >> np.uint8(shift)) & np.uint8((1 << w) - 1)).reshape(rows // per, per, n)
        if per == 1:
            planes.append(np.ascontiguousarray(part[:, 0]))
        else:
            byte = part[:, 0].copy()
            for k in range(1, per):
                byte |= part[:, k] << np.uint8(k * w)
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

