"""Importance matrices: what collection measures (against a direct computation), that every placement measures the
same, that weighted quantization lowers the weighted error, and the files and flags around it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmap
from jaxmap import quant
from jaxmap.calibrate.imatrix import CALIBRATION_TEXT, collect
from jaxmap.engine import layers as llama
from jaxmap.engine.blocks import rms_norm
from jaxmap.errors import UserError
from jaxmap.families import llama as llama_family
from jaxmap.families import preset_config
from jaxmap.loading.imatrix_file import Imatrix

TINY_LLAMA = str(Path(__file__).parent / "data" / "tiny-llama")  # a Hugging Face folder with a tokenizer

IDS = [int(t) for t in np.random.default_rng(3).integers(0, 256, 40)]


def _dev(qt):
    return jax.tree_util.tree_map(jnp.asarray, qt)


@pytest.fixture(scope="module")
def tiny():
    return jaxmap.load("preset:tiny", max_seq_len=64, progress=False, devices="0")


@pytest.fixture(scope="module")
def tiny_imatrix(tiny):
    return collect(tiny, IDS, chunk=16, progress=False)


def test_collect_measures_each_projection_input(tiny, tiny_imatrix):
    """Layer 0's attention input computed directly from the parameters: the mean over the calibration tokens
    (three independent chunks of 16, 16 and 8) of each input's square; every projection and the head measured."""
    config, params = tiny.config, tiny.engine.stages[0].params
    values = tiny_imatrix.values
    assert tiny_imatrix.tokens == len(IDS)
    assert len(values) == 7 * config.num_hidden_layers + 1
    assert all(v.dtype == np.float32 and np.isfinite(v).all() and (v >= 0).all() for v in values.values())
    x = llama.embed(params, jnp.asarray([IDS]), jnp.float32)
    h = np.asarray(rms_norm(x, params["layers"][0]["attn_norm"], config.rms_norm_eps))[0]
    want = (h.astype(np.float64) ** 2).mean(0)
    for proj in ("q_proj", "k_proj", "v_proj"):  # one input, three weights
        np.testing.assert_allclose(values[f"model.layers.0.self_attn.{proj}.weight"], want, rtol=1e-5)
    assert values["model.layers.0.mlp.down_proj.weight"].shape == (config.intermediate_size,)
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    assert values[head].shape == (config.hidden_size,) and values[head].mean() > 0


@pytest.mark.parametrize("layout", [
    {"tp": 2, "devices": "0,1"},
    {"device_layers": "0:2;1:2"},
    {"layer_mode": "per_layer", "devices": "0"},
])
def test_every_layout_measures_the_same(tiny_imatrix, layout):
    model = jaxmap.load("preset:tiny", max_seq_len=64, progress=False, **layout)
    got = collect(model, IDS, chunk=16, progress=False)
    assert got.values.keys() == tiny_imatrix.values.keys()
    for name, want in tiny_imatrix.values.items():
        np.testing.assert_allclose(got.values[name], want, rtol=2e-4, atol=1e-6, err_msg=name)


def test_host_and_disk_tiers_measure_the_same(tiny_imatrix, tmp_path):
    from tests.test_offload import caps

    model = jaxmap.load("preset:tiny", max_seq_len=64, progress=False, offload_folder=tmp_path,
                        max_memory=caps(preset_config("tiny"), 1, 1))
    assert {s.memory_kind for s in model.device_map.stages} == {"device", "host", "disk"}
    got = collect(model, IDS, chunk=16, progress=False)
    for name, want in tiny_imatrix.values.items():
        np.testing.assert_allclose(got.values[name], want, rtol=2e-4, atol=1e-6, err_msg=name)


def test_collect_needs_float_weights():
    model = jaxmap.load("preset:tiny", max_seq_len=64, progress=False, devices="0", isq="Q8_0")
    with pytest.raises(UserError, match="float weights"):
        collect(model, IDS, progress=False)


@pytest.mark.parametrize("name", quant.IMPORTANCE_TYPES)
def test_importance_lowers_the_weighted_error(name):
    """A tenth of the inputs carry 100x the energy: weighting by it must fit those inputs better, so the error the
    output sees (sum over inputs of importance x squared error) drops; with no importance nothing changes."""
    rng = np.random.default_rng(1)
    n = 512
    w = rng.standard_normal((64, n)).astype(np.float32)
    importance = np.ones(n, np.float32)
    importance[rng.choice(n, n // 10, replace=False)] = 100.0

    def weighted_error(qt):
        back = np.asarray(quant.dequantize(_dev(qt)))
        return float((importance * (back - w) ** 2).sum())

    plain = quant.quantize(w, name)
    weighted = quant.quantize(w, name, importance=importance)
    assert weighted_error(weighted) < 0.97 * weighted_error(plain)
    flat = quant.quantize(w, name, importance=np.full(n, 5.0, np.float32))  # uniform importance: the plain fit's
    assert weighted_error(flat) <= weighted_error(plain) * 1.001  # error or less (Q8_0 searches more scales)


def test_importance_is_ignored_by_per_channel_types_and_checked():
    w = np.random.default_rng(2).standard_normal((16, 256)).astype(np.float32)
    imp = np.linspace(0.1, 10, 256).astype(np.float32)
    for name in ("INT8", "Q8K"):
        a, b = quant.quantize(w, name), quant.quantize(w, name, importance=imp)
        np.testing.assert_array_equal(np.asarray(quant.dequantize(_dev(a))), np.asarray(quant.dequantize(_dev(b))))
    with pytest.raises(ValueError, match="255 entries for a weight with 256 inputs"):
        quant.quantize(w, "Q8_0", importance=imp[:255])
    floor = quant.importance_weights(np.r_[np.zeros(9), np.full(1, 10.0)], 10)
    assert floor.min() > 0  # a column never exercised in calibration is still fitted


def test_load_with_an_imatrix_weights_the_quantized_layers(tiny_imatrix, caplog):
    plain = jaxmap.load("preset:tiny", max_seq_len=64, progress=False, devices="0", isq="Q4K")
    with caplog.at_level("INFO", logger="jaxmap"):
        weighted = jaxmap.load("preset:tiny", max_seq_len=64, progress=False, devices="0", isq="Q4K",
                               imatrix=tiny_imatrix)
    assert "imatrix" in caplog.text and "weighted 28 of 28 quantized weights" in caplog.text
    a = plain.engine.stages[0].params["layers"][1]["w_up"]
    b = weighted.engine.stages[0].params["layers"][1]["w_up"]
    assert a.qtype == b.qtype == "Q4K"
    assert not np.array_equal(np.asarray(quant.dequantize(a)), np.asarray(quant.dequantize(b)))
    tokens = weighted.generate([IDS[:8]], max_new_tokens=4, stop_at_eos=False)[0].token_ids
    assert len(tokens) == 4


def test_imatrix_files_round_trip_and_bad_ones_fail_clearly(tiny_imatrix, tmp_path):
    path = tmp_path / "tiny.imatrix.npz"
    tiny_imatrix.save(path)
    back = Imatrix.load(path)
    assert back.tokens == tiny_imatrix.tokens and back.values.keys() == tiny_imatrix.values.keys()
    assert not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(UserError, match="no such file"):
        Imatrix.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not an importance matrix"):
        Imatrix.load(tmp_path / "junk.npz")
    np.save(tmp_path / "bare.npy", np.ones(3))
    with pytest.raises(UserError, match="not an .npz importance matrix"):
        Imatrix.load(tmp_path / "bare.npy")
    np.savez(tmp_path / "tokens.npz", __tokens__=np.ones(2), w=np.ones(2, np.float32))
    with pytest.raises(UserError, match="lacks a token count"):
        Imatrix.load(tmp_path / "tokens.npz")
    np.savez(tmp_path / "neg.npz", __tokens__=np.int64(3), w=np.array([1.0, -2.0], np.float32))
    with pytest.raises(UserError, match="'w' is not a vector of non-negative numbers"):
        Imatrix.load(tmp_path / "neg.npz")
    other = Imatrix({"model.layers.0.mlp.up_proj.weight": np.ones(7, np.float32)}, 1, "other.npz")
    with pytest.raises(UserError, match="has 7 inputs for model.layers.0.mlp.up_proj.weight.*another model"):
        jaxmap.load("preset:tiny", max_seq_len=64, progress=False, devices="0", isq="Q8_0", imatrix=other)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_cli_writes_an_imatrix_and_generate_uses_it(tmp_path):
    out = tmp_path / "tiny.npz"
    r = _cli("jaxmap.imatrix", "-m", TINY_LLAMA, "-o", str(out), "--max-seq-len", "64", "--text",
             str(CALIBRATION_TEXT), "--max-tokens", "100", "--chunk", "32")
    assert r.returncode == 0, r.stderr
    assert Imatrix.load(out).tokens == 100 and "written to" in r.stderr
    r = _cli("jaxmap.generate", "-m", TINY_LLAMA, "--isq", "Q8_0", "--imatrix", str(out), "--max-new-tokens",
             "3", "--max-seq-len", "64", "-p", "hello", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert "imatrix" in r.stderr and "weighted" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--text", "/nonexistent/calib.txt"], "cannot read calibration text /nonexistent/calib.txt"),
    (["--isq", "Q4K"], "measured on float weights"),
    (["--chunk", "0"], "--chunk must be at least 1"),
    (["-m", "preset:tiny"], "has no tokenizer"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, message, run_main):
    """In this process (the command's main): the subprocess test above covers ``python -m jaxmap.imatrix``."""
    from jaxmap.cli.imatrix import main

    out = tmp_path / "x.npz"
    r = run_main(main, "-m", TINY_LLAMA, "-o", str(out), "--max-seq-len", "64", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_generate_with_a_corrupt_imatrix_is_one_line(tmp_path, run_main):
    from jaxmap.cli.generate import main

    bad = tmp_path / "bad.npz"
    bad.write_text("nope")
    r = run_main(main, "-m", TINY_LLAMA, "--isq", "Q8_0", "--imatrix", str(bad), "-p", "hi")
    assert r.returncode == 2 and "not an importance matrix" in r.stderr and "Traceback" not in r.stderr


def test_smollm2_q8_0_with_the_shipped_calibration_text_halves_kl(default_gguf, smollm2_float32):
    """On the real model: an imatrix from jaxmap's calibration text (not the scored text; 1024 tokens in chunks of
    256) makes Q8_0's next-token distributions closer to float32's on the quality text (measured: mean KL 0.00072 ->
    0.00024, a ratio of 0.34; with chunks of 512, 0.00072 -> 0.00026)."""
    from jaxmap.calibrate.imatrix import calibration_ids
    from jaxmap.calibrate.quality import _kl
    from jaxmap.cli.quality import TEXT

    ref_model = smollm2_float32  # float32 on cpu[0], max_seq_len 256
    ids = ref_model.tokenizer.encode(TEXT.read_text())[:256]
    (ref,) = ref_model.forward_logits([ids])
    imatrix = collect(ref_model, calibration_ids(ref_model.tokenizer, None, 1024), chunk=256, progress=False)
    kl = {}
    for name, im in (("plain", None), ("weighted", imatrix)):
        model = jaxmap.load(str(default_gguf), isq="Q8_0", imatrix=im, max_seq_len=256, devices="0",
                            progress=False)
        (logits,) = model.forward_logits([ids])
        kl[name] = _kl(ref, logits)
        assert (logits.argmax(-1) == ref.argmax(-1)).mean() > 0.96
    assert kl["weighted"] < 0.6 * kl["plain"], kl


def test_convert_with_an_imatrix_stores_what_loading_with_it_quantizes(tmp_path):
    from jaxmap.loading import open_source
    from jaxmap.materialize.checkpoint_writer import convert

    model = jaxmap.load(TINY_LLAMA, max_seq_len=64, progress=False, devices="0", isq="none")
    imatrix = collect(model, IDS[:24], progress=False)
    out = tmp_path / "ckpt"
    convert(open_source(TINY_LLAMA), out, isq="Q4K", progress=False, imatrix=imatrix)
    stored = jaxmap.load(str(out), max_seq_len=64, progress=False, devices="0")
    loaded = jaxmap.load(TINY_LLAMA, max_seq_len=64, progress=False, devices="0", isq="Q4K", imatrix=imatrix)
    for a, b in zip(stored.engine.stages[0].params["layers"], loaded.engine.stages[0].params["layers"], strict=True):
        for key in llama_family.FAMILY.projection_inputs:
            assert a[key].qtype == b[key].qtype
            np.testing.assert_array_equal(np.asarray(quant.dequantize(a[key])), np.asarray(quant.dequantize(b[key])))


def test_reused_disk_folder_still_reports_the_imatrix(tiny_imatrix, tmp_path, caplog):
    """Every quantized layer on the disk tier, loaded twice: the second load reuses the folder and still reports
    what the imatrix weighted (no false "not used" warning)."""
    from tests.test_offload import caps

    kw = dict(max_seq_len=64, progress=False, isq="Q8_0", imatrix=tiny_imatrix, offload_folder=tmp_path,
              max_memory=caps(preset_config("tiny"), 0, 0, isq="Q8_0"))
    jaxmap.load("preset:tiny", **kw)
    with caplog.at_level("INFO", logger="jaxmap"):
        model = jaxmap.load("preset:tiny", **kw)
    assert {s.memory_kind for s in model.device_map.stages} == {"disk"}
    assert "not used" not in caplog.text and "weighted 28 of 28 quantized weights" in caplog.text


def test_collect_refuses_quantized_disk_layers(tmp_path):
    from tests.test_offload import caps

    model = jaxmap.load("preset:tiny", max_seq_len=64, progress=False, isq="Q8_0", offload_folder=tmp_path,
                        max_memory=caps(preset_config("tiny"), 0, 0, isq="Q8_0"))
    with pytest.raises(UserError, match="float weights"):
        collect(model, IDS, progress=False)


# --- llama.cpp's imatrix files --------------------------------------------------------------------------------------

def _gguf_name(hf: str) -> str:
    """Hugging Face -> GGUF tensor name (the inverse of the GGUF loader's table), to write llama.cpp-style files."""
    from jaxmap.families import llama

    return llama.FAMILY.hf_to_gguf(hf)


def write_legacy(path, values: dict, ncall: int = 4, trailer: bool = True) -> None:
    """llama-imatrix's legacy .dat layout: int32 count; per entry int32 len, name, int32 ncall, int32 nval,
    float32 mean * ncall; then int32 chunks, int32 len, dataset name."""
    import struct

    out = [struct.pack("<i", len(values))]
    for name, v in values.items():
        raw = name.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, v.size),
                (v * ncall).astype("<f4").tobytes()]
    if trailer:
        out += [struct.pack("<ii", 12, 9), b"calib.txt"]
    Path(path).write_bytes(b"".join(out))


def write_gguf_imatrix(path, values: dict, count: float = 8.0, chunk_size: int = 512) -> None:
    """llama-imatrix's GGUF layout: NAME.in_sum2 [n_mat, n_in] and NAME.counts [n_mat, 1], float32."""
    from gguf_files import write_gguf

    def metadata(w) -> None:
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", ["calib.txt"])
        w.add_uint32("imatrix.chunk_count", 10)
        w.add_uint32("imatrix.chunk_size", chunk_size)

    tensors = {}
    for name, v in values.items():
        sums = np.asarray(v, np.float32)
        sums = sums.reshape(1, -1) if sums.ndim == 1 else sums
        counts = np.full((sums.shape[0], 1), count, np.float32)
        if name.endswith("zero-count"):
            counts[:] = 0
            name = name.removesuffix("zero-count")
        tensors[name + ".in_sum2"] = sums * counts.clip(min=1) if count else sums
        tensors[name + ".counts"] = counts
    write_gguf(path, tensors, arch="imatrix", metadata=metadata)


def _same_values(got: Imatrix, want: Imatrix) -> None:
    assert got.values.keys() == want.values.keys()
    for k, v in want.values.items():
        np.testing.assert_array_equal(got.values[k], v)


def test_reads_llama_cpp_legacy_imatrix(tmp_path, tiny, tiny_imatrix):
    """A .dat written as llama-imatrix writes it reads back to the same per-input means under Hugging Face names,
    and quantizes exactly as jaxmap's own file does (same logits)."""
    path = tmp_path / "imatrix.dat"
    write_legacy(path, {_gguf_name(k): v for k, v in tiny_imatrix.values.items()})
    got = Imatrix.load(path)
    _same_values(got, tiny_imatrix)
    write_legacy(path, {_gguf_name(k): v for k, v in tiny_imatrix.values.items()}, trailer=False)
    _same_values(Imatrix.load(path), tiny_imatrix)  # the trailer is optional
    ours = jaxmap.load("preset:tiny", isq="Q4K", imatrix=tiny_imatrix, max_seq_len=64, progress=False, devices="0")
    theirs = jaxmap.load("preset:tiny", isq="Q4K", imatrix=str(path), max_seq_len=64, progress=False, devices="0")
    np.testing.assert_array_equal(ours.forward_logits([IDS[:12]])[0], theirs.forward_logits([IDS[:12]])[0])


def test_reads_llama_cpp_gguf_imatrix(tmp_path, tiny_imatrix, caplog):
    """The GGUF layout: sums over counts; a zero count reads as importance 1 (as llama-quantize does); expert stacks
    (n_mat > 1) and names jaxmap has no weight for are skipped with a log line; tokens = chunks x chunk size."""
    values = {_gguf_name(k): v for k, v in tiny_imatrix.values.items()}
    zero = _gguf_name("model.layers.1.mlp.down_proj.weight")
    values[zero + "zero-count"] = values.pop(zero)
    values["blk.0.ffn_gate_exps.weight"] = np.ones((4, 128), np.float32)  # an expert stack
    values["blk.0.ssm_in.weight"] = np.ones(128, np.float32)  # another architecture's tensor
    path = tmp_path / "imatrix.gguf"
    write_gguf_imatrix(path, values)
    with caplog.at_level("INFO", logger="jaxmap.loading.imatrix_llamacpp"):
        got = Imatrix.load(path)
    assert "skipped 2 llama.cpp entries" in caplog.text
    assert got.tokens == 10 * 512
    np.testing.assert_array_equal(got.values["model.layers.1.mlp.down_proj.weight"], np.ones(256, np.float32))
    got.values["model.layers.1.mlp.down_proj.weight"] = tiny_imatrix.values["model.layers.1.mlp.down_proj.weight"]
    _same_values(got, tiny_imatrix)


def test_damaged_llama_cpp_imatrix_files_are_one_line_errors(tmp_path, tiny_imatrix):
    values = {_gguf_name(k): v for k, v in tiny_imatrix.values.items()}
    legacy = tmp_path / "imatrix.dat"
    write_legacy(legacy, values)
    cut = tmp_path / "cut.dat"
    cut.write_bytes(legacy.read_bytes()[:1000])
    with pytest.raises(UserError, match="ends mid-entry"):
        Imatrix.load(cut)
    foreign = tmp_path / "foreign.dat"
    write_legacy(foreign, {"encoder.block.0.weight": np.ones(8, np.float32)})
    with pytest.raises(UserError, match="none of its 1 entries names a weight jaxmap knows"):
        Imatrix.load(foreign)
    negative = tmp_path / "negative.dat"
    write_legacy(negative, {"blk.0.attn_q.weight": -np.ones(128, np.float32)})
    with pytest.raises(UserError, match="negative or non-finite"):
        Imatrix.load(negative)
    from gguf_files import write_gguf

    unpaired = write_gguf(tmp_path / "unpaired.gguf", {"blk.0.attn_q.weight.in_sum2": np.ones((1, 128), np.float32)},
                          arch="imatrix")
    with pytest.raises(UserError, match="sums without counts"):
        Imatrix.load(unpaired)
    model_gguf = write_gguf(tmp_path / "model.gguf", {"blk.0.attn_q.weight": np.ones((4, 32), np.float32)})
    with pytest.raises(UserError, match="without .in_sum2/.counts tensors"):
        Imatrix.load(model_gguf)
    short = tmp_path / "wrong-model.dat"  # right names, another model's widths
    write_legacy(short, {"blk.0.attn_q.weight": np.ones(64, np.float32)})
    with pytest.raises(UserError, match="collected for another model"):
        jaxmap.load("preset:tiny", isq="Q4K", imatrix=str(short), max_seq_len=64, progress=False, devices="0")
