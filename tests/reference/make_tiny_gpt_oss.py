"""Write the tiny random gpt-oss model (tests/data/tiny-gpt-oss) and transformers' logits and greedy tokens for it
(tests/reference/data/tiny-gpt-oss.json / .npz), so that tests/test_gpt_oss.py compares without torch:

    python tests/reference/make_tiny_gpt_oss.py

Sizes that make each feature show: hidden 64, 4 heads of 16 over 2 kv heads, 3 layers (sliding, full, sliding) with
a window of 4 keys that the 9- and 14-token prompts and their continuations run past, 4 experts top-2 of width 64
(32 per device at tp=2: whole MXFP4 blocks), YaRN RoPE as the real checkpoints have it (factor 32 over 4096, beta
32/1, truncate false: on 16-dim heads its ramp spans dims 2-4), and ``swiglu_limit`` 1.5 instead of 7 so that the
clamps bind on these activations. Sinks are drawn around 0 with unit spread (their initializer's 0.02 would hide
them), biases at 0.1, projections normal over sqrt(fan-in) (the router 3x); every routing decision of the reference
runs is at least ``MIN_GAP`` from a tie, in both the float and the MXFP4 model (another seed is taken otherwise).
Run with ``attn_implementation="eager"`` (the sinks live there).

It also writes ``tests/data/tiny-gpt-oss-mxfp4``: the same model as the published checkpoints store it, experts in
MXFP4 (``*_blocks`` [E, out, in / 32, 16] uint8, two FP4 codes a byte, the even input in the low nibble;
``*_scales`` [E, out, in / 32] E8M0; ``quantization_config.quant_method = mxfp4``), quantized here with plain
numpy (each block's exponent floor(log2(max)) - 2, values rounded to the nearest FP4), and transformers' logits and
greedy tokens for it, loaded with ``Mxfp4Config(dequantize=True)`` and run in float32: a reader that lays out the
blocks differently from transformers does not reproduce them.

``--gguf-reference`` writes only ``tiny-gpt-oss-mxfp4-limit7``: transformers' logits and greedy tokens for that
same MXFP4 folder run with ``swiglu_limit`` 7, the value llama.cpp's gpt-oss graph hard-codes (GGUF files carry no
limit), which the GGUF tests (tests/test_gpt_oss_gguf.py) compare a GGUF written from the folder against.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.reference.make_tiny_moe import MIN_GAP, NEW, PROMPTS, greedy

ROOT = Path(__file__).resolve().parents[2]
NAME = "tiny-gpt-oss"
DATA = ROOT / "tests" / "data" / NAME
REFERENCE = ROOT / "tests" / "reference" / "data"


def config():
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        max_position_embeddings=131072, rms_norm_eps=1e-5, swiglu_limit=1.5, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096})


def randomize(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)

    def normal(shape, scale):
        return scale * torch.randn(shape, generator=gen)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + normal(p.shape, 0.1))
            elif name.endswith("sinks"):
                p.copy_(normal(p.shape, 1.0))
            elif name.endswith("bias"):
                p.copy_(normal(p.shape, 0.1))
            elif "experts." in name:  # [E, in, out]: fan-in is the middle axis
                p.copy_(normal(p.shape, p.shape[1] ** -0.5))
            else:  # [out, in]
                p.copy_(normal(p.shape, (3.0 if "router" in name else 1.0) * p.shape[-1] ** -0.5))


def routing_gap(model, k: int, ids: list[int]) -> float:
    """Smallest k-th minus (k+1)-th router probability over every layer and token of a forward of ``ids``."""
    import torch

    gaps: list[float] = []

    def hook(_module, _inputs, output):
        probs = torch.softmax(output[0].float(), dim=-1)
        top = torch.topk(probs, k + 1, dim=-1).values
        gaps.append(float((top[:, k - 1] - top[:, k]).min()))

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith("mlp.router")]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return min(gaps)


def clamp_share(model, ids: list[int], limit: float) -> float:
    """Share of gate/up values beyond the clamp over a forward of ``ids`` (that the clamp is exercised)."""
    import torch

    seen = [0, 0]

    def hook(module, inputs, _output):
        x = inputs[0]
        gu = x @ module.gate_up_proj[0] + module.gate_up_proj_bias[0]  # expert 0 over every token: enough
        seen[0] += int((gu[..., ::2] > limit).sum() + (gu[..., 1::2].abs() > limit).sum())
        seen[1] += gu.numel()

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith("mlp.experts")]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return seen[0] / max(seen[1], 1)


FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def to_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w [..., out, in]`` -> (blocks [..., out, in / 32, 16] uint8, scales [..., out, in / 32] uint8)."""
    x = w.reshape(*w.shape[:-1], -1, 32)
    amax = np.abs(x).max(-1)
    e = np.floor(np.log2(np.where(amax > 0, amax, 1.0))).astype(np.int32) - 2
    scaled = x / np.ldexp(1.0, e)[..., None]
    mag = np.abs(np.abs(scaled)[..., None] - FP4).argmin(-1).astype(np.uint8)
    codes = np.where(scaled < 0, mag | 8, mag).astype(np.uint8)
    pairs = codes.reshape(*codes.shape[:-1], 16, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8), (e + 127).astype(np.uint8)


def make_mxfp4(model) -> float:
    """tiny-gpt-oss-mxfp4 and its reference (see the module docstring)."""
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoModelForCausalLM, Mxfp4Config

    name = NAME + "-mxfp4"
    folder = DATA.parent / name
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in model.state_dict().items():
        arr = value.detach().float().numpy()
        if key.endswith("experts.gate_up_proj") or key.endswith("experts.down_proj"):
            blocks, scales = to_mxfp4(np.swapaxes(arr, 1, 2))  # HF [E, in, out] -> per expert [out, in]
            tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
        else:
            tensors[key] = np.ascontiguousarray(arr)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((DATA / "config.json").read_text(encoding="utf-8"))
    raw["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    ref = AutoModelForCausalLM.from_pretrained(folder, quantization_config=Mxfp4Config(dequantize=True),
                                               attn_implementation="eager").float().eval()
    runs = [greedy(ref, list(p), NEW) for p in PROMPTS]
    gap = min(routing_gap(ref, ref.config.num_experts_per_tok, r[2]) for r in runs)
    meta = {"name": name, "min_routing_gap": gap, "max_new_tokens": NEW,
            "prompts": [{"input_ids": list(p), "greedy_ids": r[1], "greedy_margins": r[3]}
                        for p, r in zip(PROMPTS, runs, strict=True)],
            "versions": {"torch": torch.__version__}, "made_by": "tests/reference/make_tiny_gpt_oss.py"}
    (REFERENCE / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    np.savez_compressed(REFERENCE / f"{name}.npz", **{f"logits_{i}": r[0] for i, r in enumerate(runs)})
    print(f"{name}: routing gap {gap:.2e}, greedy {[r[1] for r in runs]}")
    return gap


def make_gguf_reference() -> None:
    """tiny-gpt-oss-mxfp4 run with llama.cpp's SwiGLU limit (see the module docstring)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Mxfp4Config

    name, folder = NAME + "-mxfp4-limit7", DATA.parent / (NAME + "-mxfp4")
    cfg = AutoConfig.from_pretrained(folder)
    cfg.swiglu_limit = 7.0
    ref = AutoModelForCausalLM.from_pretrained(folder, config=cfg, quantization_config=Mxfp4Config(dequantize=True),
                                               attn_implementation="eager").float().eval()
    assert all(m.limit == 7.0 for n, m in ref.named_modules() if n.endswith("mlp.experts"))
    runs = [greedy(ref, list(p), NEW) for p in PROMPTS]
    gap = min(routing_gap(ref, ref.config.num_experts_per_tok, r[2]) for r in runs)
    if gap < MIN_GAP / 2:  # the weights are fixed here (no seed to redraw); float32 runs agree to ~1e-6
        raise SystemExit(f"{name}: a token is routed within {gap:.1e} of a tie; the GGUF test would be fragile")
    meta = {"name": name, "min_routing_gap": gap, "swiglu_limit": 7.0, "max_new_tokens": NEW,
            "prompts": [{"input_ids": list(p), "greedy_ids": r[1], "greedy_margins": r[3]}
                        for p, r in zip(PROMPTS, runs, strict=True)],
            "versions": {"torch": torch.__version__},
            "made_by": "tests/reference/make_tiny_gpt_oss.py --gguf-reference"}
    (REFERENCE / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    np.savez_compressed(REFERENCE / f"{name}.npz", **{f"logits_{i}": r[0] for i, r in enumerate(runs)})
    print(f"{name}: routing gap {gap:.2e}, greedy {[r[1] for r in runs]}")


def main() -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = config()
    for seed in range(60):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
        randomize(model, seed)
        runs = [greedy(model, list(p), NEW) for p in PROMPTS]
        gap = min(routing_gap(model, cfg.num_experts_per_tok, r[2]) for r in runs)
        if gap >= MIN_GAP and make_mxfp4(model) >= MIN_GAP:  # both models clear of ties
            break
        print(f"{NAME}: seed {seed} routes a token within {MIN_GAP:.0e} of a tie; next seed")
    else:
        raise SystemExit(f"{NAME}: no seed routes every token clear of ties")
    clamped = clamp_share(model, runs[1][2], cfg.swiglu_limit)
    DATA.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(DATA)
    REFERENCE.mkdir(parents=True, exist_ok=True)
    meta = {"name": NAME, "seed": seed, "min_routing_gap": gap, "clamped_share": clamped, "max_new_tokens": NEW,
            "prompts": [{"input_ids": list(p), "greedy_ids": r[1], "greedy_margins": r[3]}
                        for p, r in zip(PROMPTS, runs, strict=True)],
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "made_by": "tests/reference/make_tiny_gpt_oss.py"}
    (REFERENCE / f"{NAME}.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    np.savez_compressed(REFERENCE / f"{NAME}.npz", **{f"logits_{i}": r[0] for i, r in enumerate(runs)})
    print(f"{NAME}: seed {seed}, routing gap {gap:.2e}, clamped {clamped:.1%}, greedy {[r[1] for r in runs]}")


if __name__ == "__main__":
    import sys

    make_gguf_reference() if "--gguf-reference" in sys.argv[1:] else main()
