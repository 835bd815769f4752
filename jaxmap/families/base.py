"""The family interface: what a model family declares, as data, so that the rest of jaxmap never names a family or a
weight.

A family is one :class:`Family` value in one file of this folder. It says

- which Hugging Face ``model_type`` / ``architectures`` and GGUF ``general.architecture`` values it claims, how its
  config keys become the shared :class:`~jaxmap.config.ModelConfig` (defaults per model type, refusals);
- its tensors (:class:`TensorDecl`): jaxmap's key, the Hugging Face and GGUF names, the shape in config terms, the
  logical axes the rules table splits, and a role (embedding, attention, mlp, norm, head) that the planner, the memory
  model, ISQ and the placement flags work from;
- its decoder layer as a :class:`LayerDesign`: which shared blocks the engine's generic layer composes, with their
  settings (query/key norms, biases, ...), so that the forward code lives once in :mod:`jaxmap.engine.layers`;
- its per-layer KV-cache slots (a sliding-window layer holds W slots, not ``max_seq_len``).

Why declarative rather than a forward function per family: the declaration must import without jax (the planner
reads it to plan for hardware you do not have), the engine compiles one program per distinct design (a hashable
value), and a new family that differs from one it resembles in a norm or a bias is a few lines, not a copy of a
decoder layer. A family whose layer needs a block the engine lacks adds the block there, once, for every family.

Everything here is pure Python: no jax, no numpy arrays.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from jaxmap.config import ModelConfig
from jaxmap.errors import UserError
from jaxmap.families.wrapped import Wrapper

LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "experts")
ROLES = ("embedding", "attention", "mlp", "expert", "router", "norm", "head")
# Symbolic sizes a TensorDecl's shape is written in, read from the config.
_DIMS: dict[str, Callable[[ModelConfig], int]] = {
    "vocab": lambda c: c.vocab_size,
    "hidden": lambda c: c.hidden_size,
    "q": lambda c: c.q_size,
    "kv": lambda c: c.kv_size,
    "mlp": lambda c: c.intermediate_size,
    "head_dim": lambda c: c.head_dim,
    "experts": lambda c: c.num_experts,
    "moe_mlp": lambda c: c.moe_intermediate_size,
    "heads": lambda c: c.num_attention_heads,
}
ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")
_ROPE_ALIASES = {"su": "longrope"}  # LongRoPE's first name, in Phi-3's early configs
_INTEGER_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter of a concrete model: its Hugging Face source tensor, the shape jaxmap keeps it in, its logical
    axes, its role, and the decoder layer it belongs to (None for embeddings, final norm and head).

    ``transpose`` says the Hugging Face tensor is ``[out, in]`` and jaxmap keeps ``[in, out]``. ``gguf_name`` is the
    same tensor's name in a GGUF file (shown by ``plan --json``, matched by placement regexes).
    """

    hf_name: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    transpose: bool = False
    role: str = "attention"
    layer: int | None = None
    gguf_name: str = ""
    # A part of a fused tensor (Phi-3's qkv_proj): the stored tensor's names; its rows are Family.fused_parts'.
    stored: str = ""
    stored_gguf: str = ""

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.transpose else self.shape


@dataclasses.dataclass(frozen=True)
class TensorDecl:
    """One tensor as a family declares it, in config terms.

    ``hf`` / ``gguf`` are the names in those files; in per-layer tensors ``{i}`` stands for the layer index.
    ``fused`` makes the tensor a row range of a tensor stored fused with others (Phi-3's ``qkv_proj``, ``[q + 2 kv,
    hidden]``): the stored tensor's Hugging Face and GGUF names, and ``hf`` / ``gguf`` are then jaxmap's names of
    the part (:func:`fused_part` writes them ``<stored>[<part>]``). The parts of one stored tensor, in declaration
    order, are its rows in Hugging Face layout (``[out, in]``), so each part is a whole tensor to the rest of jaxmap:
    tensor parallelism splits q, k and v (gate, up) each on head boundaries, ISQ quantizes each, and a quantized
    GGUF's raw rows slice whole (quant blocks never straddle rows).
    ``shape`` is in jaxmap's layout (projections ``[in, out]``), written with the symbolic sizes ``vocab``,
    ``hidden``, ``q`` (heads x head_dim), ``kv``, ``mlp`` and ``head_dim``. ``when`` names a boolean config field
    that must be true for the tensor to exist (``attention_bias``); ``unless`` one that must be false
    (``tie_word_embeddings`` for the LM head).
    """

    key: str
    hf: str
    gguf: str
    shape: tuple[str, ...]
    axes: tuple[str, ...]
    role: str
    transpose: bool = False
    when: str | None = None
    unless: str | None = None
    gguf_offset: float = 0.0  # GGUF stores the value plus this (llama.cpp's Gemma norms hold 1 + weight)
    fused: tuple[str, str] | None = None  # (stored Hugging Face name, stored GGUF name) of the fused tensor
    # Mixture-of-experts families: True on MoE layers only (experts, router), False on dense layers only (the dense
    # MLP of Qwen3-MoE's mlp_only_layers), None on every layer.
    moe: bool | None = None
    # Columns of a stored tensor, interleaved: (stored Hugging Face name, first column, step) along the last axis
    # in jaxmap's layout (gpt-oss's ``experts.gate_up_proj`` [E, hidden, 2 I]: gate the even columns, up the odd).
    # ``hf`` is then jaxmap's name of the part; GGUF files store the parts apart (llama.cpp de-interleaves them).
    interleaved: tuple[str, int, int] | None = None

    def exists(self, config: ModelConfig, layer: int | None = None) -> bool:
        return ((self.when is None or bool(getattr(config, self.when)))
                and (self.unless is None or not getattr(config, self.unless))
                and (self.moe is None or layer is None or config.is_moe_layer(layer) == self.moe))

    def spec(self, config: ModelConfig, layer: int | None = None) -> ParamSpec:
        fill = {} if layer is None else {"i": layer}
        stored = ("", "") if self.fused is None else (self.fused[0].format(**fill), self.fused[1].format(**fill))
        return ParamSpec(self.hf.format(**fill), tuple(_DIMS[d](config) for d in self.shape), self.axes,
                         self.transpose, self.role, layer, self.gguf.format(**fill), *stored)


def fused_part(key: str, stored_hf: str, stored_gguf: str, part: str, shape: tuple[str, ...], axes: tuple[str, ...],
               role: str, **kw: Any) -> TensorDecl:
    """A tensor that is rows of a stored fused one, named ``<stored>[<part>]`` in both conventions."""
    return TensorDecl(key, f"{stored_hf}[{part}]", f"{stored_gguf}[{part}]", shape, axes, role,
                      fused=(stored_hf, stored_gguf), **kw)


@dataclasses.dataclass(frozen=True)
class LayerDesign:
    """The shared blocks one decoder layer composes, with their settings. Hashable: the engine compiles one program
    per distinct design, so layers that share a design share their compiled program."""

    qk_norm: bool = False  # RMSNorm over head_dim on each query and key head, before RoPE (Qwen3, Gemma 3)
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + weight), in float32 (Gemma)
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs before each residual add (Gemma 2/3)
    mlp_act: str = "silu"  # gated MLP activation: silu (SwiGLU) or gelu_tanh (GeGLU)
    attn_scale: float | None = None  # score scale; None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap)
    window: int | None = None  # a sliding layer's window (keys attended, itself included); None: all
    rope_local: bool = False  # RoPE with the config's local base (sliding layers of Gemma 3)
    moe: bool = False  # the MLP is a mixture of experts (jaxmap.engine.moe) rather than one gated MLP
    attn_sinks: bool = False  # a learned logit per head in each softmax's denominator (gpt-oss's ``sinks``)
    o_bias: bool = False  # a bias on the attention output projection (gpt-oss)
    moe_bias: bool = False  # biases on the router and on every expert's gate, up and down projections (gpt-oss)
    # the experts' activation: "silu" (SwiGLU) or "clamped_swiglu" (gpt-oss: gate clamped above at swiglu_limit, up
    # to +-swiglu_limit, (up + 1) * gate * sigmoid(swiglu_alpha * gate))
    moe_act: str = "silu"
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None


@dataclasses.dataclass(frozen=True)
class ModelDesign:
    """What the layers around the decoder stack do (embedding, final norm, LM head); hashable like LayerDesign."""

    embed_scale: float | None = None  # embeddings multiplied by this, cast to the compute dtype (Gemma: sqrt(hidden))
    norm_plus_one: bool = False  # the final RMSNorm scales by (1 + weight)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)


def config_design(config: ModelConfig, layer: int, **fixed: Any) -> LayerDesign:
    """A layer's design from what the config says of it (biases, activation, score scale and cap, sliding window,
    local RoPE), with a family's own fixed choices (``qk_norm=True``...) on top."""
    sliding = config.is_sliding(layer)
    return LayerDesign(
        qkv_bias=config.attention_bias,
        mlp_act=config.hidden_act,
        attn_scale=config.query_pre_attn_scalar ** -0.5 if config.query_pre_attn_scalar else None,
        attn_softcap=config.attn_logit_softcap,
        window=config.sliding_window if sliding else None,
        rope_local=sliding and config.rope_local_theta is not None,
        **fixed,
    )


def _design_from_config(config: ModelConfig, layer: int) -> LayerDesign:
    return config_design(config, layer)


def _plain_model_design(config: ModelConfig) -> ModelDesign:
    return ModelDesign(final_softcap=config.final_logit_softcap)


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything particular to one model family (see the module docstring)."""

    name: str
    label: str  # what a user recognises: "Llama 2/3, Mistral, Qwen2, SmolLM2"
    model_types: tuple[str, ...]
    architectures: Mapping[str, str]  # Hugging Face class -> model_type
    gguf_architectures: Mapping[str, str]  # GGUF general.architecture -> model_type
    layer_tensors: tuple[TensorDecl, ...]
    outer_tensors: tuple[TensorDecl, ...]
    # Which activation each projection multiplies (by jaxmap key): what an importance matrix measures per weight.
    projection_inputs: Mapping[str, str]
    # config.json defaults that differ between the model types a family claims ({model_type: {key: value}}).
    defaults: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    # GGUF architectures whose q/k projection rows llama.cpp's converter permuted (interleaved RoPE pairs).
    gguf_permuted_qk: tuple[str, ...] = ()
    design: Callable[[ModelConfig, int], LayerDesign] = _design_from_config
    model_design: Callable[[ModelConfig], ModelDesign] = _plain_model_design
    # A family's own checks of a parsed config (raise UserError for a feature it does not implement).
    check: Callable[[ModelConfig, Mapping[str, Any]], None] | None = None
    # config.json keys of its own beyond the shared ones (to_hf), and from GGUF metadata (gguf_config).
    hf_extra: Callable[[ModelConfig], dict[str, Any]] | None = None
    gguf_extra: Callable[[str, Callable[[str, Any], Any], dict[str, Any]], dict[str, Any]] | None = None
    # Checkpoint formats that wrap this family's text model with parts jaxmap leaves out (a vision tower).
    wrappers: tuple[Wrapper, ...] = ()
    # GGUF files it claims by their metadata (``get(key, default)``) beyond general.architecture: Mixtral's say
    # ``llama`` with ``llama.expert_count`` > 0; checked before the architecture strings.
    gguf_claims: Callable[[str, Callable[[str, Any], Any]], bool] | None = None
    # config.json keys of its own that become ModelConfig fields beyond the shared ones (the experts of a MoE).
    config_extra: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None

    # ---- config ---------------------------------------------------------------------------------------------------
    def read_config(self, raw: Mapping[str, Any], name: str = "") -> ModelConfig:
        """A ``config.json`` of one of this family's model types as a :class:`ModelConfig`."""
        model_type = raw.get("model_type") or next(
            (self.architectures[a] for a in raw.get("architectures") or [] if a in self.architectures), None)
        config = read_common(raw, model_type, self.defaults.get(model_type, {}), name)
        if self.config_extra is not None:
            config = dataclasses.replace(config, **self.config_extra({**self.defaults.get(model_type, {}), **raw}))
        if self.check is not None:
            self.check(config, raw)
        return config

    def to_hf(self, config: ModelConfig) -> dict[str, Any]:
        """The config as Hugging Face ``config.json`` keys (presets, checkpoints, reference scripts)."""
        arch_class = next(k for k, v in self.architectures.items() if v == config.architecture)
        out: dict[str, Any] = {
            "architectures": [arch_class],
            "model_type": config.architecture,
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "rms_norm_eps": config.rms_norm_eps,
            "rope_theta": config.rope_theta,
            "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
            "max_position_embeddings": config.max_position_embeddings,
            "tie_word_embeddings": config.tie_word_embeddings,
            "attention_bias": config.attention_bias,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": list(config.eos_token_ids),
        }
        if self.defaults.get(config.architecture, {}).get("use_sliding_window") or config.sliding_window:
            out["sliding_window"] = config.sliding_window
            out["use_sliding_window"] = config.sliding_window is not None
        if config.layer_types is not None:
            out["layer_types"] = list(config.layer_types)
        if config.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = config.partial_rotary_factor
        if self.hf_extra is not None:
            out.update(self.hf_extra(config))
        return out

    # ---- tensors --------------------------------------------------------------------------------------------------
    def layer_params(self, config: ModelConfig, layer: int) -> dict[str, ParamSpec]:
        """Decoder layer ``layer``'s parameters keyed by jaxmap's short names (heads-major projections, so equal
        splits of the ``heads`` / ``kv_heads`` axes fall on head boundaries)."""
        return {t.key: t.spec(config, layer) for t in self.layer_tensors if t.exists(config, layer)}

    def outer_params(self, config: ModelConfig) -> dict[str, ParamSpec]:
        """Embeddings, final norm and LM head (absent when tied)."""
        return {t.key: t.spec(config) for t in self.outer_tensors if t.exists(config)}

    def fused_parts(self, config: ModelConfig) -> dict[str, tuple[str, int, int, int]]:
        """Every part of a fused stored tensor: part name -> (stored name, first row, end row, the stored tensor's
        rows), rows in Hugging Face layout; empty for families that store every tensor whole."""
        out: dict[str, tuple[str, int, int, int]] = {}
        groups: list[list[ParamSpec]] = []
        for specs in [self.outer_params(config)] + [self.layer_params(config, i)
                                                    for i in range(config.num_hidden_layers)]:
            by_stored: dict[str, list[ParamSpec]] = {}
            for spec in specs.values():
                if spec.stored:
                    by_stored.setdefault(spec.stored, []).append(spec)
            groups += by_stored.values()
        for parts in groups:
            total = sum(p.hf_shape[0] for p in parts)
            row = 0
            for p in parts:
                out[p.hf_name] = (p.stored, row, row + p.hf_shape[0], total)
                row += p.hf_shape[0]
        return out

    def interleaved_parts(self, config: ModelConfig) -> dict[str, tuple[str, int, int]]:
        """Every tensor declared as interleaved columns of a stored one: part name -> (stored name, first column,
        step), columns of the last axis in jaxmap's layout."""
        out: dict[str, tuple[str, int, int]] = {}
        for i in range(config.num_hidden_layers):
            for t in self.layer_tensors:
                if t.interleaved is not None and t.exists(config, i):
                    stored, first, step = t.interleaved
                    out[t.hf.format(i=i)] = (stored.format(i=i), first, step)
        return out

    def layer_design(self, config: ModelConfig, layer: int) -> LayerDesign:
        return self.design(config, layer)

    def outer_design(self, config: ModelConfig) -> ModelDesign:
        return self.model_design(config)

    def kv_slots(self, config: ModelConfig, layer: int, max_seq_len: int) -> int:
        """KV-cache slots per sequence that layer ``layer`` holds: a sliding-window layer keeps its last W keys (a
        ring buffer), every other layer the whole context."""
        window = self.layer_design(config, layer).window
        return min(window, max_seq_len) if window else max_seq_len

    # ---- names ----------------------------------------------------------------------------------------------------
    def layer_of(self, hf_name: str) -> int | None:
        """The decoder layer a Hugging Face tensor name belongs to, or None."""
        m = self._layer_pattern.match(hf_name)
        return int(m.group(1)) if m else None

    def gguf_to_hf(self, gguf_name: str) -> str | None:
        """The Hugging Face name of a GGUF tensor, or None for tensors the family has no use for."""
        m = _GGUF_BLOCK.match(gguf_name)
        if m:
            hf = self._gguf_layer_names.get(m.group(2))
            return hf.format(i=int(m.group(1))) if hf else None
        return self._gguf_outer_names.get(gguf_name)

    def hf_to_gguf(self, hf_name: str) -> str | None:
        layer = self.layer_of(hf_name)
        fill = {} if layer is None else {"i": layer}
        for t in self.layer_tensors if layer is not None else self.outer_tensors:
            if t.hf.format(**fill) == hf_name:
                return t.gguf.format(**fill)
            if t.fused is not None and t.fused[0].format(**fill) == hf_name:
                return t.fused[1].format(**fill)
        return None

    def gguf_offset(self, hf_name: str) -> float:
        """What the GGUF file adds to this tensor's values (subtracted when it is read)."""
        key = self._key_of(hf_name)
        decls = self.layer_tensors if self.layer_of(hf_name) is not None else self.outer_tensors
        return next((t.gguf_offset for t in decls if t.key == key), 0.0)

    def gguf_row_heads(self, gguf_arch: str, config: ModelConfig, hf_name: str) -> int | None:
        """Heads to un-permute a tensor's rows by (llama.cpp's interleaved q/k order), or None for other tensors."""
        if gguf_arch not in self.gguf_permuted_qk:
            return None
        key = self._key_of(hf_name)
        return {"wq": config.num_attention_heads, "bq": config.num_attention_heads,
                "wk": config.num_key_value_heads, "bk": config.num_key_value_heads}.get(key)

    def gguf_config(self, gguf_arch: str, get: Callable[[str, Any], Any], tensor_names: set[str],
                    where: str) -> dict[str, Any]:
        """``config.json`` keys from GGUF metadata (``get(key, default)``) and the file's tensor names (mapped to
        Hugging Face's)."""

        def need(key: str) -> Any:
            value = get(f"{gguf_arch}.{key}", None)
            if value is None:
                raise UserError(f"{where}: GGUF metadata lacks {gguf_arch}.{key}")
            return value

        heads = int(need("attention.head_count"))
        hidden = int(need("embedding_length"))
        probe = ModelConfig("probe", 1, 1, 1, 1, 1, 1, 1)  # names of layer 0 / outer tensors, whatever the sizes
        with_bias = dataclasses.replace(probe, attention_bias=True)
        bias_names = {s.hf_name for k, s in self.layer_params(with_bias, 0).items()
                      if k not in self.layer_params(probe, 0)}
        head_names = {s.hf_name for s in self.outer_params(probe).values() if s.role == "head"}
        raw = {
            "model_type": self.gguf_architectures.get(gguf_arch, self.model_types[0]),  # Mixtral: a llama file
            "hidden_size": hidden,
            "intermediate_size": int(need("feed_forward_length")),
            "num_hidden_layers": int(need("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(get(f"{gguf_arch}.attention.head_count_kv", heads)),
            "head_dim": int(get(f"{gguf_arch}.attention.key_length", hidden // heads)),
            "rms_norm_eps": float(get(f"{gguf_arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(get(f"{gguf_arch}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(get(f"{gguf_arch}.context_length", 4096)),
            "tie_word_embeddings": not head_names & tensor_names,
            "attention_bias": bool(bias_names & tensor_names),
        }
        rope_dims = get(f"{gguf_arch}.rope.dimension_count", None)
        if rope_dims is not None and int(rope_dims) != raw["head_dim"]:
            if gguf_arch in self.gguf_permuted_qk:
                raise UserError(f"{where}: RoPE on {rope_dims} of {raw['head_dim']} head dimensions (partial rotary) "
                                f"in a {gguf_arch} file whose q/k rows llama.cpp permuted is not supported")
            raw["partial_rotary_factor"] = int(rope_dims) / raw["head_dim"]
        for key, hf_key in (("attention.sliding_window", "sliding_window"),
                            ("attn_logit_softcapping", "attn_logit_softcapping"),
                            ("final_logit_softcapping", "final_logit_softcapping")):
            value = get(f"{gguf_arch}.{key}", None)
            if value is not None:
                raw[hf_key] = value
        if self.gguf_extra is not None:
            raw.update(self.gguf_extra(gguf_arch, get, raw))
        return raw

    def embedding_name(self, config: ModelConfig) -> str:
        return next(s.hf_name for s in self.outer_params(config).values() if s.role == "embedding")

    def head_name(self, config: ModelConfig) -> str:
        """The tensor the LM head multiplies by: its own, or the embedding table when tied."""
        outer = self.outer_params(config)
        return next((s.hf_name for s in outer.values() if s.role == "head"), self.embedding_name(config))

    # ---- derived lookups ------------------------------------------------------------------------------------------
    @property
    def _layer_pattern(self) -> re.Pattern:
        prefixes = {t.hf.split("{i}")[0] for t in self.layer_tensors}
        return re.compile("^(?:" + "|".join(re.escape(p) for p in sorted(prefixes)) + r")(\d+)\.")

    @property
    def _gguf_layer_names(self) -> dict[str, str]:  # a fused tensor's GGUF name maps to its stored HF name
        names = (t.fused or (t.hf, t.gguf) for t in self.layer_tensors)
        return {gguf.split("{i}.", 1)[1]: hf for hf, gguf in names}

    @property
    def _gguf_outer_names(self) -> dict[str, str]:
        return {gguf: hf for hf, gguf in (t.fused or (t.hf, t.gguf) for t in self.outer_tensors)}

    def _key_of(self, hf_name: str) -> str | None:
        layer = self.layer_of(hf_name)
        if layer is None:
            return next((t.key for t in self.outer_tensors if t.hf == hf_name), None)
        return next((t.key for t in self.layer_tensors if t.hf.format(i=layer) == hf_name), None)


_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


# ---- config.json keys shared by every family -----------------------------------------------------------------------

def read_common(raw: Mapping[str, Any], model_type: str, defaults: Mapping[str, Any], name: str = "") -> ModelConfig:
    """The keys every decoder family shares, checked: whole numbers are whole, rope scaling is an object of a
    known type, head_dim is given when heads do not divide hidden. ``defaults`` fills keys the family's model type
    leaves out (Qwen2's biases, Mistral's sliding window, Gemma's RoPE bases and layer pattern).

    RoPE comes in either spelling: the older ``rope_theta`` / ``rope_scaling`` (/ ``rope_local_base_freq``) keys or
    transformers 5's ``rope_parameters`` (one object, or one per layer type: ``full_attention`` and
    ``sliding_attention``)."""

    def get(key: str, default: Any = None) -> Any:
        value = raw.get(key)
        return value if value is not None else defaults.get(key, default)

    def need(key: str) -> Any:  # a family's defaults may fill even these (transformers' class defaults)
        value = get(key)
        if value is None:
            raise KeyError(key)
        return value

    try:
        for key, value in raw.items():  # int() would take True as 1 and 64.5 as 64
            if key in _INTEGER_KEYS and (isinstance(value, bool) or isinstance(value, float)
                                         and not value.is_integer()):
                raise UserError(f"model config: {key} must be a positive integer, got {value!r}")
        theta, scaling, local_theta = _rope_keys(raw, get)
        if scaling and scaling.get("rope_type") == "longrope":
            # Phi-3 keeps the pretraining context beside rope_scaling; transformers prefers that key
            original = raw.get("original_max_position_embeddings") or scaling.get(
                "original_max_position_embeddings") or get("original_max_position_embeddings") or get(
                "max_position_embeddings", 4096)
            scaling = {**scaling, "original_max_position_embeddings": original}
        params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), Mapping) else {}
        partial = get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        head_dim = get("head_dim")
        if not head_dim and heads > 0 and hidden % heads:
            raise UserError(f"model config: hidden_size {hidden} is not divisible by num_attention_heads {heads}; "
                            f"set head_dim in config.json")
        head_dim = head_dim or (hidden // heads if heads > 0 else 0)
        eos = get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        use_sliding = raw.get("use_sliding_window", defaults.get("use_sliding_window", False))
        sliding = get("sliding_window") if use_sliding else None
        layers = int(need("num_hidden_layers"))
        return ModelConfig(
            architecture=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=bool(get("attention_bias", False)),
            sliding_window=int(sliding) if sliding else None,
            layer_types=_layer_types(raw, get, layers, bool(sliding)),
            rope_local_theta=local_theta if sliding else None,
            partial_rotary_factor=float(partial),
            hidden_act=_activation(get("hidden_activation") or get("hidden_act", "silu")),
            query_pre_attn_scalar=_optional_float(get("query_pre_attn_scalar")),
            attn_logit_softcap=_optional_float(get("attn_logit_softcapping")),
            final_logit_softcap=_optional_float(get("final_logit_softcapping")),
            bos_token_id=get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            name=name or str(raw.get("_name_or_path", "")),
        )
    except KeyError as exc:
        raise UserError(f"model config is missing the key {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise UserError(f"model config has a malformed value: {exc}") from None


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _activation(name: Any) -> str:
    if name not in _ACTIVATIONS:
        raise UserError(f"model config: activation {name!r} is not supported yet; supported: "
                        f"{', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _rope_keys(raw: Mapping[str, Any], get: Callable[..., Any]) -> tuple[float, dict | None, float | None]:
    """(global base, global scaling or None, local base or None) from either spelling of the RoPE keys."""
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, Mapping):
        raise UserError(f"model config: rope_parameters must be an object, got {params!r}")
    local: Mapping[str, Any] = {}
    if params and isinstance(params.get("full_attention"), Mapping):
        local = params.get("sliding_attention") or {}
        params = params["full_attention"]
    scaling = raw.get("rope_scaling")
    if scaling and not isinstance(scaling, Mapping):
        raise UserError(f"model config: rope_scaling must be an object (rope_type, factor, ...) or null, "
                        f"got {scaling!r}")
    if params:
        theta = params.get("rope_theta", get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    else:
        theta = get("rope_theta", 10000.0)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        kind = _ROPE_ALIASES.get(kind, kind)
        if kind not in ROPE_TYPES:
            raise UserError(f"model config: rope scaling {kind!r} is not supported yet; supported: "
                            f"{', '.join(ROPE_TYPES)}")
        if kind == "default":
            scaling = None
        elif kind in ("longrope", "yarn"):
            scaling = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": kind}
    local_kind = local.get("rope_type", "default")
    if local_kind != "default":
        raise UserError(f"model config: rope scaling {local_kind!r} on sliding layers is not supported yet")
    local_theta = local.get("rope_theta", get("rope_local_base_freq"))
    return float(theta), dict(scaling) if scaling else None, _optional_float(local_theta)


def _layer_types(raw: Mapping[str, Any], get: Callable[..., Any], layers: int, sliding: bool) -> tuple[str, ...] | None:
    """Per-layer attention kinds: ``layer_types`` as given, or from the older ``sliding_window_pattern`` (every
    n-th layer full, the others sliding); None when every layer is alike."""
    types = raw.get("layer_types")
    if types is None:
        pattern = get("sliding_window_pattern") or get("_sliding_window_pattern")
        if pattern is None or not sliding:
            return None
        pattern = int(pattern)
        if pattern < 1:
            raise UserError(f"model config: sliding_window_pattern must be a positive integer, got {pattern}")
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    if not isinstance(types, (list, tuple)) or not all(isinstance(t, str) for t in types):
        raise UserError(f"model config: layer_types must be a list of strings, got {types!r}")
    if not sliding and all(t == "full_attention" for t in types):
        return None  # Qwen's configs list every layer as full when the window is off
    if not sliding:
        raise UserError("model config: layer_types has sliding_attention layers but the sliding window is off "
                        "(sliding_window or use_sliding_window)")
    return tuple(types)
