"""Write tests/data/harmony/tokenizer.json: a character-level tokenizer for the tiny gpt-oss model (vocabulary 128)
that has o200k_harmony's special tokens, so that the chat path (template, stop tokens, channel parsing) runs end to
end on tests/data/tiny-gpt-oss:

    python tests/reference/make_harmony_tokenizer.py

Ids 0-9 are the special tokens, laid out so that the tiny model's bos (1) and eos (2) are ``<|startoftext|>`` and
``<|endoftext|>`` as in the real vocabulary; ids 10-105 are the printable ASCII characters and the newline; any
other character encodes to ``<unk>`` (0). No torch or network: the file is written as JSON by hand.

``chat_template.jinja`` beside it is gpt-oss-20b's own template (Apache-2.0, from the Hugging Face repository
openai/gpt-oss-20b), kept byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "harmony" / "tokenizer.json"
SPECIALS = ["<unk>", "<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>",
            "<|start|>", "<|end|>", "<|message|>", "<|call|>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def tokenizer_json() -> dict:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, tok in enumerate(SPECIALS)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": None, "post_processor": None, "decoder": {"type": "Fuse"},
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": []}}


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(tokenizer_json(), indent=1) + "\n")
    print(f"wrote {OUT}")
