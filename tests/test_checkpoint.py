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
from jaxmap.checkpoint import METADATA, OrbaxSource, _write_tokenizer, convert
from jaxmap.errors import UserError
from jaxmap.loading import default_model_path, open_source

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
    (tmp_path / "config.json").write_text(json.dumps(gguf.config.to_hf_dict()))
    from jaxmap.tokenizer import Tokenizer

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


def test_convert_refuses_existing_out_and_isq(ckpt, tmp_path):
    with pytest.raises(UserError, match="already exists"):
        convert(open_source(TINY), ckpt, progress=False)
    with pytest.raises(UserError, match="not available in this build|not wired"):
        convert(open_source(TINY), tmp_path / "q", isq="q4_0", progress=False)
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.partial-*"))


def test_convert_cli_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxmap.convert", "-m", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert proc.returncode == 2 and proc.stderr.startswith("error: no such file or folder")
    assert len(proc.stderr.strip().splitlines()) == 1
