"""GGUF quantized blocks -> :class:`~jaxmap.quant.qtensor.QTensor`, by integer repacking (no float detour).

The types in :data:`~jaxmap.quant.types.GGUF_NATIVE` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K, MXFP4) keep GGUF's own
codes, scales and mins, re-laid into the bit planes of :mod:`~jaxmap.quant.qtensor`: dequantized, a weight is what
gguf's reference dequantizer gives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxmap.errors import UserError
from jaxmap.quant.qtensor import QTensor, pack_np
from jaxmap.quant.types import GGUF_NATIVE, QTYPES


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
        # codes stay uint8 (every code is below 256): int32 temporaries made repacking the default model's 210
        # Q4_1 tensors take 0.85 s of each start
        if q.bits == 8:
            codes = payload ^ np.uint8(0x80)  # int8 x + 128, as its unsigned byte
        else:
            codes = np.concatenate([payload & np.uint8(15), payload >> np.uint8(4)], axis=-1)
            if q.bits == 5:
                qh = blocks[..., head:head + 4].copy().view(np.uint32)[..., 0]
                high = (qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1
                codes = codes | (high.astype(np.uint8) << np.uint8(4))
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
    if gguf_type == "MXFP4":  # gpt-oss's experts (ggml type 39): E8M0 byte + 16 bytes of FP4 codes per 32
        from jaxmap.quant.mxfp4 import from_gguf_blocks

        return from_gguf_blocks(raw, (out, n))
    raise UserError(f"GGUF type {gguf_type} cannot be loaded natively (supported: {', '.join(GGUF_NATIVE)})")

