"""MXFP4 (blocks of 32 FP4 E2M1 values with an E8M0 scale byte) as an ISQ type: the host quantizer's round trip,
the kernels against numpy, the bytes the planner counts, a Hugging Face checkpoint's blocks read as they are, and
the tiny gpt-oss under ``--isq MXFP4`` against the float model holding the same dequantized weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmap
from jaxmap.quant import QTYPES, dequantize, qdot, quantize, take_rows, tensor_nbytes
from jaxmap.quant.mxfp4 import FP4_VALUES, dequantize_np, from_blocks
from jaxmap.quant.qtensor import QTensor

HERE = Path(__file__).resolve().parent
FOLDER = HERE / "data" / "tiny-gpt-oss"
REF = HERE / "reference" / "data" / "tiny-gpt-oss.json"


def test_round_trip_error_and_exact_requantization():
    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    q = quantize(w, "MXFP4")
    assert q.qtype == "MXFP4" and q.d.dtype == np.uint8 and q.d.shape == (64, 8)
    deq = np.asarray(dequantize(q))
    np.testing.assert_array_equal(deq, dequantize_np(q))
    rel = np.sqrt(((deq - w) ** 2).mean() / (w**2).mean())
    assert rel < 0.12  # FP4 with power-of-two block scales on normal weights: 11.1%
    # every value is an FP4 value times its block's power of two, and the grid is a fixed point
    scale = np.ldexp(1.0, np.asarray(q.d).astype(np.int32) - 127)[..., None]
    assert np.isin(deq.reshape(64, 8, 32) / scale, FP4_VALUES).all()
    np.testing.assert_array_equal(np.asarray(dequantize(quantize(deq, "MXFP4"))), deq)
    # no block's largest value is clamped by more than a quarter of it
    top = np.abs(w.reshape(64, 8, 32)).max(-1)
    assert (np.abs(deq.reshape(64, 8, 32)).max(-1) >= 0.75 * top).all()


def test_products_and_lookups_match_the_dequantized_weight():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 128)).astype(np.float32)
    q = quantize(w, "MXFP4")
    deq = dequantize_np(q)
    for rows in (1, 5):
        x = rng.standard_normal((rows, 128)).astype(np.float32)
        np.testing.assert_allclose(np.asarray(qdot(jnp.asarray(x), q)), x @ deq.T, atol=1e-4)
    ids = jnp.asarray([3, 0, 31])
    np.testing.assert_array_equal(np.asarray(take_rows(q, ids, jnp.float32)), deq[[3, 0, 31]])
    np.testing.assert_array_equal(np.asarray(dequantize(q, jnp.bfloat16)).astype(np.float32),
                                  deq.astype(jnp.bfloat16).astype(np.float32))


def test_bytes_as_the_planner_counts_them():
    assert QTYPES["MXFP4"].bits_per_weight == 4.25
    q = quantize(np.ones((64, 2880), np.float32), "MXFP4")
    assert tensor_nbytes("MXFP4", (64, 2880)) == q.nbytes == 64 * 2880 // 2 + 64 * 90


def test_hugging_face_blocks_read_without_a_float_detour():
    """transformers' layout (integrations/mxfp4.py): ``*_blocks`` [out, in/32, 16] uint8, the even input in each
    byte's low nibble, ``*_scales`` [out, in/32] E8M0."""
    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, (8, 4, 16), dtype=np.uint8)
    scales = rng.integers(120, 130, (8, 4), dtype=np.uint8)
    q = from_blocks(blocks, scales)
    lo, hi = FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]
    want = np.stack([lo, hi], axis=-1).reshape(8, 4, 32) * np.ldexp(1.0, scales.astype(np.int32) - 127)[..., None]
    np.testing.assert_array_equal(np.asarray(dequantize(q)), want.reshape(8, 128))


def _dequantized_folder(model, dst: Path) -> Path:
    """A copy of the tiny gpt-oss whose quantized tensors hold what the quantized model computes with."""
    from safetensors.numpy import load_file, save_file

    from jaxmap.families import family_of, interleaved_parts

    shutil.copytree(FOLDER, dst)
    tensors = {k: np.array(v) for k, v in load_file(FOLDER / "model.safetensors").items()}
    config = model.config
    family, parts = family_of(config), interleaved_parts(config)
    for i, layer in enumerate(model.engine.stages[0].params["layers"]):
        specs = family.layer_params(config, i)
        for key, v in layer.items():
            if not isinstance(v, QTensor):
                continue
            spec = specs[key]
            if len(spec.shape) == 3:  # a stack of [out, in] experts -> jaxmap's (and gpt-oss's) [E, in, out]
                hf = np.swapaxes(np.asarray(jax.vmap(dequantize)(v)), 1, 2)
            else:
                deq = np.asarray(dequantize(v))
                hf = deq if spec.transpose else deq.T
            if spec.hf_name in parts:
                stored, first, step = parts[spec.hf_name]
                tensors[stored][..., first::step] = hf
            else:
                tensors[spec.hf_name] = np.ascontiguousarray(hf)  # safetensors writes a view's buffer as is
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_isq_mxfp4_gives_the_float_models_tokens_on_the_same_weights(tmp_path):
    ids = [p["input_ids"] for p in json.loads(REF.read_text(encoding="utf-8"))["prompts"]]
    quant = jaxmap.load(str(FOLDER), dtype="float32", max_seq_len=64, progress=False, isq="MXFP4", devices="0",
                        tp=1)
    layer = quant.engine.stages[0].params["layers"][0]
    assert layer["experts_gate"].qtype == layer["experts_down"].qtype == layer["wq"].qtype == "MXFP4"
    assert not isinstance(layer["router"], QTensor) and not isinstance(layer["experts_down_bias"], QTensor)
    floats = jaxmap.load(str(_dequantized_folder(quant, tmp_path / "deq")), dtype="float32", max_seq_len=64,
                         progress=False, devices="0", tp=1)
    for a, b in zip(quant.forward_logits(ids), floats.forward_logits(ids), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    got = [r.token_ids for r in quant.generate(ids, max_new_tokens=10, stop_at_eos=False)]
    assert got == [r.token_ids for r in floats.generate(ids, max_new_tokens=10, stop_at_eos=False)]


@pytest.mark.parametrize("isq", ["MXFP4", "mxfp4"])
def test_isq_name_is_known(isq):
    from jaxmap.quant import parse_isq

    assert parse_isq(isq) == "MXFP4"
