"""Write the tiny random Phi-3 family models (tests/data/tiny-phi3, tiny-phi3-longrope, tiny-phi4) with
transformers' ``Phi3ForCausalLM.from_config`` and their reference data (tests/reference/data/<name>.json/.npz);
torch needed only here.

    python tests/reference/make_tiny_phi3.py

- tiny-phi3: no rope scaling, untied, every head its own kv head (as Phi-3-mini), a 16-key sliding window (as
  Phi-3-mini-4k's config has 2047) so the 20-token prompt and its greedy tokens run past it.
- tiny-phi3-longrope: LongRoPE with distinct short and long factors, original context 32, max 128, gqa.
- tiny-phi4: Phi-4-mini's shape in small: partial_rotary_factor 0.75, tied embeddings, gqa, LongRoPE.

Reference per model (float32, eager attention, greedy = argmax over a full forward at every step):
``short``: two prompts whose prompt + greedy tokens stay within 32 positions (transformers uses the short factors
there), their last-position logits and 12 greedy tokens; ``long``: a 48-token prompt (past the original context:
long factors in transformers) with the logits at every position and 8 greedy tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "data"
OUT = ROOT / "tests" / "reference" / "data"
COMMON = dict(hidden_size=64, num_hidden_layers=4, vocab_size=512, intermediate_size=128, num_attention_heads=4,
              bos_token_id=0, eos_token_id=0, pad_token_id=None)
SHORT_NEW, LONG_NEW = 12, 8


def _longrope(n: int) -> dict:
    short = [round(1.0 + 0.1 * i, 3) for i in range(n)]
    long = [round(1.0 + 1.5 * i ** 1.5, 3) for i in range(n)]
    return {"rope_type": "longrope", "short_factor": short, "long_factor": long}


def configs():
    from transformers import Phi3Config

    return {
        "tiny-phi3": Phi3Config(**COMMON, num_key_value_heads=4, max_position_embeddings=512, sliding_window=16,
                                tie_word_embeddings=False),
        "tiny-phi3-longrope": Phi3Config(**COMMON, num_key_value_heads=2, max_position_embeddings=128,
                                         original_max_position_embeddings=32, rope_scaling=_longrope(8),
                                         tie_word_embeddings=False),
        "tiny-phi4": Phi3Config(**COMMON, num_key_value_heads=2, max_position_embeddings=128,
                                original_max_position_embeddings=32, partial_rotary_factor=0.75,
                                rope_scaling=_longrope(6), tie_word_embeddings=True),
    }


def greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    out = list(ids)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([out])).logits[0, -1]
        out.append(int(torch.argmax(logits)))
    return out[len(ids):]


def main() -> None:
    import torch
    from transformers import Phi3ForCausalLM

    rng = np.random.default_rng(7)
    prompts = [rng.integers(1, 512, 7).tolist(), rng.integers(1, 512, 20).tolist()]
    long_prompt = rng.integers(1, 512, 48).tolist()
    for seed, (name, config) in enumerate(configs().items()):
        torch.manual_seed(300 + seed)
        config._attn_implementation = "eager"
        model = Phi3ForCausalLM(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        folder = MODELS / name
        if folder.exists():
            shutil.rmtree(folder)
        model.save_pretrained(folder)
        (folder / "generation_config.json").unlink(missing_ok=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):  # the shared 512-token BPE of tiny-qwen3
            shutil.copy(MODELS / "tiny-qwen3" / f, folder / f)
        with torch.no_grad():
            last = np.stack([model(torch.tensor([p])).logits[0, -1].numpy() for p in prompts])
            long_logits = model(torch.tensor([long_prompt])).logits[0].numpy()
        meta = {"name": name, "short_prompts": prompts, "short_greedy": [greedy(model, p, SHORT_NEW) for p in prompts],
                "long_prompt": long_prompt, "long_greedy": greedy(model, long_prompt, LONG_NEW),
                "npz": {"short_last_logits": "[2, vocab] at each short prompt's last position",
                        "long_logits": "[48, vocab] at every position of the long prompt"},
                "versions": {"transformers": __import__("transformers").__version__, "torch": torch.__version__}}
        (OUT / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
        np.savez_compressed(OUT / f"{name}.npz", short_last_logits=last.astype(np.float32),
                            long_logits=long_logits.astype(np.float32))
        print(name, sum(p.stat().st_size for p in folder.iterdir()) // 1000, "kB")


if __name__ == "__main__":
    main()
