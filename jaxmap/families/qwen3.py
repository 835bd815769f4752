"""Qwen3 dense (0.6B to 32B): the llama layer with an RMSNorm over ``head_dim`` on every query and key head before
RoPE (``q_norm`` / ``k_norm``, one weight shared by all heads), no q/k/v bias, and ``head_dim`` set on its own
(128 on every size, whatever hidden / heads is). Small sizes tie the LM head to the embeddings. llama.cpp names the
norms ``attn_q_norm`` / ``attn_k_norm`` and keeps Hugging Face's q/k row order.
"""

from __future__ import annotations

import dataclasses

from jaxmap.families import llama
from jaxmap.families.base import LayerDesign, TensorDecl

QK_NORM_TENSORS = (
    TensorDecl("q_norm", "model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight",
               ("head_dim",), ("head_dim",), "norm"),
    TensorDecl("k_norm", "model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight",
               ("head_dim",), ("head_dim",), "norm"),
)

FAMILY = dataclasses.replace(
    llama.FAMILY,
    name="qwen3",
    label="Qwen3",
    model_types=("qwen3",),
    architectures={"Qwen3ForCausalLM": "qwen3"},
    gguf_architectures={"qwen3": "qwen3"},
    layer_tensors=llama.ATTENTION_TENSORS + llama.QKV_BIAS_TENSORS + QK_NORM_TENSORS + llama.MLP_TENSORS,
    defaults={},
    gguf_permuted_qk=(),
    design=lambda config, layer: LayerDesign(qk_norm=True, qkv_bias=config.attention_bias),
)
