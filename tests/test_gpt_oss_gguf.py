"""gpt-oss from GGUF, first part: ggml type 39 (MXFP4) read as jaxmap's MXFP4 by moving nibbles only, bit-exact
against the gguf package's own dequantizer. (The ``gpt-oss`` architecture itself is not mapped yet.)"""

from __future__ import annotations

import gguf
import numpy as np
from gguf.quants import dequantize, quantize

from jaxmap.quant import mxfp4
from jaxmap.quant.gguf import from_gguf

MXFP4 = gguf.GGMLQuantizationType.MXFP4


def test_gguf_mxfp4_blocks_become_mxfp4_bit_exactly():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 96)) * np.exp(rng.standard_normal((8, 1)) * 3)).astype(np.float32)
    raw = quantize(w, MXFP4)
    assert raw.shape == (8, 96 // 32 * 17)
    qt = from_gguf(raw, "MXFP4", (8, 96))
    assert qt.qtype == "MXFP4"
    want = dequantize(raw, MXFP4)
    np.testing.assert_array_equal(mxfp4.dequantize_np(qt), want)
    np.testing.assert_array_equal(mxfp4.to_gguf_blocks(qt), raw)


def test_every_code_and_exponent():
    """All 16 codes in both nibbles and every E8M0 byte but 255 (NaN in OCP; ggml's 2^127 overflows here)."""
    raw = np.zeros((2, 255, 17), np.uint8)
    raw[..., 0] = np.arange(255)
    raw[0, :, 1:] = (np.arange(16) * 17 % 256).astype(np.uint8)  # code k in both nibbles
    raw[1, :, 1:] = (np.arange(16)[::-1] | (np.arange(16) << 4)).astype(np.uint8)
    raw = raw.reshape(2, -1)
    n = 255 * 32
    np.testing.assert_array_equal(mxfp4.dequantize_np(from_gguf(raw, "MXFP4", (2, n))), dequantize(raw, MXFP4))
