"""The llama family: Llama 2 and 3 (``llama``), Mistral (``mistral``, which GGUF files call ``llama``), Qwen2 and 2.5
(``qwen2``, with q/k/v biases), and SmolLM2 (a llama).

Pre-norm decoder layers: RMSNorm, grouped-query attention with rotary embeddings (default, linear or llama3
frequencies), RMSNorm, SwiGLU MLP. llama.cpp's converter permutes the q/k rows of ``llama`` GGUF files (interleaved
RoPE pairs); its qwen2 files keep Hugging Face's order.
"""

from __future__ import annotations

from jaxmap.families.base import Family, TensorDecl

ATTENTION_TENSORS = (
    TensorDecl("attn_norm", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight",
               ("hidden",), ("embed",), "norm"),
    TensorDecl("wq", "model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight",
               ("hidden", "q"), ("embed", "heads"), "attention", transpose=True),
    TensorDecl("wk", "model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight",
               ("hidden", "kv"), ("embed", "kv_heads"), "attention", transpose=True),
    TensorDecl("wv", "model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight",
               ("hidden", "kv"), ("embed", "kv_heads"), "attention", transpose=True),
    TensorDecl("wo", "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight",
               ("q", "hidden"), ("heads", "embed"), "attention", transpose=True),
)
MLP_TENSORS = (
    TensorDecl("mlp_norm", "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight",
               ("hidden",), ("embed",), "norm"),
    TensorDecl("w_gate", "model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight",
               ("hidden", "mlp"), ("embed", "mlp"), "mlp", transpose=True),
    TensorDecl("w_up", "model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight",
               ("hidden", "mlp"), ("embed", "mlp"), "mlp", transpose=True),
    TensorDecl("w_down", "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight",
               ("mlp", "hidden"), ("mlp", "embed"), "mlp", transpose=True),
)
QKV_BIAS_TENSORS = (
    TensorDecl("bq", "model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias", ("q",), ("heads",),
               "attention", when="attention_bias"),
    TensorDecl("bk", "model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias", ("kv",), ("kv_heads",),
               "attention", when="attention_bias"),
    TensorDecl("bv", "model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias", ("kv",), ("kv_heads",),
               "attention", when="attention_bias"),
)
OUTER_TENSORS = (
    TensorDecl("embed_tokens", "model.embed_tokens.weight", "token_embd.weight", ("vocab", "hidden"),
               ("vocab", "embed"), "embedding"),
    TensorDecl("final_norm", "model.norm.weight", "output_norm.weight", ("hidden",), ("embed",), "norm"),
    TensorDecl("lm_head", "lm_head.weight", "output.weight", ("hidden", "vocab"), ("embed", "vocab"), "head",
               transpose=True, unless="tie_word_embeddings"),
)
PROJECTION_INPUTS = {"wq": "attn_in", "wk": "attn_in", "wv": "attn_in", "wo": "attn_out",
                     "w_gate": "mlp_in", "w_up": "mlp_in", "w_down": "mlp_act"}

FAMILY = Family(
    name="llama",
    label="Llama 2/3, Mistral, Qwen2, SmolLM2",
    model_types=("llama", "mistral", "qwen2"),
    architectures={"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"},
    gguf_architectures={"llama": "llama", "qwen2": "qwen2"},
    layer_tensors=ATTENTION_TENSORS + QKV_BIAS_TENSORS + MLP_TENSORS,
    outer_tensors=OUTER_TENSORS,
    projection_inputs=PROJECTION_INPUTS,
    defaults={"qwen2": {"attention_bias": True}, "mistral": {"use_sliding_window": True}},
    gguf_permuted_qk=("llama",),
)
