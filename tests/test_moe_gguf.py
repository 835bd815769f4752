"""Mixture-of-experts models against transformers' committed reference (tests/reference/make_tiny_moe.py): the tiny
Mixtral (sliding window 6, past which its prompts run) and Qwen3-MoE models (a dense layer mixed in,
``norm_topk_prob`` both ways, ``decoder_sparse_step`` 2) from their Hugging Face folders and from GGUF files written
as llama.cpp's converter writes them (stacked ``ffn_{gate,up,down}_exps``, Mixtral as ``llama`` with permuted q/k
rows), float and with the experts kept in their GGUF Q8_0 blocks."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from reference.moe_data import NAMES, load_moe_reference, write_moe_gguf

import jaxmap
from jaxmap.loading.gguf_source import GGUFSource

ATOL = 2e-4


@pytest.fixture(scope="module", params=NAMES)
def ref(request):
    return load_moe_reference(request.param)


def check(model, ref, atol=ATOL) -> None:
    """Every prompt position's logits and the greedy tokens equal transformers'."""
    for logits, want in zip(model.forward_logits(ref["input_ids"]), ref["logits"], strict=True):
        np.testing.assert_allclose(logits, want, atol=atol, rtol=0)
    results = model.generate(ref["input_ids"], max_new_tokens=len(ref["greedy"][0]), stop_at_eos=False)
    assert [r.token_ids for r in results] == ref["greedy"]


def _gguf(ref, tmp_path, qtype=None):
    norm = None if ref["name"] != "tiny-qwen3-moe" else False  # norm_topk_prob false: say so in the file
    return write_moe_gguf(ref["name"], tmp_path / f"{ref['name']}.gguf", qtype, expert_weights_norm=norm)


def test_hf_folder_matches_transformers(ref):
    model = jaxmap.load(str(ref["folder"]), dtype="float32", max_seq_len=64, progress=False, devices="0")
    if ref["name"] == "tiny-mixtral-swa":
        assert model.config.sliding_window == 6 and max(map(len, ref["input_ids"])) > 6
    check(model, ref)


def test_gguf_matches_transformers(ref, tmp_path):
    path = _gguf(ref, tmp_path)
    with GGUFSource(path) as source:
        hf = jaxmap.families.read_config_json(ref["folder"] / "config.json")
        got = source.config
        assert (got.architecture, got.num_experts, got.num_experts_per_tok, got.moe_intermediate_size) == (
            hf.architecture, hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size)
        assert [got.is_moe_layer(i) for i in range(got.num_hidden_layers)] == [
            hf.is_moe_layer(i) for i in range(hf.num_hidden_layers)]
        assert got.norm_topk_prob == hf.norm_topk_prob and got.sliding_window == hf.sliding_window
        stack = next(n for n in source.names() if n.endswith("experts.w2") or n.endswith("experts.down_proj"))
        assert source.shape(stack) == (hf.num_experts, hf.moe_intermediate_size, hf.hidden_size)
    model = jaxmap.load(str(path), dtype="float32", max_seq_len=64, progress=False, devices="0")
    check(model, ref)
