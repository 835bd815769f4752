"""The real Gemma 3 270M (Q4_K_M GGUF from PyPI: Q4_K, Q5_0, Q6_K, Q8_0 and F32 tensors, a 262k vocabulary, 512-key
windows) against transformers on the same file (tests/reference/data/gemma3-270m.json, make_gemma3_270m.py).
Skipped where its packages are not installed (the README's test command installs them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import jaxmap
from jaxmap.errors import UserError
from jaxmap.loading import packaged
from jaxmap.loading.packaged import GEMMA3_270M, packaged_model_path

REF = json.loads((Path(__file__).parent / "reference" / "data" / "gemma3-270m.json").read_text())


@pytest.fixture(scope="module")
def gemma_path():
    try:
        return packaged_model_path(GEMMA3_270M)
    except UserError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def dequantized(gemma_path):
    return jaxmap.load(GEMMA3_270M, dtype="float32", max_seq_len=64, progress=False, devices="0")


def test_dequantized_matches_transformers(dequantized):
    config = dequantized.config
    assert (config.num_hidden_layers, config.head_dim, config.sliding_window, config.vocab_size) == (18, 256, 512,
                                                                                                       262144)
    assert (config.rope_theta, config.rope_local_theta) == (1e6, 1e4)
    for record in REF["prompts"]:
        assert dequantized.encode(record["text"]) == record["input_ids"]
    ids = [r["input_ids"] for r in REF["prompts"]]
    for logits, record in zip(dequantized.forward_logits(ids), REF["prompts"], strict=True):
        top = record["top_last_logits"]
        np.testing.assert_allclose(logits[-1][top["ids"]], top["logits"], atol=2e-3, rtol=0)
    results = dequantized.generate(ids, max_new_tokens=16, stop_at_eos=False)
    assert [r.token_ids for r in results] == [r["greedy_ids"] for r in REF["prompts"]]


def test_native_keeps_its_k_quants_packed_and_gives_the_same_tokens(gemma_path):
    model = jaxmap.load(GEMMA3_270M, max_seq_len=64, progress=False, devices="0")
    types = {p.qtype for layer in model.engine.stages[0].params["layers"] for p in layer.values()
             if hasattr(p, "qtype")}
    assert {"Q4K", "Q6K", "Q5_0"} <= types
    record = REF["prompts"][1]
    (result,) = model.generate([record["input_ids"]], max_new_tokens=16, stop_at_eos=False)
    assert result.token_ids == record["greedy_ids"]


def test_assembly_checks_the_sha256_and_leaves_nothing_behind(tmp_path, monkeypatch):
    chunks = [tmp_path / "a.part00", tmp_path / "a.part01"]
    for i, chunk in enumerate(chunks):
        chunk.write_bytes(bytes([i]) * 10)
    target = tmp_path / "cache" / "a.gguf"
    with pytest.raises(UserError, match="do not add up"):
        packaged._assemble(chunks, target, "0" * 64)
    assert not target.exists() and list(target.parent.iterdir()) == []
    import hashlib

    good = hashlib.sha256(bytes([0]) * 10 + bytes([1]) * 10).hexdigest()
    assert packaged._assemble(chunks, target, good).read_bytes() == bytes([0]) * 10 + bytes([1]) * 10
