"""Each weight's final ISQ type, decided once, by the planner: what the DeviceMap stores and everything else reads.

Pure data, no jax. For every 2-D weight (and stack of MoE experts, each expert quantized as one ``[out, in]``
weight) of a stage's layers (the families' ``layer_param_specs``) and of the outer
placements (``outer_param_specs``): the *requested* type, then the split the rules table gives the weight at its
stage's ``tp`` (:func:`~jaxmap.planning.rules.logical_to_spec`, heads counted in heads), then
:func:`~jaxmap.quant.types.fitted_type` (the fallback chain). The rules for the requested type (the README's ISQ
section):

- a decoder-layer weight takes its layer's ``isq`` (a topology range's, else ``--isq``), stacked MoE experts too
  (expert by expert); a MoE router stays float (llama.cpp's quantizer skips ``ffn_gate_inp`` likewise);
- a topology ``/regex/`` entry with an ``isq`` types the decoder-layer weights it matches apart from their layer
  (routed experts at Q4K beside attention at Q8_0, say): the layer's request then carries those weights' own types
  after its base type, ``Q8_0 experts_gate=Q4K experts_up=Q4K`` (:func:`layer_request`), which is what
  ``Stage.isq`` stores and saved plans keep; such an explicit type reaches a router too;
- the LM head keeps its precision unless a ``/regex/`` topology entry names a type for it, or the checkpoint is
  kept in its own types (``native``); with tied embeddings the shared table takes the head's type when it has one,
  else the embeddings' own entry;
- ``native`` (a GGUF or quantized checkpoint kept in its stored types) requests each tensor's stored jaxmap type,
  from a map ``hf_name -> type``; a tensor missing from the map is stored as float (or in a type with no native
  form) and stays float. Without the map (a plan for hardware you lack, made from a preset) the final type is the
  placeholder ``native``: the memory model counts such a tensor at its file size when known, else as float, and
  loading resolves it from the file (:func:`resolve_native`).

:func:`assign_types` writes them into ``Stage.tensor_isq`` (per layer ``{weight key: final type}``, quantized
weights only) and ``Placement.tensor_isq``; :func:`ensure_types` fills a saved plan written before they existed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from jaxmap.config import ModelConfig
from jaxmap.errors import UserError
from jaxmap.families import ParamSpec, layer_param_specs, outer_param_specs
from jaxmap.planning.expert_parallel import axis_sizes
from jaxmap.planning.rules import RULES, logical_to_spec
from jaxmap.quant.types import NATIVE, fitted_type, parse_isq, tensor_nbytes

OUTER_KEYS = ("embed", "final_norm", "lm_head")


@dataclasses.dataclass(frozen=True)
class Split:
    """A 2-D weight as a QTensor stores it (``[out, in]`` whatever the float layout) and how a stage splits it."""

    out: int
    n: int
    in_shards: int
    out_shards: int

    @property
    def shards(self) -> int:
        return self.in_shards * self.out_shards


@dataclasses.dataclass(frozen=True)
class TensorType:
    """One weight's ISQ decision: the type asked for, the one it gets after fallbacks, at which split."""

    key: str  # the jaxmap weight key: ``wq``, ``w_down``, ... or ``embed_tokens`` / ``lm_head``
    spec: ParamSpec
    requested: str  # the layer's / placement's type, the stored type (native), or ``native`` (not known yet)
    final: str
    split: Split


def units(config: ModelConfig) -> dict[str, int]:
    """What a folded axis must divide by (heads, not heads x head_dim): as the planner and the loader split."""
    return {"heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads}


def weight_split(spec: ParamSpec, tp: int, unit_counts: Mapping[str, int] | None = None, ep: int = 1) -> Split:
    """How a ``tp``-way stage (routed experts split ``ep`` ways) splits ``spec`` (the rules table), in the QTensor's
    ``[out, in]`` orientation."""
    sizes = axis_sizes(spec.role, tp, ep)
    axes = logical_to_spec(spec.axes, RULES, spec.shape, sizes, name=spec.hf_name, units=unit_counts)
    shards = [sizes[a] if a else 1 for a in axes] + [1] * (2 - len(axes))
    if _stacked(spec):  # each expert of a stack [E, in, out] is one [out, in] weight
        return Split(spec.shape[2], spec.shape[1], shards[1], shards[2])
    if spec.transpose:
        return Split(spec.shape[1], spec.shape[0], shards[0], shards[1])
    return Split(spec.shape[0], spec.shape[1], shards[1], shards[0])


def _stacked(spec: ParamSpec) -> bool:
    """Stacked MoE experts ``[E, in, out]``: quantized expert by expert, each an ``[out, in]`` weight."""
    return len(spec.shape) == 3 and spec.role == "expert"


def split_request(isq: str | None) -> tuple[str | None, dict[str, str]]:
    """A layer's request as ``(base type, {weight key: its own type})``: ``"Q8_0 experts_down=Q4K"`` ->
    ``("Q8_0", {"experts_down": "Q4K"})``; a plain type has no per-weight part."""
    if isq is None:
        return None, {}
    base, own = None, {}
    for part in str(isq).split():
        key, eq, value = part.partition("=")
        if eq:
            own[key] = value
        else:
            base = part
    return base, own


def layer_request(base: str | None, own: Mapping[str, str | None]) -> str | None:
    """The request string for a layer whose weights ``own`` have types of their own (None there: float)."""
    if not own:
        return base
    return " ".join([str(base if base is not None else "none"),
                     *(f"{k}={'none' if v is None else v}" for k, v in sorted(own.items()))])


def request_for(isq: str | None, key: str) -> str | None:
    """The type a layer's request asks for one of its weights: its own where a regex gave it one, else the base."""
    base, own = split_request(isq)
    return own.get(key, base)


def is_native(isq: str | None) -> bool:
    """Whether a type (or a layer's request, by its base type) asks for the checkpoint's stored types."""
    base = split_request(isq)[0]
    return base is not None and base.strip().lower() == NATIVE


def parse(isq: str | None) -> str | None:
    """A type name, ``native``, or None (``none``/``off``/``float`` -> None); unknown names are a UserError."""
    return NATIVE if is_native(isq) else parse_isq(isq)


def requested_type(spec: ParamSpec, isq: str | None, native_types: Mapping[str, str] | None,
                   explicit: bool = False) -> str | None:
    """The type ``isq`` asks for this weight (None: float); ``native`` asks the stored one. ``explicit``: a
    ``/regex/`` entry named this weight's type itself (it may then quantize a router)."""
    if len(spec.shape) != 2 and not _stacked(spec) or spec.role == "expert" and not _stacked(spec):
        return None  # norms, biases (gpt-oss's expert biases [E, out] too) stay float
    want = parse(isq)
    if want == NATIVE and native_types is not None:
        return native_types.get(spec.hf_name)
    if spec.role == "router" and want != NATIVE and not explicit:  # as llama.cpp's quantizer never touches
        return None  # ffn_gate_inp: a small tensor whose errors move every token's choice of experts
    return want


def tensor_type(key: str, spec: ParamSpec, isq: str | None, tp: int, unit_counts: Mapping[str, int],
                native_types: Mapping[str, str] | None = None, ep: int = 1) -> TensorType | None:
    """The decision for one weight at a ``tp``-way stage with ``ep`` (None: it stays float); ``isq`` is the request
    of the weight's layer or placement."""
    want = requested_type(spec, request_for(isq, key), native_types, explicit=key in split_request(isq)[1])
    if want is None:
        return None
    split = weight_split(spec, tp, unit_counts, ep)
    final = want if want == NATIVE else fitted_type(want, split.out, split.n, split.in_shards, split.out_shards)
    return TensorType(key, spec, want, final, split)


def layer_types(config: ModelConfig, layer: int, tp: int, isq: str | None,
                native_types: Mapping[str, str] | None = None, ep: int = 1) -> dict[str, TensorType]:
    """Every quantized weight of decoder layer ``layer`` on a ``tp``-way stage with ``ep``, by weight key."""
    counts = units(config)
    out = {}
    for key, spec in layer_param_specs(config, layer).items():
        t = tensor_type(key, spec, isq, tp, counts, native_types, ep)
        if t is not None:
            out[key] = t
    return out


def outer_requests(config: ModelConfig, embed_isq: str | None, head_isq: str | None,
                   global_isq: str | None) -> dict[str, str | None]:
    """The requested type of each outer placement's tensor (before parsing): the LM head keeps its precision
    unless a ``/regex/`` entry names a type or the checkpoint is native (its errors reach the logits directly, and
    llama.cpp likewise keeps ``output.weight`` above the layers' type); tied embeddings share the head's table,
    so both placements (the same tensor, loaded where each lives) take the head's type, else the embeddings'."""
    head = head_isq if head_isq is not None else (NATIVE if is_native(global_isq) else None)
    embed = embed_isq
    if config.tie_word_embeddings:
        embed = head if head is not None else embed
        head = embed
    return {"embed": embed, "final_norm": None, "lm_head": head}


def outer_spec(config: ModelConfig, key: str) -> tuple[str, ParamSpec]:
    """The weight key and spec behind an outer placement (the embedding table for a tied head)."""
    specs = outer_param_specs(config)
    name = {"embed": "embed_tokens", "final_norm": "final_norm", "lm_head": "lm_head"}[key]
    if name not in specs:
        name = "embed_tokens"
    return name, specs[name]


def outer_type(config: ModelConfig, key: str, isq: str | None, tp: int,
               native_types: Mapping[str, str] | None = None) -> TensorType | None:
    """The decision for an outer placement's tensor held on ``tp`` devices (``isq``: its requested type)."""
    name, spec = outer_spec(config, key)
    return tensor_type(name, spec, isq, tp, units(config), native_types)


def global_of(stages) -> str | None:
    """The global type a plan was made with, as far as its head's rule needs it: ``native`` when a layer is kept in
    its stored types (with a native checkpoint every layer is), else None."""
    return NATIVE if any(is_native(t) for s in stages for t in s.isq) else None


def assign_types(config: ModelConfig, stages, outer: Mapping, global_isq: str | None,
                 native_types: Mapping[str, str] | None = None) -> None:
    """Write every final type into ``stages[*].tensor_isq`` and the outer placements' ``tensor_isq``."""
    for s in stages:
        s.tensor_isq = [{k: t.final for k, t in layer_types(config, i, s.tp, s.isq[i - s.start],
                                                             native_types, s.ep).items()}
                        for i in range(s.start, s.end)]
    asked = outer_requests(config, outer["embed"].isq, outer["lm_head"].isq, global_isq)
    for key in OUTER_KEYS:
        place = outer[key]
        t = outer_type(config, key, asked[key], len(place.devices), native_types)
        place.tensor_isq = None if t is None else t.final


def ensure_types(device_map, config: ModelConfig, native_types: Mapping[str, str] | None = None) -> None:
    """Final types for a plan that lacks them (saved before the DeviceMap stored them: recomputed from its per-layer
    types and placements), then ``native`` placeholders resolved from ``native_types`` when given."""
    if any(s.tensor_isq is None for s in device_map.stages):
        outer = {k: getattr(device_map, k) for k in OUTER_KEYS}
        assign_types(config, device_map.stages, outer, global_of(device_map.stages), native_types)
    if native_types is not None:
        resolve_native(device_map, config, native_types)


def resolve_native(device_map, config: ModelConfig, native_types: Mapping[str, str]) -> None:
    """Replace the ``native`` placeholders of a plan made without the checkpoint's types by the stored types (after
    fallbacks); a tensor the checkpoint stores as float leaves the table."""
    counts = units(config)
    for s in device_map.stages:
        for i, types in zip(range(s.start, s.end), s.tensor_isq, strict=True):
            specs = layer_param_specs(config, i)
            for key in [k for k, t in types.items() if t == NATIVE]:
                t = tensor_type(key, specs[key], NATIVE, s.tp, counts, native_types, s.ep)
                if t is None:
                    del types[key]
                else:
                    types[key] = t.final
    for key in OUTER_KEYS:
        place = getattr(device_map, key)
        if place.tensor_isq == NATIVE:
            t = outer_type(config, key, NATIVE, len(place.devices), native_types)
            place.tensor_isq = None if t is None else t.final


def planned_types(device_map, config: ModelConfig) -> dict[str, list[TensorType]]:
    """What loading reads: per Hugging Face name, the plan's decision for each placement that holds the tensor (a
    tied embedding table twice when the head lives elsewhere), with the split the plan gave it and the type its
    layer or placement requested (``native``: the stored type, known to the loader)."""
    counts = units(config)
    out: dict[str, list[TensorType]] = {}
    for s in device_map.stages:
        for i, types in zip(range(s.start, s.end), s.tensor_isq, strict=True):
            specs = layer_param_specs(config, i)
            for key, final in types.items():
                spec = specs[key]
                want = parse(request_for(s.isq[i - s.start], key))
                out.setdefault(spec.hf_name, []).append(
                    TensorType(key, spec, want or final, final, weight_split(spec, s.tp, counts, s.ep)))
    asked = outer_requests(config, device_map.embed.isq, device_map.lm_head.isq, global_of(device_map.stages))
    for key in OUTER_KEYS:
        place = getattr(device_map, key)
        if place.tensor_isq is None:
            continue
        name, spec = outer_spec(config, key)
        want = parse(asked[key])
        out.setdefault(spec.hf_name, []).append(
            TensorType(name, spec, want or place.tensor_isq, place.tensor_isq,
                       weight_split(spec, len(place.devices), counts)))
    return out


def flat_types(config: ModelConfig, global_isq: str | None,
               native_types: Mapping[str, str] | None = None) -> dict[str, list[TensorType]]:
    """The decisions of a plan with one unsplit stage and no topology (what a checkpoint conversion stores)."""
    counts = units(config)
    out: dict[str, list[TensorType]] = {}
    for i in range(config.num_hidden_layers):
        for t in layer_types(config, i, 1, global_isq, native_types).values():
            out[t.spec.hf_name] = [t]
    asked = outer_requests(config, None, None, global_isq)
    for key in OUTER_KEYS:
        name, spec = outer_spec(config, key)
        t = tensor_type(name, spec, asked[key], 1, counts, native_types)
        if t is not None:
            out.setdefault(spec.hf_name, [t])
    return out


def weight_bytes(spec: ParamSpec, final: str | None, tp: int, unit_counts: Mapping[str, int], itemsize: int,
                 stored: Mapping[str, int] | None = None, ep: int = 1) -> int:
    """Bytes one device of a ``tp``-way stage holds of a parameter under its final type: the quantizers' own layout
    (short super-blocks and per-shard row scales included); a ``native`` placeholder its file size when known, else
    float; ``itemsize`` bytes per element when unquantized."""
    sizes = axis_sizes(spec.role, tp, ep)
    axes = logical_to_spec(spec.axes, RULES, spec.shape, sizes, name=spec.hf_name, units=unit_counts)
    shards = math.prod(sizes[a] if a else 1 for a in axes)
    if final == NATIVE and stored and spec.hf_name in stored:
        return stored[spec.hf_name] // shards
    if final is None or final == NATIVE:
        return spec.size * itemsize // shards
    split = weight_split(spec, tp, unit_counts, ep)
    stacked = spec.shape[0] if _stacked(spec) else 1
    return stacked * tensor_nbytes(final, (split.out, split.n), in_shards=split.in_shards) // shards


def isq_label(isq: str | None, types: Mapping[str, str] | None) -> str:
    """A layer's type for the layout table: the requested one, and where the final types differ the weights that
    fell back (``Q4K (wo, w_down: Q5_0)``); a native layer its stored types (``native (Q4_1)``)."""
    label = str(isq or "-")
    if not types:
        return label
    if is_native(isq):
        known = sorted({t for t in types.values() if t != NATIVE})
        return f"{label} ({'+'.join(known)})" if known else label
    by_type: dict[str, list[str]] = {}
    for key, final in types.items():
        try:
            want = parse(request_for(isq, key))
        except UserError:
            want = request_for(isq, key)
        if final != want:
            by_type.setdefault(final, []).append(key)
    if not by_type:
        return label
    parts = [", ".join(keys) + f": {final}" for final, keys in by_type.items()]
    return f"{label} ({'; '.join(parts)})"
