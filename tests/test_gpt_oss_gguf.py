"""gpt-oss from GGUF (``general.architecture = gpt-oss``), as llama.cpp's converter writes it: ggml type 39 (MXFP4)
read as jaxmap's MXFP4 by moving nibbles only, bit-exact against the gguf package's own dequantizer; the tiny
gpt-oss's MXFP4 folder written as a GGUF file (tests/reference/moe_data.write_gpt_oss_gguf), gate and up apart or
fused (``--fuse-gate-up-exps``), against transformers on that folder run with llama.cpp's SwiGLU limit 7
(make_tiny_gpt_oss.py --gguf-reference), experts kept in MXFP4 or dequantized, on one device and tp=2; its plan, bad
files, and the harmony tokens of a gpt-oss vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize
from reference.moe_data import load_gpt_oss_reference, write_gpt_oss_gguf

import jaxmap
from jaxmap.loading.gguf_source import GGUFSource
from jaxmap.quant import mxfp4
from jaxmap.quant.gguf import from_gguf

MXFP4 = gguf.GGMLQuantizationType.MXFP4
HARMONY = Path(__file__).resolve().parent / "data" / "harmony"


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


@pytest.fixture(scope="module")
def ref():
    return load_gpt_oss_reference("tiny-gpt-oss-mxfp4-limit7")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt-oss-gguf")
    return {"apart": write_gpt_oss_gguf(out / "apart.gguf"),
            "fused": write_gpt_oss_gguf(out / "fused.gguf", fuse_gate_up=True, yarn_betas=False),
            "float": write_gpt_oss_gguf(out / "float.gguf", expert_type="F32")}


def test_metadata_reads_as_llama_cpp_runs_it(files):
    hf = jaxmap.families.read_config_json(Path(__file__).resolve().parent / "data" / "tiny-gpt-oss" / "config.json")
    for kind in ("apart", "fused"):
        with GGUFSource(files[kind]) as src:
            src.check_complete()
            got = src.config
            assert (got.architecture, got.num_experts, got.num_experts_per_tok, got.moe_intermediate_size) == (
                "gpt_oss", 4, 2, 64)
            assert got.layer_types == hf.layer_types and got.sliding_window == hf.sliding_window == 4
            assert got.rope_scaling == {**hf.rope_scaling, "truncate": False}  # betas: written, or the defaults
            assert got.swiglu_limit == 7.0 and got.swiglu_alpha == pytest.approx(1.702) and got.attention_bias
            assert not src.unmapped
            gate, up = "model.layers.2.mlp.experts.gate_up_proj[gate]", "model.layers.2.mlp.experts.gate_up_proj[up]"
            assert src.stored_type(up) == "MXFP4" and src.shape(up) == (4, 64, 64)
            assert src.stored_nbytes(gate) == 4 * 64 * (64 // 32 * 17)
            halves = {n: (src.raw(n)[0], src.read(n)) for n in (gate, up, up.replace("proj[", "proj_bias["))}
        if kind == "apart":
            apart = halves
        else:  # the fused file's halves are the apart file's tensors, byte for byte
            for name, (raw, values) in halves.items():
                np.testing.assert_array_equal(raw, apart[name][0])
                np.testing.assert_array_equal(values, apart[name][1])


def check(model, ref, atol=1e-4) -> None:
    for logits, want in zip(model.forward_logits(ref["input_ids"]), ref["logits"], strict=True):
        np.testing.assert_allclose(logits, want, atol=atol, rtol=0)
    results = model.generate(ref["input_ids"], max_new_tokens=len(ref["greedy"][0]), stop_at_eos=False)
    assert [r.token_ids for r in results] == ref["greedy"]


@pytest.mark.parametrize("kind,layout", [("apart", dict(devices="0", tp=1)), ("fused", dict(devices="0", tp=1)),
                                         ("apart", dict(tp=2, pp=1)), ("float", dict(devices="0", tp=1))])
def test_gguf_matches_transformers(files, ref, kind, layout):
    """Experts kept in their MXFP4 blocks (the default for a GGUF), on one device and split over two; F32 experts."""
    model = jaxmap.load(str(files[kind]), max_seq_len=64, progress=False, **layout)
    layer = model.engine.stages[0].params["layers"][0]
    want = "MXFP4" if kind != "float" else None
    assert {getattr(layer[k], "qtype", None) for k in ("experts_gate", "experts_up", "experts_down")} == {want}
    assert {"sinks", "bo", "router_bias", "experts_gate_bias", "experts_down_bias"} <= set(layer)
    check(model, ref)


def test_plan_json_shows_mxfp4_experts(files, run_main, monkeypatch):
    from jaxmap.cli.plan import main

    out = run_main(main, "-m", files["apart"], "--mesh", "1x24gb", "--json")
    assert out.returncode == 0, out.stderr
    layers = json.loads(out.stdout)["layers"]
    assert [layer["tensor_isq"] for layer in layers] == [dict.fromkeys(
        ("experts_gate", "experts_up", "experts_down"), "MXFP4")] * 3


def test_bad_gpt_oss_files(files, tmp_path, run_main):
    from jaxmap.cli.generate import main

    cut = tmp_path / "truncated.gguf"
    cut.write_bytes(files["apart"].read_bytes()[:-5000])
    missing = write_gpt_oss_gguf(tmp_path / "no-sinks.gguf", drop=("blk.1.attn_sinks.weight",))
    for path, says in ((cut, "truncated"), (missing, "blk.1.attn_sinks.weight")):
        out = run_main(main, "-m", path, "-p", "hi", "--max-new-tokens", "2")
        assert out.returncode == 2 and out.stderr.count("error:") == 1 and "Traceback" not in out.stderr, out.stderr
        assert says in out.stderr, out.stderr


def test_harmony_tokens_of_a_gguf_vocabulary(files):
    """A gpt-oss GGUF's vocabulary (byte-level, pre-tokenizer gpt-4o, harmony's tokens marked control) makes a
    harmony tokenizer: each special token one id, the same ids the Hugging Face tokenizer gives, and <|return|> /
    <|call|> stop generation."""
    from jaxmap.loading.tokenizer import Tokenizer

    hf = Tokenizer.from_file(HARMONY / "tokenizer.json")
    with GGUFSource(files["apart"]) as src:
        tok = src.tokenizer()
    assert tok.harmony and {tok.token_to_id("<|return|>"), tok.token_to_id("<|call|>")} <= set(tok.eos_token_ids)
    assert tok.chat_template == (HARMONY / "chat_template.jinja").read_text()
    text = "<|start|>assistant<|channel|>analysis<|message|>Think.\n<|end|><|start|>assistant<|message|>Hi!<|return|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ids[0] == tok.token_to_id("<|start|>") == 6 and ids.count(tok.token_to_id("<|message|>")) == 2
    assert tok.decode(ids, skip_special_tokens=False) == text
