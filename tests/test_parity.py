"""Parity with Hugging Face transformers on the same weights (reference data committed; no torch needed).

SmolLM2-135M is loaded from the default GGUF (as transformers loaded it), the tiny models from their HF folders.
float32 logits must agree tightly and greedy continuations exactly, on one device and on every layout.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference.data import TINY_MODELS_DIR, load_reference

import jaxmap

# Logit tolerances: absolute, on logits whose spread is ~10-30. XLA and torch sum in different orders.
ATOL = {"smollm2": 2e-3, "tiny-llama": 2e-4, "tiny-qwen2": 2e-4, "tiny-qwen3": 2e-4}


def model_path(name: str, default_gguf) -> str:
    return str(default_gguf) if name == "smollm2" else str(TINY_MODELS_DIR / name)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2", "tiny-qwen3", "smollm2"])
def loaded(request, default_gguf):
    name = request.param
    if name == "smollm2":  # the session's float32 SmolLM2 on cpu[0], max_seq_len 256: these arguments
        model = request.getfixturevalue("smollm2_float32")
    else:
        model = jaxmap.load(model_path(name, default_gguf), dtype="float32", max_seq_len=256, devices="0",
                            progress=False)
    return name, model, load_reference(name)


def test_tokenizer_matches_reference(loaded):
    name, model, ref = loaded
    add = ref["meta"]["model"]["add_special_tokens"]
    for case in ref["tokenizer_cases"]:
        assert model.tokenizer.encode(case["text"], add_special_tokens=add) == case["ids"], case["text"]
    for text, ids in zip(ref["prompts"], ref["input_ids"], strict=True):
        chat = next(p for p in ref["meta"]["prompts"] if p["text"] == text)["chat"]
        if not chat:
            assert model.encode(text) == ids


def test_last_logits(loaded):
    name, model, ref = loaded
    for ids, expected in zip(ref["input_ids"], ref["last_logits"], strict=True):
        (logits,) = model.forward_logits([ids])
        np.testing.assert_allclose(logits[-1], expected, atol=ATOL[name], rtol=0)
        assert logits[-1].argmax() == expected.argmax()


def test_prefill_logits_every_position(loaded):
    name, model, ref = loaded
    ids = ref["input_ids"][ref["prefill_prompt_index"]]
    (logits,) = model.forward_logits([ids])
    np.testing.assert_allclose(logits, ref["prefill_logits"], atol=ATOL[name], rtol=0)


def test_greedy_tokens(loaded):
    name, model, ref = loaded
    results = model.generate(ref["input_ids"], max_new_tokens=ref["max_new_tokens"], stop_at_eos=False)
    for result, expected in zip(results, ref["greedy"], strict=True):
        assert result.token_ids == expected


def test_chat_template_matches_reference(loaded):
    name, model, ref = loaded
    for prompt in ref["meta"]["prompts"]:
        if prompt["chat"]:
            text = model.tokenizer.apply_chat_template(prompt["messages"])
            assert model.tokenizer.encode(text, add_special_tokens=False) == prompt["input_ids"]


# ---- SmolLM2 on every layout the device-map issue names --------------------------------------------------------
LAYOUTS = {
    "tp3": dict(tp=3, pp=1),
    "pp2": dict(pp=2, tp=1),
    "default-8": dict(),  # 9 heads / 3 kv heads on 8 devices: pp=2 x tp=3, 2 idle
    "n-0:16;1:14": dict(device_layers="0:16;1:14"),
    "topology": dict(topology={"0-10": {"device": "cpu[2]"}, "10-20": {"device": "cpu[5]"},
                               "20-30": {"device": "cpu[2]"}, "/embed_tokens/": {"device": "cpu[7]"}}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_smollm2_layouts(layout, default_gguf):
    ref = load_reference("smollm2")
    model = jaxmap.load(str(default_gguf), dtype="float32", max_seq_len=256, progress=False, **LAYOUTS[layout])
    if layout == "default-8":
        assert [(s.start, s.end, s.tp) for s in model.device_map.stages] == [(0, 15, 3), (15, 30, 3)]
    ids = ref["input_ids"][:2]
    for logits, expected in zip(model.forward_logits(ids), ref["last_logits"][:2], strict=True):
        np.testing.assert_allclose(logits[-1], expected, atol=ATOL["smollm2"], rtol=0)
    results = model.generate(ids, max_new_tokens=12, stop_at_eos=False)
    assert [r.token_ids for r in results] == [g[:12] for g in ref["greedy"][:2]]


def test_smollm2_two_devices_default_is_pipeline(default_gguf):
    """On 2 devices 9 heads cannot split: the planner falls back to pp=2 and says why."""
    model = jaxmap.load(str(default_gguf), max_seq_len=64, progress=False, devices="0,1")
    assert model.device_map.strategy == "pipeline"
    assert "9 attention heads" in model.device_map.reason


def test_smollm2_bf16_close(default_gguf):
    ref = load_reference("smollm2")
    model = jaxmap.load(str(default_gguf), dtype="bfloat16", max_seq_len=128, devices="0", progress=False)
    (logits,) = model.forward_logits([ref["input_ids"][0]])
    expected = ref["last_logits"][0]
    assert np.abs(logits[-1] - expected).max() < 0.05 * np.abs(expected).max() + 0.5
    assert logits[-1].argmax() == expected.argmax()
