"""The quantization types and what they cost: names, block layouts, bits per weight, fallbacks.

Pure data (numpy-free, jax-free): the planner counts bytes with it for hardware it does not have; the packed
storage and kernels (:mod:`~jaxmap.quant.qtensor`, :mod:`~jaxmap.quant.kernels`) build on it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from jaxmap.errors import UserError

# A quantized checkpoint (GGUF, or a quantized orbax one) kept in its own stored types.
NATIVE = "native"


@dataclasses.dataclass(frozen=True)
class QType:
    """One quantization type. ``widths``: the bit planes of a value code; ``kind``: how scales are stored."""

    name: str
    bits: int
    sub: int  # elements sharing one (a, b) pair
    block: int  # elements sharing one stored float scale (the GGUF block / super-block)
    # "simple" (float16 scale[/min] per block), "k" (d per block + codes per sub), "channel", "fp8", "mxfp4" (FP4
    # E2M1 codes, an E8M0 scale byte per block)
    kind: str
    offset: int = 0  # subtracted from the value code (symmetric types)
    has_min: bool = False
    scale_bits: int = 0  # K types: bits of a scale code
    scale_offset: int = 0  # K types: subtracted from a scale code (signed scales)
    min_bits: int = 0  # K types: bits of a min code
    gguf: str | None = None  # the GGUF type this matches (loaded natively from GGUF)
    short_unit: int = 0  # K types: a row length this divides may end in a short super-block (0: never)

    @property
    def widths(self) -> tuple[int, ...]:
        return _planes(self.bits)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight (values, scales, mins), for a row long enough to hold whole blocks."""
        bits = float(self.bits)
        if self.kind == "simple":
            bits += (16 + (16 if self.has_min else 0)) / self.block
        elif self.kind == "k":
            bits += (self.scale_bits + self.min_bits) / self.sub + (16 + (16 if self.has_min else 0)) / self.block
        elif self.kind == "int4":
            bits += 16 / self.block
        elif self.kind == "mxfp4":
            bits += 8 / self.block
        elif self.block:  # Q8K: float32 d per 256
            bits += 32 / self.block
        return bits


def _planes(bits: int) -> tuple[int, ...]:
    return {8: (8,), 6: (4, 2), 5: (4, 1), 4: (4,), 3: (2, 1), 2: (2,), 1: (1,)}[bits]


QTYPES: dict[str, QType] = {q.name: q for q in (
    QType("Q4_0", 4, 32, 32, "simple", offset=8, gguf="Q4_0"),
    QType("Q4_1", 4, 32, 32, "simple", has_min=True, gguf="Q4_1"),
    QType("Q5_0", 5, 32, 32, "simple", offset=16, gguf="Q5_0"),
    QType("Q5_1", 5, 32, 32, "simple", has_min=True, gguf="Q5_1"),
    QType("Q8_0", 8, 32, 32, "simple", offset=128, gguf="Q8_0"),
    QType("Q2K", 2, 16, 256, "k", has_min=True, scale_bits=4, min_bits=4, gguf="Q2_K", short_unit=16),
    QType("Q3K", 3, 16, 256, "k", offset=4, scale_bits=6, scale_offset=32, gguf="Q3_K", short_unit=16),
    QType("Q4K", 4, 32, 256, "k", has_min=True, scale_bits=6, min_bits=6, gguf="Q4_K", short_unit=32),
    QType("Q5K", 5, 32, 256, "k", has_min=True, scale_bits=6, min_bits=6, gguf="Q5_K", short_unit=32),
    QType("Q6K", 6, 16, 256, "k", offset=32, scale_bits=8, scale_offset=128, gguf="Q6_K", short_unit=16),
    # float32 d per 256; a short last block is stored in groups of gcd(in, 256) (GGUF's bsums are per 16)
    QType("Q8K", 8, 256, 256, "channel", offset=128, gguf="Q8_K", short_unit=16),
    QType("INT8", 8, 0, 0, "channel", offset=128),
    QType("INT4", 4, 128, 128, "int4", offset=8),
    QType("F8E4M3", 8, 0, 0, "fp8"),
    QType("MXFP4", 4, 32, 32, "mxfp4", gguf="MXFP4"),
)}
# Where a type does not fit a tensor's (per-shard) input dimension (see fits): llama.cpp's fallbacks for K types (Q2K
# and Q3K go to Q4_0 as jaxmap has no IQ4_NL), then Q8_0, then per-channel INT8 (fits any shape).
FALLBACK = {"Q2K": "Q4_0", "Q3K": "Q4_0", "Q4K": "Q5_0", "Q5K": "Q5_1", "Q6K": "Q8_0", "Q8K": "Q8_0",
            "Q4_0": "INT8", "Q4_1": "INT8", "Q5_0": "INT8", "Q5_1": "INT8", "Q8_0": "INT8", "INT4": "INT8",
            "MXFP4": "INT8"}
_ALIASES = {"Q2_K": "Q2K", "Q3_K": "Q3K", "Q4_K": "Q4K", "Q5_K": "Q5K", "Q6_K": "Q6K", "Q8_K": "Q8K",
            "FP8": "F8E4M3", "F8": "F8E4M3", "F8E4M3FN": "F8E4M3"}


def parse_isq(name: str | None) -> str | None:
    """The canonical type name (``q4k`` -> ``Q4K``); None/``none`` -> None (keep float); UserError when unknown."""
    if name is None:
        return None
    key = str(name).strip().upper()
    if key in ("NONE", "OFF", "FLOAT", ""):
        return None
    key = _ALIASES.get(key, key)
    if key not in QTYPES:
        raise UserError(f"unknown --isq type {name!r}; known types: {', '.join(QTYPES)} (or none)")
    return key


def fits(qtype: str, n: int, in_shards: int = 1) -> bool:
    """Whether ``qtype`` can store a row of ``n`` inputs split ``in_shards`` ways (row-parallel): its block divides
    each shard's part, or (K types) the input is not split and the row is a whole number of sub-blocks
    (``short_unit``): whole 256-element super-blocks then a short last one. A split input needs whole super-blocks,
    so that every shard holds the same layout and the shard boundaries fall between super-blocks."""
    q = QTYPES[qtype]
    if q.block == 0:
        return True
    if n % in_shards:
        return False
    if (n // in_shards) % q.block == 0:
        return True
    return in_shards == 1 and q.short_unit > 0 and n % q.short_unit == 0


def misfit_reason(qtype: str, n: int, in_shards: int = 1) -> str:
    """Why :func:`fits` refuses (for the fallback warning)."""
    q = QTYPES[qtype]
    per = n // in_shards
    if q.short_unit and n % q.short_unit == 0 and in_shards > 1:
        return (f"its {q.block}-element super-blocks do not divide the {per} inputs each of {in_shards} devices "
                f"holds, and a short last super-block is kept only on an unsplit input")
    unit = f"{q.short_unit}-element sub-blocks" if q.short_unit else f"{q.block}-element blocks"
    where = f"{per} inputs per device" if in_shards > 1 else f"{n} inputs"
    return f"its {unit} do not divide the tensor's {where}"


def choose_type(qtype: str, n: int, in_shards: int = 1) -> str:
    """``qtype``, or the first of its fallbacks that :func:`fits` ``n`` inputs split ``in_shards`` ways."""
    while not fits(qtype, n, in_shards):
        qtype = FALLBACK[qtype]
    return qtype


def row_bits(qtype: str, n: int) -> int:
    """Stored bits of one row of ``n`` inputs in a block type (values, per-sub-block codes, per-block floats),
    counting a short last super-block's own ``d`` (and ``dmin``)."""
    q = QTYPES[qtype]
    blocks = -(-n // q.block)
    floats = 32 if q.kind == "channel" else 8 if q.kind == "mxfp4" else 16 + (16 if q.has_min else 0)
    codes = (n // q.sub) * (q.scale_bits + q.min_bits) if q.kind == "k" else 0
    return n * q.bits + codes + blocks * floats


def tensor_nbytes(qtype: str | None, shape: Sequence[int], itemsize: int = 4, in_shards: int = 1) -> int:
    """Bytes a 2-D weight ``[out, in]`` takes as ``qtype`` (after fallback), or as float of ``itemsize`` bytes when
    ``qtype`` is None. For the planner: the per-device share is this divided by the shard count."""
    n = math.prod(shape)
    if qtype is None:
        return n * itemsize
    out, inp = shape
    q = QTYPES[choose_type(qtype, inp, in_shards)]
    if q.kind in ("channel", "fp8") and q.block == 0:
        return n + out * in_shards * 4
    return out * row_bits(q.name, inp) // 8


def row_classes(qtype: str) -> int:
    """How many row classes a matmul splits into (rows sharing a byte): the most rows any plane packs."""
    q = QTYPES[qtype]
    widths = list(q.widths) if q.kind != "fp8" else [8]
    if q.kind == "k":
        widths += list(_planes(q.scale_bits)) + (list(_planes(q.min_bits)) if q.min_bits else [])
    return max(8 // w for w in widths)


# Types whose fit an importance vector weights (``quantize(..., importance=)``); the per-channel and per-256 types
# (INT8, Q8K, F8E4M3) take their row's or block's largest value as the scale whatever the importance.
IMPORTANCE_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2K", "Q3K", "Q4K", "Q5K", "Q6K", "INT4")

GGUF_NATIVE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K", "MXFP4")


def gguf_to_jaxmap_type(gguf_type: str) -> str | None:
    return {"Q4_K": "Q4K", "Q6_K": "Q6K"}.get(gguf_type, gguf_type if gguf_type in GGUF_NATIVE else None)


def fitted_type(qtype: str, out: int, n: int, in_shards: int = 1, out_shards: int = 1) -> str:
    """The type a ``[out, in]`` weight split ``in_shards`` x ``out_shards`` ways really gets (after fallback)."""
    while not (fits(qtype, n, in_shards) and out % (row_classes(qtype) * out_shards) == 0):
        qtype = FALLBACK.get(qtype, "INT8")
        if qtype == "INT8":
            break
    return qtype
