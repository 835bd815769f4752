"""Write the tiny random models of the families added after the llama ones (tests/data/tiny-gemma3, tiny-gemma2,
tiny-mistral-swa) with transformers' own ``from_config`` and ``save_pretrained`` (torch needed only here).

    python tests/reference/make_tiny_families.py [NAME ...]
    python tests/reference/make_reference.py --only tiny-gemma3 tiny-gemma2 tiny-mistral-swa

``tiny-gemma3-mm`` is tiny-gemma3's text model inside a ``Gemma3ForConditionalGeneration`` with a one-layer SigLIP
vision tower, saved as transformers saves that class (``language_model.model.*`` beside ``vision_tower.*``). Its
text logits are tiny-gemma3's (checked here, against transformers running the wrapped model), so its tests compare
with tiny-gemma3's reference data.

Each is small enough to commit (float32, vocab 512, hidden 64, 6 layers) and has what sets its family apart, at
sizes that make it show: an 8-key sliding window, so the reference prompts (up to ~25 tokens) and their 32 greedy
tokens run well past it; Gemma 3's 5:1 local/global layers with their own RoPE bases and per-head q/k norms; a score
scale (``query_pre_attn_scalar`` 24) that is not head_dim; Gemma 2's attention and final soft-caps set low (3 and 2)
so they bind. Weights are the initializer's plus seeded noise (Gemma's norm weights start at zero, so the noise is
what makes ``1 + weight`` matter). The tokenizer is the shared 512-token BPE of tiny-qwen3.
"""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
COMMON = dict(hidden_size=64, num_hidden_layers=6, vocab_size=512, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=512, bos_token_id=0, eos_token_id=0,
              pad_token_id=None)


# Gemma 2's caps flatten scores and logits: an untied head and more noise keep its greedy text from repeating one
# token at once (tied, the scaled embedding of the last token dominates its own logit).
NOISE = {"tiny-gemma2": 0.1}


def configs():
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig

    return {
        "tiny-gemma3": Gemma3TextConfig(**COMMON, sliding_window=8, query_pre_attn_scalar=24),
        "tiny-gemma2": Gemma2Config(**COMMON, sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=3.0,
                                    final_logit_softcapping=2.0, tie_word_embeddings=False),
        "tiny-mistral-swa": MistralConfig(**COMMON, sliding_window=8, tie_word_embeddings=False),
    }


def make_multimodal() -> None:
    import torch
    from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    text = AutoModelForCausalLM.from_pretrained(DATA / "tiny-gemma3", dtype=torch.float32).eval()
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text.config.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          boi_token_index=498, eoi_token_index=499, image_token_index=500)
    torch.manual_seed(200)
    model = Gemma3ForConditionalGeneration(config).eval()
    model.model.language_model.load_state_dict(
        {k.removeprefix("model."): v for k, v in text.state_dict().items() if k.startswith("model.")}, strict=True)
    ids = torch.tensor([[0, 5, 17, 300, 41, 9, 77, 100, 200, 3, 4, 8, 9, 10, 11, 12, 13]])
    with torch.no_grad():
        assert torch.equal(text(ids).logits, model(input_ids=ids).logits), "wrapped text model differs"
    folder = DATA / "tiny-gemma3-mm"
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DATA / "tiny-qwen3" / f, folder / f)
    print("tiny-gemma3-mm", sum(p.stat().st_size for p in folder.iterdir()) // 1000, "kB")


def main(only: list[str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    for seed, (name, config) in enumerate(configs().items()):
        if only and name not in only:
            continue
        torch.manual_seed(100 + seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * NOISE.get(name, 0.05))
        folder = DATA / name
        if folder.exists():
            shutil.rmtree(folder)
        model.save_pretrained(folder)
        (folder / "generation_config.json").unlink(missing_ok=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(DATA / "tiny-qwen3" / f, folder / f)
        print(name, sum(p.stat().st_size for p in folder.iterdir()) // 1000, "kB")
    if not only or "tiny-gemma3-mm" in only:
        make_multimodal()


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
