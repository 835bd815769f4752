"""The MoE decode workload of ``python -m jaxmap.bench --moe``: two random Qwen3-MoE-shaped models with the same
active size per token (the same hidden size, layers, attention, expert width and top-k) and 8 versus 64 experts,
decoded at batch 1 from the same prompt ids. Decode gathers only the routed experts' weights
(:mod:`jaxmap.engine.moe`), so its tokens/s should follow the active parameters, not the total: the two rows should
be close (the issue asks for within 30%), although the 64-expert model holds 8x the expert bytes.

The models are presets written on the fly (random weights, no tokenizer: the prompt is fixed ids), small enough for
a laptop CPU; ``--isq`` quantizes both (experts included) the same way.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

EXPERTS = (8, 64)
SHAPE: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 2048, "hidden_size": 256,
    "intermediate_size": 1024, "moe_intermediate_size": 512, "num_experts_per_tok": 2, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
    "max_position_embeddings": 4096, "use_sliding_window": False, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2,
}


def moe_rows(new_tokens: int, repeats: int, dtype: str = "float32", isq: str | None = None,
             prompt: int = 16) -> list[dict[str, Any]]:
    """One row per expert count: total and active parameters, decode tokens/s (median of ``repeats`` timed runs
    after one that compiles)."""
    from jaxmap.api import load
    from jaxmap.families import layer_param_specs, param_count, preset_config

    ids = [[(7 * i + 3) % SHAPE["vocab_size"] for i in range(prompt)]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for experts in EXPERTS:
            path = Path(tmp) / f"moe-{experts}x.yaml"
            path.write_text(yaml.safe_dump({**SHAPE, "num_experts": experts}))
            config = preset_config(str(path))
            expert_params = sum(s.size for i in range(config.num_hidden_layers)
                                for s in layer_param_specs(config, i).values() if s.role == "expert")
            total = param_count(config)
            active = total - expert_params + expert_params * config.num_experts_per_tok // experts
            model = load(f"preset:{path}", dtype=dtype, isq=isq, max_seq_len=prompt + new_tokens + 8,
                         progress=False, devices="0")
            model.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False)
            tps = sorted(model.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False)[0].stats
                         .decode_tokens_per_s for _ in range(repeats))
            rows.append({"experts": experts, "top_k": config.num_experts_per_tok, "total_params": total,
                         "active_params": active, "decode_tps": tps[len(tps) // 2]})
            del model
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = ["experts  top-k  total params  active params  decode tok/s"]
    for r in rows:
        lines.append(f"{r['experts']:>7}  {r['top_k']:>5}  {r['total_params'] / 1e6:>10.1f} M  "
                     f"{r['active_params'] / 1e6:>11.1f} M  {r['decode_tps']:>12.1f}")
    if len(rows) == 2:
        lines.append(f"ratio {rows[1]['experts']} / {rows[0]['experts']} experts: "
                     f"{rows[1]['decode_tps'] / rows[0]['decode_tps']:.2f}")
    return "\n".join(lines)


# ---- --moe-apart: routed experts on the layer's device vs computed on another CPU device vs streamed ---------------

APART = {  # row name: (what, load flags)
    "device": ("experts on the layer's device (cpu[1])", {}),
    "cpu": ("--cpu-moe: computed on cpu[0], hidden state there and back", {"cpu_moe": True}),
    "host": ("-ot exps=host: held by cpu[0], streamed to cpu[1] (routed slices at decode)",
             {"override_tensor": "exps=host"}),
}


def apart_rows(new_tokens: int, repeats: int, prompt: int = 128, experts: int = 64, dtype: str = "float32",
               isq: str | None = None) -> list[dict[str, Any]]:
    """One row per expert placement of the 64-expert model above, layers on cpu[1] (cpu[0] when only one CPU
    device exists): prefill tokens/s of a ``prompt``-token prompt (at least 32 tokens, so ``--cpu-moe`` streams the
    stacks for it, as llama.cpp does) and decode tokens/s at batch 1, medians of ``repeats`` timed runs after one
    that compiles."""
    import jax

    from jaxmap.api import load

    layer_device = "1" if len(jax.devices("cpu")) > 1 else "0"
    ids = [[(7 * i + 3) % SHAPE["vocab_size"] for i in range(prompt)]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"moe-{experts}x.yaml"
        path.write_text(yaml.safe_dump({**SHAPE, "num_experts": experts}))
        for name, (what, flags) in APART.items():
            model = load(f"preset:{path}", dtype=dtype, isq=isq, max_seq_len=prompt + new_tokens + 8,
                         progress=False, devices=layer_device, max_memory="host:8GiB", **flags)
            model.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False)
            stats = [model.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False)[0].stats
                     for _ in range(repeats)]
            pre = sorted(s.prefill_tokens_per_s for s in stats)
            dec = sorted(s.decode_tokens_per_s for s in stats)
            rows.append({"placement": name, "what": what, "prefill_tps": pre[len(pre) // 2],
                         "decode_tps": dec[len(dec) // 2]})
            del model
    return rows


def format_apart(rows: list[dict[str, Any]]) -> str:
    lines = ["placement  prefill tok/s  decode tok/s  what"]
    for r in rows:
        lines.append(f"{r['placement']:<9}  {r['prefill_tps']:>13.1f}  {r['decode_tps']:>12.1f}  {r['what']}")
    return "\n".join(lines)
