"""In-situ quantization: formats, GGUF repacking, precedence, fallback, tensor parallel, the native GGUF path."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmap
from jaxmap import quant
from jaxmap.errors import UserError
from jaxmap.families import preset_config

ROOT = Path(__file__).resolve().parent.parent

# Mean absolute error relative to the mean |w| of a standard normal 64x512 matrix (measured, with headroom).
ROUND_TRIP = {"Q4_0": 0.095, "Q4_1": 0.08, "Q5_0": 0.047, "Q5_1": 0.04, "Q8_0": 0.007, "Q2K": 0.32, "Q3K": 0.165,
              "Q4K": 0.082, "Q5K": 0.041, "Q6K": 0.02, "Q8K": 0.009, "INT8": 0.009, "INT4": 0.14, "F8E4M3": 0.025,
              "MXFP4": 0.12}


def _dev(qt):
    return jax.tree_util.tree_map(jnp.asarray, qt)


K_TYPES = [name for name, q in quant.QTYPES.items() if q.short_unit]


# 576 inputs (SmolLM2's hidden size): K types end each row in a short super-block of 64 (two 256s, then 64)
@pytest.mark.parametrize("name,n", [(name, 512) for name in quant.QTYPES] + [(name, 576) for name in K_TYPES])
def test_round_trip_and_matmul(name, n):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, n)).astype(np.float32)
    qt = quant.quantize(w, name)
    assert qt.nbytes == quant.tensor_nbytes(name, w.shape)
    assert qt.nbytes * 8 / w.size == pytest.approx(quant.QTYPES[name].bits_per_weight, abs=0.07)
    back = np.asarray(quant.dequantize(_dev(qt)))
    assert np.abs(back - w).mean() / np.abs(w).mean() < ROUND_TRIP[name]
    for rows in (1, 9):  # decode and prefill forms
        x = rng.standard_normal((1, rows, n)).astype(np.float32)
        y = np.asarray(jax.jit(quant.dense)(jnp.asarray(x), _dev(qt)))
        np.testing.assert_allclose(y, x @ back.T, rtol=1e-4, atol=2e-4)
    ids = np.array([[0, 5, 63, 17]])
    np.testing.assert_array_equal(np.asarray(quant.take_rows(_dev(qt), jnp.asarray(ids), jnp.float32)), back[ids])


@pytest.mark.parametrize("name", K_TYPES)
def test_short_super_block_is_its_own_block(name):
    """A row of 576 = 256 + 256 + 64: the last 64 inputs are a super-block of their own (own d/dmin, fewer scale
    codes, nothing padded in storage): the tensor equals its first 512 and last 64 columns quantized apart."""
    w = np.random.default_rng(4).standard_normal((32, 576)).astype(np.float32)
    qt = quant.quantize(w, name)
    assert qt.d.shape == (32, 3) and all(p.shape[1] == 576 // qt.sub for p in qt.sc)
    parts = [np.asarray(quant.dequantize(_dev(quant.quantize(w[:, cols], name))))
             for cols in (slice(0, 512), slice(512, 576))]
    np.testing.assert_array_equal(np.asarray(quant.dequantize(_dev(qt))), np.concatenate(parts, axis=1))


def test_fits_short_super_blocks_only_on_an_unsplit_input():
    assert quant.fits("Q4K", 576) and quant.fits("Q6K", 80) and quant.fits("Q4K", 1536, in_shards=2)
    assert not quant.fits("Q4K", 80)  # not a whole number of 32-element sub-blocks
    assert not quant.fits("Q4K", 576, in_shards=2)  # 288 per shard: a split input needs whole super-blocks
    assert quant.choose_type("Q4K", 576, 2) == "Q5_0" and quant.choose_type("Q4K", 80) == "INT8"
    assert "only on an unsplit input" in quant.misfit_reason("Q4K", 576, 2)


@pytest.mark.parametrize("gguf_type", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_gguf_simple_blocks_repack_exactly(gguf_type):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    w = np.random.default_rng(1).standard_normal((32, 256)).astype(np.float32)
    raw = quantize(w, GGMLQuantizationType[gguf_type])
    qt = quant.from_gguf(raw, gguf_type, w.shape)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(_dev(qt))),
                                  dequantize(raw, GGMLQuantizationType[gguf_type]))


@pytest.mark.parametrize("gguf_type,block_bytes,halves", [("Q4_K", 144, (0, 2)), ("Q6_K", 210, (208,))])
def test_gguf_k_blocks_repack_exactly(gguf_type, block_bytes, halves):
    """Random K blocks (sane float16 scales) decode exactly as gguf's reference dequantizer does."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(2)
    rows, n = 16, 512
    raw = rng.integers(0, 256, (rows, n // 256, block_bytes), dtype=np.uint8)
    for offset in halves:  # d (and dmin) as small positive float16 values
        raw[..., offset:offset + 2] = rng.uniform(1e-3, 2e-2, (rows, n // 256)).astype(np.float16)[..., None].view(
            np.uint8)
    raw = raw.reshape(rows, -1)
    qt = quant.from_gguf(raw, gguf_type, (rows, n))
    expected = dequantize(raw, GGMLQuantizationType[gguf_type])
    np.testing.assert_allclose(np.asarray(quant.dequantize(_dev(qt))), expected, rtol=1e-6, atol=1e-7)


def test_unknown_type_lists_known():
    with pytest.raises(UserError, match="Q4K") as info:
        quant.parse_isq("Q9")
    assert "\n" not in str(info.value)
    assert quant.parse_isq("q4_k") == "Q4K" and quant.parse_isq("none") is None


def test_cli_bad_isq_exit_2(capsys):
    from jaxmap.cli.generate import main

    assert main(["-m", "preset:tiny", "--isq", "Q9", "-p", "hi", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown --isq type 'Q9'" in err[0] and "Q8_0" in err[0]


def test_fallback_when_block_does_not_fit(caplog, tmp_path):
    """hidden 80 is a whole number of 16-element sub-blocks but not of 32: Q6K keeps its type there (a short
    super-block), Q4K falls back to Q5_0, which does not fit either, so INT8; the 160 down inputs keep Q4K."""
    odd = tmp_path / "odd.yaml"
    odd.write_text((ROOT / "models" / "tiny.yaml").read_text().replace("hidden_size: 128", "hidden_size: 80")
                   .replace("intermediate_size: 256", "intermediate_size: 160")
                   .replace("num_attention_heads: 8", "num_attention_heads: 5")
                   .replace("num_key_value_heads: 4", "num_key_value_heads: 1"))
    with caplog.at_level("WARNING", logger="jaxmap.materialize.isq"):
        model = jaxmap.load(f"preset:{odd}", max_seq_len=32, devices="0", progress=False, isq="Q4K")
    layer = model.engine.stages[0].params["layers"][0]
    assert layer["wq"].qtype == "INT8" and layer["w_down"].qtype == "Q4K"
    assert any("Q4K does not fit" in r.message and "INT8" in r.message and "sub-blocks" in r.message
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="jaxmap.materialize.isq"):
        model = jaxmap.load(f"preset:{odd}", max_seq_len=32, devices="0", progress=False, isq="Q6K")
    assert {w.qtype for w in model.engine.stages[0].params["layers"][0].values() if quant.is_quantized(w)} == {"Q6K"}
    assert not [r for r in caplog.records if "does not fit" in r.message]


def test_topology_isq_overrides_global():
    topo = {"0-2": {"isq": "Q4_0"}, "3-4": {"isq": "none"}}
    model = jaxmap.load("preset:tiny", max_seq_len=32, devices="0", progress=False, isq="Q8_0", topology=topo)
    layers = model.engine.stages[0].params["layers"]
    assert [getattr(p["wq"], "qtype", None) for p in layers] == ["Q4_0", "Q4_0", "Q8_0", None]
    assert model.device_map.stages[0].isq == ["Q4_0", "Q4_0", "Q8_0", "none"]
    assert "Q4_0" in model.device_map.render_table()
    assert not hasattr(model.engine.stages[0].params["lm_head"], "qtype")  # --isq covers the layers only
    topo["/lm_head/"] = {"isq": "Q8_0"}
    model = jaxmap.load("preset:tiny", max_seq_len=32, devices="0", progress=False, isq="Q8_0", topology=topo)
    assert model.engine.stages[0].params["lm_head"].qtype == "Q8_0"  # a regex entry quantizes the head


@pytest.mark.parametrize("name", ["Q4_1", "Q5_0", "Q4K", "Q6K", "INT8", "F8E4M3"])
def test_products_in_row_class_chunks(name, monkeypatch):
    """A weight over CHUNK_BYTES as float is dequantized and multiplied one row class at a time (both orientations)."""
    monkeypatch.setattr(quant, "CHUNK_BYTES", 64 * 512)
    rng = np.random.default_rng(1)
    qt = _dev(quant.quantize(rng.standard_normal((64, 512)).astype(np.float32), name))
    assert quant._chunk_classes(qt, 4) >= 4
    back = np.asarray(quant.dequantize(qt))
    for rows in (3, quant.SMALL_ROWS + 1):
        x = rng.standard_normal((1, rows, 512)).astype(np.float32)
        y = np.asarray(jax.jit(quant.dense)(jnp.asarray(x), qt))
        np.testing.assert_allclose(y, x @ back.T, rtol=1e-4, atol=2e-4)


def _fusion_operands(hlo: str, contains: str) -> list[int]:
    """Operand counts of the top-level fusions whose computation contains ``contains``."""
    import re

    bodies = dict(re.findall(r"\n(%[\w.-]+) .*?\{\n(.*?)\n\}", hlo, re.S))
    counts = []
    for line in hlo.split("ENTRY", 1)[1].splitlines():
        called = re.search(r" fusion\((.*?)\), kind=.*calls=(%[\w.-]+)", line)
        if called and contains in bodies.get(called.group(2), ""):
            counts.append(len(re.findall(r"%[\w.-]+", called.group(1))))
    return counts


def test_decode_product_reads_a_materialised_activation():
    """At one row the dequantization is fused into the matrix-vector product, and the activation's producers (here
    a norm-like multiply and the previous product's row interleave) are not: each product fusion reads only the
    weight's arrays and one activation."""
    rng = np.random.default_rng(2)
    w1, w2 = (_dev(quant.quantize(rng.standard_normal((256, 256)).astype(np.float32), "Q4_1")) for _ in range(2))
    g = jnp.asarray(rng.standard_normal(256).astype(np.float32))

    def f(x, g, w1, w2):
        return quant.dense(quant.dense(x * g, w1) * g, w2)

    hlo = jax.jit(f).lower(jnp.ones((1, 1, 256)), g, w1, w2).compile().as_text()
    counts = _fusion_operands(hlo, " dot(")
    assert counts and max(counts) <= len(jax.tree_util.tree_leaves(w1)) + 1, counts


def test_batched_dequantization_waits_for_its_activation():
    """With several rows the float weights are temporaries; each is made after its activation exists, so they are
    not all alive at once (XLA would otherwise hoist every dequantization to the start of the program)."""
    rng = np.random.default_rng(3)
    ws = [_dev(quant.quantize(rng.standard_normal((256, 256)).astype(np.float32), "Q4_1")) for _ in range(6)]

    def f(x, ws):
        for w in ws:
            x = jnp.tanh(quant.dense(x, w))
        return x

    compiled = jax.jit(f).lower(jnp.ones((8, 256)), ws).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 3 * 256 * 256 * 4


@pytest.mark.parametrize("isq,tp,chunk", [("Q4_0", 4, None), ("Q4K", 2, None), ("Q4_0", 4, 16384)])
def test_tensor_parallel_isq_matches_one_device(isq, tp, chunk, monkeypatch, caplog):
    if chunk:  # row-class chunks (a loop) over column- and row-parallel weights
        monkeypatch.setattr(quant, "CHUNK_BYTES", chunk)
    prompt = [[3, 17, 29, 101, 7]]
    one = jaxmap.load("preset:tiny", max_seq_len=64, devices="0", progress=False, isq=isq)
    with caplog.at_level("WARNING", logger="jaxmap.materialize.isq"):
        many = jaxmap.load("preset:tiny", max_seq_len=64, tp=tp, progress=False, isq=isq)
    wq = many.engine.stages[0].params["layers"][0]["wq"]
    assert len(wq.q[0].sharding.device_set) == tp and wq.d.sharding.spec == wq.q[0].sharding.spec
    a = one.generate(prompt, max_new_tokens=12, stop_at_eos=False)[0].token_ids
    b = many.generate(prompt, max_new_tokens=12, stop_at_eos=False)[0].token_ids
    assert a == b
    types = [[getattr(w, "qtype", None) for w in layer.values()]
             for m in (one, many) for layer in m.engine.stages[0].params["layers"]]
    if types[:len(types) // 2] == types[len(types) // 2:]:  # same types (no shard-dependent fallback): same logits
        np.testing.assert_allclose(one.forward_logits(prompt)[0], many.forward_logits(prompt)[0], atol=2e-4, rtol=0)
    if isq == "Q4K":  # hidden 128: one short super-block per row, kept on the column-parallel (unsplit input) wq
        assert wq.qtype == "Q4K" and wq.d.shape == (128, 1)
        np.testing.assert_array_equal(np.asarray(quant.dequantize(wq)),
                                      np.asarray(quant.dequantize(one.engine.stages[0].params["layers"][0]["wq"])))
        wo = many.engine.stages[0].params["layers"][0]["wo"]  # row-parallel: 64 inputs per device, no short block
        assert wo.qtype == "Q5_0"
        assert any("Q4K does not fit self_attn.o_proj" in r.message and "unsplit" in r.message for r in caplog.records)


@pytest.mark.parametrize("isq,tp", [("Q4K", 1), ("Q4K", 2), ("Q6K", 4), ("Q8_0", 2)])
def test_planned_isq_bytes_equal_allocated(isq, tp):
    """The planner's bytes for a layer (short super-blocks and fallbacks included) are what one device holds."""
    from jaxmap.planning.fit import layer_weight_bytes

    model = jaxmap.load("preset:tiny", max_seq_len=32, progress=False, isq=isq, tp=tp,
                        **({"devices": "0"} if tp == 1 else {}))
    layer = model.engine.stages[0].params["layers"][0]
    device = next(iter(layer["wq"].q[0].sharding.device_set))
    held = sum(s.data.nbytes for leaf in jax.tree.leaves(layer) for s in leaf.addressable_shards
               if s.device == device)
    assert held == layer_weight_bytes(preset_config("tiny"), 0, tp, "float32", isq)


def test_gguf_native_q8_0_equals_requantized(default_gguf):
    """The GGUF's Q8_0 embedding repacked natively equals requantizing its dequantized floats to Q8_0: the scale
    search starts from llama.cpp's amax / 127, which reproduces such blocks exactly (no other scale can do better)."""
    from jaxmap.loading import open_source

    with open_source(default_gguf) as src:
        name = "model.embed_tokens.weight"
        assert src.stored_type(name) == "Q8_0"
        raw, _ = src.raw(name)
        rows = slice(0, 4096)
        native = quant.from_gguf(raw[rows], "Q8_0", (4096, src.shape(name)[1]))
        requant = quant.quantize(src.read(name, np.float32)[rows], "Q8_0")
    np.testing.assert_array_equal(np.asarray(quant.dequantize(_dev(native))),
                                  np.asarray(quant.dequantize(_dev(requant))))


def test_gguf_native_q4_1_reproduces_float32_greedy(default_gguf):
    native = jaxmap.load(str(default_gguf), max_seq_len=64, devices="0", progress=False, layer_mode="per_layer")
    layer = native.engine.stages[0].params["layers"][0]
    assert layer["wq"].qtype == "Q4_1" and native.engine.stages[0].params["embed_tokens"].qtype == "Q8_0"
    dense = jaxmap.load(str(default_gguf), max_seq_len=64, devices="0", progress=False, isq="none",
                        layer_mode="per_layer")
    assert not quant.is_quantized(dense.engine.stages[0].params["layers"][0]["wq"])
    prompt = "The capital of France is"
    a = native.generate([prompt], max_new_tokens=16, stop_at_eos=False)[0].token_ids
    b = dense.generate([prompt], max_new_tokens=16, stop_at_eos=False)[0].token_ids
    assert a == b


def test_tensor_nbytes_matches_storage():
    w = np.zeros((64, 512), np.float32)
    for name in ("Q4K", "Q8_0", "INT8", "Q6K"):
        assert quant.tensor_nbytes(name, w.shape) == quant.quantize(w, name).nbytes
    assert quant.tensor_nbytes(None, w.shape, 2) == w.size * 2
    assert quant.tensor_nbytes("INT8", w.shape, in_shards=4) == quant.quantize(w, "INT8", in_shards=4).nbytes
    for name in K_TYPES:  # short last super-blocks (576 = 2 x 256 + 64; 80 < 256), and a fallback (Q4K on 80: INT8)
        for n in (576, 80):
            got = quant.choose_type(name, n)
            assert quant.tensor_nbytes(name, (64, n)) == quant.quantize(np.zeros((64, n), np.float32), got).nbytes


def test_q8_0_scale_search_never_worse_than_llama_cpp():
    """Q8_0's searched scale: per block never more squared error than gguf's reference (llama.cpp's amax / 127),
    clearly less overall on Gaussian weights, and the stored format unchanged (int8 codes, one float16 per 32)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    w = np.random.default_rng(5).standard_normal((256, 1024)).astype(np.float32)
    w[:, ::64] *= -3  # some blocks whose extreme is negative (code -128 usable)
    ref = dequantize(quantize(w, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0).reshape(w.shape)
    qt = quant.quantize(w, "Q8_0")
    assert qt.d.dtype == np.float16 and qt.d.shape == (256, 32) and qt.q[0].dtype == np.uint8
    back = np.asarray(quant.dequantize(_dev(qt)))
    err, ref_err = (((x - w) ** 2).reshape(256, 32, 32).sum(-1) for x in (back, ref))
    assert (err <= ref_err).all()
    assert np.sqrt(err.sum() / ref_err.sum()) < 0.92  # measured 0.88
    assert (qt.q[0] == 0).any()  # code -128


def test_topology_isq_on_a_prequantized_gguf_only_moves_devices(default_gguf, caplog):
    topo = {"0-10": {"isq": "Q8_0", "device": "cpu[1]"}}
    with caplog.at_level("WARNING", logger="jaxmap.api"):
        model = jaxmap.load(default_gguf, max_seq_len=32, progress=False, topology=topo)
    assert any("topology isq entries ignored" in r.message for r in caplog.records)
    assert model.device_map.stages[0].devices == ["cpu[1]"] and model.device_map.stages[0].end == 10
    assert model.engine.stages[0].params["layers"][0]["wq"].qtype == "Q4_1"  # the file's own type
