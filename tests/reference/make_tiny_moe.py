"""Write the tiny random mixture-of-experts models (tests/data/tiny-mixtral-swa, tiny-qwen3-moe, tiny-qwen3-moe-norm)
and transformers' logits and greedy tokens for them (tests/reference/data/<name>.json / .npz), so that the MoE tests
compare against transformers without torch. torch and transformers are needed only here:

    python tests/reference/make_tiny_moe.py [NAME ...]

What each one has, at sizes that make it show (hidden 32, 4 heads of 8, vocab 128, no tokenizer: prompts are ids):

- ``tiny-mixtral-swa``: Mixtral, 4 experts top-2, a sliding window of 6 keys, so the prompts (9 and 14 tokens) and
  their greedy continuations run past it; llama.cpp permutes its q/k rows in GGUF (``llama`` architecture).
- ``tiny-qwen3-moe``: Qwen3-MoE, 8 experts top-3, ``norm_topk_prob`` false, a dense layer mixed in
  (``mlp_only_layers: [1]``) with its own ``intermediate_size``, QK-norm.
- ``tiny-qwen3-moe-norm``: ``norm_topk_prob`` true and ``decoder_sparse_step`` 2 (layers 0 and 2 dense).

Weights are seeded normals scaled by 1/sqrt(fan-in) (the router 3x), norms 1 + noise, so logits and the router's
choices are far from ties: the script checks that every routing decision of the reference prompts has a gap between
the k-th and the (k+1)-th router probability of at least ``MIN_GAP`` (a different seed is taken otherwise), so a
float32 reimplementation routes every token as transformers does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
REFERENCE = ROOT / "tests" / "reference" / "data"
PROMPTS = ([3, 17, 5, 60, 22, 9, 41, 8, 70], [11, 4, 33, 90, 2, 57, 101, 64, 7, 19, 120, 45, 6, 88])
NEW = 10
MIN_GAP = 2e-4
COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=False)


def configs() -> dict:
    from transformers import MixtralConfig, Qwen3MoeConfig

    return {
        "tiny-mixtral-swa": MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=4,
                                          num_experts_per_tok=2, sliding_window=6),
        "tiny-qwen3-moe": Qwen3MoeConfig(**{**COMMON, "num_hidden_layers": 3}, intermediate_size=64,
                                         moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3,
                                         norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1],
                                         use_sliding_window=False),
        "tiny-qwen3-moe-norm": Qwen3MoeConfig(**{**COMMON, "num_hidden_layers": 3}, intermediate_size=64,
                                              moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3,
                                              norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[],
                                              use_sliding_window=False),
    }


def randomize(model, seed: int) -> None:
    """Seeded weights far from the initializer's near-zero ones (see the module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                continue
            # [out, in] projections and transformers 5's fused experts ([E, 2I, D], [E, D, I]): fan-in is last
            scale = 3.0 if name.endswith("mlp.gate.weight") else 1.0
            p.copy_(scale * torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def routing_gaps(model, config, ids: list[int]) -> float:
    """The smallest gap between the k-th and (k+1)-th router probability over every MoE layer and token of a full
    forward of ``ids`` (hooks on the routers)."""
    import torch

    k = config.num_experts_per_tok
    gaps: list[float] = []

    def hook(_module, _inputs, output):
        logits = output[0] if isinstance(output, tuple) else output
        probs = torch.softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
        top = torch.topk(probs, k + 1, dim=-1).values
        gaps.append(float((top[:, k - 1] - top[:, k]).min()))

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules()
               if n.endswith("mlp.gate") or n.endswith("block_sparse_moe.gate")]
    if not handles:
        raise SystemExit("no router modules found to hook")
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return min(gaps)


def greedy(model, ids: list[int], n: int) -> tuple[np.ndarray, list[int], list[int], list[float]]:
    """Prompt logits [T, V], n greedy tokens over the KV cache, the full sequence (for the routing gap check) and
    each step's top-1 minus top-2 logit (quantized runs may flip a step whose margin is small)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        logits = out.logits[0].float().numpy().copy()
        past, step = out.past_key_values, out.logits[0, -1]
        new, margins = [], []
        for i in range(n):
            token = int(torch.argmax(step))
            new.append(token)
            top = torch.topk(step.float(), 2).values
            margins.append(float(top[0] - top[1]))
            if i + 1 < n:
                out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, step = out.past_key_values, out.logits[0, -1]
        check = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    if check != new[:len(check)]:  # generate stops at EOS; the loop runs on past it
        raise SystemExit(f"own greedy loop {new} disagrees with generate {check}")
    return logits, new, ids + new, margins


def make(name: str, config) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    for seed in range(20):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        randomize(model, seed)
        runs = [greedy(model, list(p), NEW) for p in PROMPTS]
        gap = min(routing_gaps(model, config, r[2]) for r in runs)
        if gap >= MIN_GAP:
            break
        print(f"{name}: seed {seed} routes a token within {gap:.2e} of a tie; next seed")
    else:
        raise SystemExit(f"{name}: no seed routes every token clear of ties")
    folder = DATA / name
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    REFERENCE.mkdir(parents=True, exist_ok=True)
    meta = {"name": name, "seed": seed, "min_routing_gap": gap, "max_new_tokens": NEW,
            "prompts": [{"input_ids": list(p), "greedy_ids": r[1], "greedy_margins": r[3]}
                        for p, r in zip(PROMPTS, runs, strict=True)],
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "made_by": "tests/reference/make_tiny_moe.py"}
    (REFERENCE / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    np.savez_compressed(REFERENCE / f"{name}.npz", **{f"logits_{i}": r[0] for i, r in enumerate(runs)})
    print(f"{name}: seed {seed}, routing gap {gap:.2e}, greedy {[r[1] for r in runs]}")


def main(argv: list[str]) -> None:
    every = configs()
    for name in argv or list(every):
        make(name, every[name])


if __name__ == "__main__":
    main(sys.argv[1:])
