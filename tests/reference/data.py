"""Torch-free loader for the committed transformers reference data (written by make_reference.py).

Tests import it as `from reference.data import load_reference` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
TINY_MODELS_DIR = Path(__file__).resolve().parent.parent / "data"
NAMES = ("smollm2", "tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3", "tiny-gemma2", "tiny-mistral-swa")


def load_reference(name: str) -> dict[str, Any]:
    """One model's reference as plain lists and float32 arrays, so tests need neither torch nor transformers.

    Keys: prompts (texts), input_ids, greedy (max_new_tokens ids each, EOS kept), eos_positions, greedy_margins
    (top-1 minus top-2 logit per step), last_logits [n_prompts, vocab], prefill_logits [n_tokens, vocab] for
    prompts[prefill_prompt_index], prefill_prompt_index, max_new_tokens, tokenizer_cases ({text, ids, decoded}),
    and meta (the whole JSON document).
    """
    if name not in NAMES:
        raise KeyError(f"unknown reference {name!r}; known: {', '.join(NAMES)}")
    meta = json.loads((DATA_DIR / f"{name}.json").read_text(encoding="utf-8"))
    with np.load(DATA_DIR / f"{name}.npz") as npz:
        arrays = {key: np.asarray(npz[key], dtype=np.float32) for key in npz.files}
    prompts = meta["prompts"]
    return {
        "name": name,
        "prompts": [p["text"] for p in prompts],
        "input_ids": [list(p["input_ids"]) for p in prompts],
        "greedy": [list(p["greedy_ids"]) for p in prompts],
        "eos_positions": [list(p["eos_positions"]) for p in prompts],
        "greedy_margins": [list(p["greedy_margins"]) for p in prompts],
        "last_logits": arrays["last_logits"],
        "prefill_logits": arrays["prefill_logits"],
        "prefill_prompt_index": meta["prefill_prompt_index"],
        "max_new_tokens": meta["max_new_tokens"],
        "tokenizer_cases": meta["tokenizer_cases"],
        "meta": meta,
    }
