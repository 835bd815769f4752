"""MXFP4 (the OCP microscaling format gpt-oss ships its experts in): blocks of 32 FP4 E2M1 values sharing one E8M0
scale byte, 4.25 bits per weight.

An E2M1 code is a sign bit over 3 magnitude bits, the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 (:data:`FP4_VALUES`, in
code order: the order of the Hugging Face checkpoints' nibbles and of ggml's ``kvalues_mxfp4`` halved); an E8M0 byte
``e`` scales its block by 2^(e - 127). In a :class:`~jaxmap.quant.qtensor.QTensor` the codes sit in one 4-bit plane
packed across output rows, like every 4-bit type here, and ``d`` holds the scale bytes (uint8 ``[out, in / 32]``).

:func:`quantize` fits a block's exponent: the two candidates that bring its largest magnitude to [2, 4) or [4, 8)
(the latter clamps values past 6) are both tried and the one with the lower squared error kept.

GGUF (ggml type 39, llama.cpp's ``block_mxfp4``) stores the same codes and scales in 17-byte blocks: the E8M0 byte,
then 16 bytes whose low nibbles are the block's first 16 values and whose high nibbles are its last 16 (the Hugging
Face checkpoints instead pair neighbours: even value low, odd value high). ggml's table ``kvalues_mxfp4`` is
:data:`FP4_VALUES` doubled and its scale ``2^(e - 128)`` half of ours, so the products are the same numbers:
:func:`from_gguf_blocks` only moves nibbles.
"""

from __future__ import annotations

import numpy as np

from jaxmap.quant.qtensor import QTensor, pack_np

BLOCK = 32
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)
_MIDPOINTS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)  # between consecutive magnitudes


def _codes_for(x: np.ndarray, exponent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, squared error per block) of blocks ``x [..., 32]`` scaled by 2^exponent ``[...]``."""
    scale = np.ldexp(np.float32(1), exponent.astype(np.int32))[..., None].astype(np.float32)
    scaled = x / scale
    mag = np.searchsorted(_MIDPOINTS, np.abs(scaled)).astype(np.uint8)  # nearest magnitude (ties down); 7 = 6.0
    codes = np.where(scaled < 0, mag | 8, mag).astype(np.uint8)
    err = np.sum((FP4_VALUES[codes] * scale - x) ** 2, axis=-1)
    return codes, err


def quantize(w: np.ndarray) -> QTensor:
    """A float ``[out, in]`` matrix (``in`` a multiple of 32) as MXFP4."""
    w = np.asarray(w, np.float32)
    out, n = w.shape
    x = w.reshape(out, n // BLOCK, BLOCK)
    amax = np.abs(x).max(-1)
    top = np.floor(np.log2(np.where(amax > 0, amax, 1.0))).astype(np.int32) - 2  # amax / 2^top in [4, 8)
    best_codes, best_err = _codes_for(x, np.clip(top, -127, 127))
    best_e = np.clip(top, -127, 127)
    e = np.clip(top + 1, -127, 127)
    codes, err = _codes_for(x, e)
    better = err < best_err
    best_codes = np.where(better[..., None], codes, best_codes)
    best_e = np.where(better, e, best_e)
    d = (best_e + 127).astype(np.uint8)
    return QTensor(pack_np(best_codes.reshape(out, n), (4,)), d, qtype="MXFP4", shape=(out, n), sub=BLOCK)


def from_blocks(blocks: np.ndarray, scales: np.ndarray) -> QTensor:
    """One weight from a Hugging Face MXFP4 checkpoint: ``blocks`` ``[out, in / 32, 16]`` uint8 (two codes a byte,
    the even input in the low nibble) and ``scales`` ``[out, in / 32]`` uint8 (E8M0) -> a QTensor ``[out, in]``, the
    codes repacked across rows, no float detour."""
    blocks = np.asarray(blocks, np.uint8)
    out, n_blocks, half = blocks.shape
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(out, n_blocks * half * 2)
    return QTensor(pack_np(codes, (4,)), np.ascontiguousarray(scales, np.uint8), qtype="MXFP4",
                   shape=(out, n_blocks * half * 2), sub=BLOCK)


GGUF_BLOCK_BYTES = 17


def from_gguf_blocks(raw: np.ndarray, shape: tuple[int, int]) -> QTensor:
    """GGUF MXFP4 rows (``[out, in / 32 * 17]`` uint8) of a ``[out, in]`` weight -> a QTensor, no float detour."""
    out, n = shape
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(out, n // BLOCK, GGUF_BLOCK_BYTES)
    qs = blocks[..., 1:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(out, n)  # per block: low nibbles, then high
    return QTensor(pack_np(codes, (4,)), np.ascontiguousarray(blocks[..., 0]), qtype="MXFP4", shape=(out, n),
                   sub=BLOCK)


def to_gguf_blocks(w: QTensor) -> np.ndarray:
    """An MXFP4 QTensor ``[out, in]`` as GGUF rows ``[out, in / 32 * 17]`` (for writing test files)."""
    from jaxmap.quant.qtensor import unpack_np

    out, n = w.shape
    codes = unpack_np(tuple(np.asarray(p) for p in w.q), (4,)).reshape(out, n // BLOCK, BLOCK).astype(np.uint8)
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    return np.concatenate([np.asarray(w.d, np.uint8)[..., None], qs], axis=-1).reshape(out, -1)


def dequantize_blocks(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Hugging Face MXFP4 ``blocks [..., out, in / 32, 16]`` and ``scales [..., out, in / 32]`` as float32 ``[...,
    out, in]``."""
    blocks = np.asarray(blocks, np.uint8)
    values = np.stack([FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]], axis=-1).reshape(*blocks.shape[:-1], -1)
    values *= np.ldexp(np.float32(1), np.asarray(scales).astype(np.int32) - 127)[..., None].astype(np.float32)
    return values.reshape(*blocks.shape[:-2], -1)


def dequantize_np(w: QTensor) -> np.ndarray:
    """The float32 ``[out, in]`` weight of an MXFP4 QTensor, in numpy (tests, reference comparisons)."""
    from jaxmap.quant.qtensor import unpack_np

    codes = unpack_np(tuple(np.asarray(p) for p in w.q), (4,))
    scale = np.ldexp(np.float32(1), np.asarray(w.d).astype(np.int32) - 127).astype(np.float32)
    return (FP4_VALUES[codes].reshape(w.shape[0], -1, BLOCK) * scale[..., None]).reshape(w.shape)
