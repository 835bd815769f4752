"""The committed transformers reference data is present and self-consistent, and the tiny models regenerate exactly."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from reference.data import NAMES, TINY_MODELS_DIR, load_reference


@pytest.mark.parametrize("name", NAMES)
def test_reference_shapes(name):
    ref = load_reference(name)
    n, vocab = len(ref["prompts"]), ref["meta"]["model"]["vocab_size"]
    assert n >= 3 and len(ref["input_ids"]) == len(ref["greedy"]) == n
    assert ref["last_logits"].shape == (n, vocab) and ref["last_logits"].dtype == np.float32
    assert np.isfinite(ref["last_logits"]).all() and np.isfinite(ref["prefill_logits"]).all()
    first = ref["input_ids"][ref["prefill_prompt_index"]]
    assert ref["prefill_logits"].shape == (len(first), vocab)
    # The prefill's last row is the same forward pass as last_logits[prefill_prompt_index].
    np.testing.assert_allclose(ref["prefill_logits"][-1], ref["last_logits"][ref["prefill_prompt_index"]], atol=1e-5)
    for ids, greedy, margins, eos in zip(
        ref["input_ids"], ref["greedy"], ref["greedy_margins"], ref["eos_positions"], strict=True
    ):
        assert ids and all(0 <= t < vocab for t in ids + greedy)
        assert len(greedy) == len(margins) == ref["max_new_tokens"]
        assert all(m >= 0 for m in margins)
        assert all(greedy[i] in ref["meta"]["model"]["eos_token_ids"] for i in eos)
    # The first greedy token is the argmax of the stored last-position logits.
    assert [int(np.argmax(row)) for row in ref["last_logits"]] == [g[0] for g in ref["greedy"]]
    for case in ref["tokenizer_cases"]:
        assert all(0 <= t < vocab for t in case["ids"])


@pytest.mark.parametrize("name", NAMES)
def test_greedy_is_not_degenerate(name):
    ref = load_reference(name)
    assert all(len(set(g)) > 4 for g in ref["greedy"])
    assert len({tuple(g) for g in ref["greedy"]}) == len(ref["greedy"])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_reference_matches_committed_tiny_model(name):
    """The reference was computed from the tiny model bytes that are committed now (rerun make_reference if not)."""
    source = load_reference(name)["meta"]["source"]
    folder = TINY_MODELS_DIR / name
    for fname, digest in source["sha256"].items():
        assert hashlib.sha256((folder / fname).read_bytes()).hexdigest() == digest, fname


def test_tiny_models_regenerate_identically(tmp_path):
    pytest.importorskip("tokenizers")
    from reference.make_tiny_models import SPECS, write_all

    write_all(tmp_path)
    for spec in SPECS:
        committed, fresh = TINY_MODELS_DIR / spec["name"], tmp_path / spec["name"]
        names = sorted(p.name for p in committed.iterdir())
        assert names == sorted(p.name for p in fresh.iterdir())
        for fname in names:
            old, new = (committed / fname).read_bytes(), (fresh / fname).read_bytes()
            if fname == "tokenizer.json" and old != new:
                # Another tokenizers release may serialize extra fields; what must not change is the vocabulary,
                # the merges and the pipeline pieces jaxmap reads.
                a, b = json.loads(old), json.loads(new)
                for key in ("added_tokens", "normalizer", "pre_tokenizer", "decoder"):
                    assert a[key] == b[key], key
                assert a["model"]["vocab"] == b["model"]["vocab"] and a["model"]["merges"] == b["model"]["merges"]
                continue
            assert old == new, f"{spec['name']}/{fname} differs from a fresh make_tiny_models run"
