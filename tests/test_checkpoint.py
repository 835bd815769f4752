"""Orbax checkpoints: written once, restored into other layouts with identical logits; bad folders refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import jaxmap
from jaxmap.errors import UserError
from jaxmap.families import config_to_hf
from jaxmap.loading import default_model_path, open_source
from jaxmap.loading.orbax_checkpoint import METADATA, OrbaxSource
from jaxmap.materialize.checkpoint_writer import _write_tokenizer, convert

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "tiny-llama"
PROMPTS = [[5, 17, 99, 3, 250], [42, 7, 300]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "tiny"
    source = open_source(TINY)
    convert(source, out, progress=False)  # written from the host, no layout at all
    source.close()
    return out


@pytest.fixture(scope="module")
def reference():
    return jaxmap.load(TINY, devices="0", progress=False, max_seq_len=128).forward_logits(PROMPTS)


@pytest.mark.parametrize("wish", [dict(devices="0"), dict(tp=4, pp=1), dict(pp=2, tp=1), dict(pp=2, tp=2)],
                         ids=["1-device", "tp4", "pp2", "pp2xtp2"])
def test_restore_into_other_layouts(ckpt, reference, wish):
    model = jaxmap.load(str(ckpt), progress=False, max_seq_len=128, **wish)
    logits = model.forward_logits(PROMPTS)
    same_layout = jaxmap.load(TINY, progress=False, max_seq_len=128, **wish).forward_logits(PROMPTS)
    for got, want, one_device in zip(logits, same_layout, reference, strict=True):
        np.testing.assert_array_equal(got, want)  # bit-identical to loading the safetensors in that layout
        np.testing.assert_allclose(got, one_device, rtol=2e-4, atol=2e-4)  # a layout only reorders sums
    stages = model.engine.stages
    assert len(stages) == wish.get("pp", 1)
    wq = stages[0].params["layers"][0]["wq"]
    tp = wish.get("tp", 1)
    assert wq.sharding.num_devices == tp
    assert {s.data.shape for s in wq.addressable_shards} == {(wq.shape[0], wq.shape[1] // tp)}  # split on restore


def test_restore_casts_and_keeps_the_tokenizer(ckpt):
    model = jaxmap.load(str(ckpt), progress=False, max_seq_len=64, dtype="bfloat16", devices="0")
    assert model.engine.stages[0].params["layers"][0]["wq"].dtype == ml_dtypes.bfloat16
    ref = open_source(TINY).tokenizer()
    tok = model.tokenizer
    text = "Hello world, this is a test"
    assert tok.encode(text) == ref.encode(text)
    assert tok.chat_template == ref.chat_template and set(tok.eos_token_ids) == set(ref.eos_token_ids)
    src = OrbaxSource(ckpt)  # host reads give Hugging Face layout back
    name = "model.layers.1.self_attn.q_proj.weight"
    np.testing.assert_array_equal(src.read(name), open_source(TINY).read(name, np.float32))
    assert src.shape(name) == open_source(TINY).shape(name) and src.stored_type(name) == "F32"


def test_gguf_tokenizer_is_written_with_its_chat_template(tmp_path):
    try:
        gguf = open_source(default_model_path())
    except UserError:
        pytest.skip("default model not installed")
    _write_tokenizer(gguf, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(gguf.config)))
    from jaxmap.loading.tokenizer import Tokenizer

    ref = gguf.tokenizer()
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json", config_eos=gguf.config.eos_token_ids)
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(messages)
    text = ref.apply_chat_template(messages)
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert tok.bos_token_id == ref.bos_token_id and set(ref.eos_token_ids) <= set(tok.eos_token_ids)


def test_incomplete_checkpoints_are_refused(ckpt, tmp_path):
    no_meta = tmp_path / "no-meta"
    shutil.copytree(ckpt, no_meta)
    (no_meta / METADATA).unlink()
    with pytest.raises(UserError, match="incomplete checkpoint"):
        open_source(no_meta)
    no_item = tmp_path / "no-item"
    shutil.copytree(ckpt, no_item)
    shutil.rmtree(no_item / "params" / "layer_00002")
    with pytest.raises(UserError, match="incomplete checkpoint: item params/layer_00002 is missing"):
        open_source(no_item)


def test_plan_for_another_model_is_refused(ckpt, tmp_path):
    plan = tmp_path / "plan.yaml"
    other = ROOT / "tests" / "data" / "tiny-qwen2"
    jaxmap.load(str(other), progress=False, max_seq_len=64, devices="0", save_plan=plan)
    with pytest.raises(UserError, match="the plan was made for model"):
        jaxmap.load(str(ckpt), progress=False, max_seq_len=64, plan=plan)


def test_convert_refuses_existing_out_and_unknown_isq(ckpt, tmp_path):
    with pytest.raises(UserError, match="already exists"):
        convert(open_source(TINY), ckpt, progress=False)
    with pytest.raises(UserError, match="unknown --isq type 'Q9'"):
        convert(open_source(TINY), tmp_path / "q", isq="Q9", progress=False)
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.partial-*"))


# ---- quantized checkpoints -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def q8(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "tiny-q8"
    convert(open_source(TINY), out, isq="Q8_0", progress=False)
    return out


@pytest.mark.parametrize("wish", [dict(devices="0"), dict(tp=4, pp=1), dict(pp=2, tp=1)],
                         ids=["1-device", "tp4", "pp2"])
def test_quantized_checkpoint_restores_its_types_in_any_layout(q8, wish):
    model = jaxmap.load(str(q8), progress=False, max_seq_len=64, **wish)
    same = jaxmap.load(TINY, progress=False, max_seq_len=64, isq="Q8_0", **wish)
    for got, want in zip(model.forward_logits(PROMPTS), same.forward_logits(PROMPTS), strict=True):
        np.testing.assert_array_equal(got, want)  # bit-identical to quantizing the safetensors in that layout
    tp = wish.get("tp", 1)
    for stage in model.engine.stages:
        for layer in stage.params["layers"]:
            assert {w.qtype for k, w in layer.items() if k.startswith("w")} == {"Q8_0"}
        wo = stage.params["layers"][0]["wo"]  # row-parallel: packed values and scales split along the input
        assert {s.data.shape for s in wo.q[0].addressable_shards} == {(128, 128 // tp)}
        assert {s.data.shape for s in wo.d.addressable_shards} == {(128, 128 // 32 // tp)}
    assert not hasattr(model.engine.stages[-1].params["lm_head"], "qtype")  # --isq covers the layers only


def test_quantized_checkpoint_metadata_and_host_reads(q8):
    meta = json.loads((q8 / METADATA).read_text())
    assert meta["version"] == 2 and meta["isq"] == "Q8_0"
    e = meta["tensors"]["model.layers.0.self_attn.o_proj.weight"]
    assert e["isq"] == "Q8_0" and e["quant"]["static"] == {"qtype": "Q8_0", "shape": [128, 128], "sub": 32}
    assert {k: v["key"] for k, v in e["quant"]["leaves"].items()} == {"q0": "wo__q0", "d": "wo__d"}
    assert meta["tensors"]["model.norm.weight"]["isq"] is None
    src, ref = OrbaxSource(q8), open_source(TINY)
    name = "model.layers.2.mlp.down_proj.weight"
    assert src.stored_type(name) == "Q8_0" and src.stored_nbytes(name) == 256 * 128 * 34 // 32
    np.testing.assert_allclose(src.read(name), ref.read(name, np.float32), atol=2e-3)  # dequantized, HF layout


def test_quantized_moe_checkpoint_round_trips(tmp_path):
    """A Q8_0 conversion of a mixture of experts (one QTensor per expert, stacked) restores its types, and with an
    explicit dtype dequantizes each stack back to its [E, in, out] layout: the same logits either way."""
    folder = Path(__file__).parent / "data" / "tiny-qwen3-moe"
    out = tmp_path / "moe-q8"
    convert(open_source(str(folder)), out, isq="Q8_0", progress=False)
    native = jaxmap.load(str(out), progress=False, max_seq_len=32, devices="0")
    assert native.engine.stages[0].params["layers"][0]["experts_up"].qtype == "Q8_0"
    floats = jaxmap.load(str(out), progress=False, max_seq_len=32, devices="0", dtype="float32")
    assert not hasattr(floats.engine.stages[0].params["layers"][0]["experts_up"], "qtype")
    src = OrbaxSource(out)
    stack = next(n for n in src.names() if n.endswith("experts.up_proj"))
    assert src.read(stack).shape == open_source(str(folder)).shape(stack)
    prompt = [[1, 5, 9, 14, 3]]
    for a, b in zip(native.forward_logits(prompt), floats.forward_logits(prompt), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_isq_on_a_quantized_checkpoint_follows_the_gguf_rules(q8, caplog):
    def wq(**kw):
        return jaxmap.load(str(q8), progress=False, max_seq_len=32, devices="0", **kw).engine.stages[0].params[
            "layers"][0]["wq"]

    assert wq(isq="none").dtype == np.float32 and not hasattr(wq(dtype="float32"), "qtype")  # dequantized
    with caplog.at_level("WARNING"):
        assert wq(isq="Q4_0").qtype == "Q4_0"
        assert "already quantized (Q8_0)" in caplog.text  # requantized from the dequantized weights, with a warning
        caplog.clear()
        assert wq(topology={"0-1": {"isq": "Q4_0", "device": "cpu[1]"}}).qtype == "Q8_0"
        assert "topology isq entries ignored" in caplog.text  # only the devices apply


def test_short_super_blocks_are_kept_on_unsplit_inputs_only(tmp_path, caplog):
    """tiny's 128 inputs: Q4K stores one short super-block per row. Restored at tp=2, the column-parallel wq keeps it
    (identical to --isq Q4K in that layout); the row-parallel wo (64 inputs per device) is requantized (fallback)."""
    from jaxmap import quant

    out = tmp_path / "q4k"
    convert(open_source(TINY), out, isq="Q4K", progress=False)
    with caplog.at_level("WARNING", logger="jaxmap.materialize.isq"):
        model = jaxmap.load(str(out), progress=False, max_seq_len=64, tp=2)
    same = jaxmap.load(TINY, progress=False, max_seq_len=64, isq="Q4K", tp=2)
    got, want = (m.engine.stages[0].params["layers"][0] for m in (model, same))
    assert got["wq"].qtype == "Q4K" and got["wq"].d.shape == (128, 1) and got["wo"].qtype == "Q5_0"
    np.testing.assert_array_equal(np.asarray(quant.dequantize(got["wq"])), np.asarray(quant.dequantize(want["wq"])))
    assert "Q4K does not fit self_attn.o_proj" in caplog.text


def test_per_channel_types_are_stored_unsplit_and_resplit_exactly():
    from jaxmap import quant
    from jaxmap.loading.orbax_checkpoint import _resplit, qtensor_from, qtensor_leaves

    w = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    for qtype in ("INT8", "F8E4M3"):
        stored, layout = qtensor_leaves(quant.quantize(w, qtype, 1))
        layout["leaves"] = {k: {"shape": list(v.shape)} for k, v in stored.items()}
        layout["in_shards"] = 1
        split, repeat = _resplit(layout, 4)
        assert repeat and split["leaves"]["d"]["shape"] == [16, 4]
        got = qtensor_from({**stored, "d": np.repeat(stored["d"], 4, axis=1)}, split)
        want = quant.quantize(w, qtype, 4)
        for a, b in zip(qtensor_leaves(got)[0].values(), qtensor_leaves(want)[0].values(), strict=True):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        assert (got.qtype, got.shape, got.sub) == (want.qtype, want.shape, want.sub)
    assert _resplit({"static": {"qtype": "Q4_0"}}, 4)[1] is False  # block types do not depend on the split


def test_interrupted_quantized_conversion_leaves_nothing(q8, tmp_path, monkeypatch):
    from jaxmap.materialize import isq

    calls = []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return place(self, *args)

    place = isq.Quantizer.place
    monkeypatch.setattr(isq.Quantizer, "place", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(open_source(TINY), tmp_path / "q", isq="Q8_0", progress=False)
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.partial-*"))
    half = tmp_path / "half"  # a copy that lost its metadata (written last) is refused
    shutil.copytree(q8, half)
    (half / METADATA).unlink()
    with pytest.raises(UserError, match="incomplete checkpoint"):
        open_source(half)


def test_gguf_is_converted_with_its_native_types(default_gguf, tmp_path):
    source = open_source(default_gguf)  # opened once (reading SmolLM2's GGUF header takes seconds)
    out = convert(source, tmp_path / "native", progress=False)  # no --isq, no --dtype
    meta = json.loads((out / METADATA).read_text())
    assert meta["isq"] == "native"
    assert {e["isq"] for n, e in meta["tensors"].items() if ".layers." in n and "norm" not in n} == {"Q4_1"}
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert size < 1.1 * default_gguf.stat().st_size  # about the GGUF's size (float32 would be about 5x)
    model = jaxmap.load(str(out), progress=False, max_seq_len=32, devices="0")
    assert model.engine.stages[0].params["layers"][0]["wq"].qtype == "Q4_1"
    assert model.engine.stages[0].params["embed_tokens"].qtype == "Q8_0"  # tied table: the GGUF's own type
    from jaxmap import quant
    from jaxmap.loading.orbax_checkpoint import qtensor_leaves

    name = "model.layers.3.mlp.down_proj.weight"  # the stored blocks are the GGUF's, repacked (logits: README)
    raw, _ = source.raw(name)
    want = qtensor_leaves(quant.from_gguf(raw, "Q4_1", source.shape(name)))[0]
    got = qtensor_leaves(OrbaxSource(out).read_qtensor(name))[0]
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_convert_cli_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxmap.convert", "-m", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert proc.returncode == 2 and proc.stderr.startswith("error: no such file or folder")
    assert len(proc.stderr.strip().splitlines()) == 1
