"""The plan as data: :class:`DeviceMap` (stages, where the outer weights live, memory, strategy and reason).

Pure data, no jax: it is made for hardware you may not have, saved with ``--save-plan`` and loaded with ``--plan``
(refused for another model: it carries the model's name and a fingerprint of its architecture). The engine builds
each stage's mesh with ``jax.make_mesh`` / ``mesh_utils.create_device_mesh`` over the device ids a stage names.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from jaxmap.config import ModelConfig, config_fingerprint
from jaxmap.errors import UserError
from jaxmap.planning.expert_parallel import check_plan as check_plan_ep
from jaxmap.planning.isq_types import ensure_types, isq_label, parse, split_request
from jaxmap.planning.memory import prefill_chunk

STRATEGIES = ("single", "tensor_parallel", "pipeline", "pipeline_x_tensor", "manual", "cpu", "offload")
MEMORY_KINDS = ("device", "host", "disk")
# Where a MoE layer's routed experts may live: on their devices' memory, in host memory streamed to the layer's
# device, on disk, or in host memory and computed by the host CPU (llama.cpp's --cpu-moe).
EXPERT_KINDS = ("device", "host", "disk", "cpu")
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Segment:
    """A maximal run of layers inside a stage with every setting equal: one compiled unit for the engine."""

    start: int
    end: int
    isq: str | None


@dataclasses.dataclass
class Stage:
    """Layers ``[start, end)`` on one device group, arranged as a mesh ``{"tp": n}``; ``{"tp": n, "ep": e}`` where
    the routed experts split over ``e`` groups of the same devices (:mod:`jaxmap.planning.expert_parallel`).

    ``isq`` is each layer's requested type; ``tensor_isq`` each layer's quantized weights with the type they really
    get at this stage's split, fallbacks included (``{"wq": "Q4K", "w_down": "Q5_0", ...}``; a weight missing is
    float), decided by :mod:`jaxmap.planning.isq_types`. None only in a plan saved before it was stored.
    """

    start: int
    end: int
    devices: list[str]
    device_ids: list[int]
    mesh: dict[str, int]
    memory_kind: str = "device"
    dtype: str = "float32"
    isq: list[str | None] = dataclasses.field(default_factory=list)
    tensor_isq: list[dict[str, str]] | None = None

    def __post_init__(self) -> None:
        if not self.isq:
            self.isq = [None] * (self.end - self.start)

    @property
    def tp(self) -> int:
        return self.mesh.get("tp", 1)

    @property
    def ep(self) -> int:
        """Expert-parallel ways for the routed experts (the same devices seen as ep x tp/ep for them; 1: none)."""
        return self.mesh.get("ep", 1)

    def segments(self) -> list[Segment]:
        out: list[Segment] = []
        for layer, isq in zip(range(self.start, self.end), self.isq, strict=False):
            if out and out[-1].isq == isq:
                out[-1] = Segment(out[-1].start, layer + 1, isq)
            else:
                out.append(Segment(layer, layer + 1, isq))
        return out


@dataclasses.dataclass
class Placement:
    """Where an outer weight (embeddings, final norm, LM head) lives; ``stage`` is None off the stages' devices."""

    devices: list[str]
    stage: int | None
    vocab_parallel: bool = False
    isq: str | None = None  # the type a /regex/ topology entry asks for it
    tensor: str = ""  # the weight's name in the model file (what a topology /regex/ key matches)
    tensor_isq: str | None = None  # the type its tensor gets there, after fallbacks (None: float)
    note: str = ""  # why it is there, when the planner chose it (embeddings in host memory, a tied head's copy)


@dataclasses.dataclass
class ExpertPlacement:
    """Where one MoE layer's routed experts live when apart from the rest of their layer (attention, norms, router
    and shared experts stay with the layer's stage).

    ``memory_kind``: ``device`` (held by ``devices``, another accelerator than the layer's), ``host`` (host
    memory, streamed to the layer's device), ``disk``, or ``cpu`` (host memory, computed by the CPU device in
    ``devices``: the hidden state goes there and back). ``decode`` / ``prefill`` say how each phase computes them
    (``cpu``: on the CPU device; ``stream``: their weights moved to the layer's device; ``device``: where they
    are), ``bytes`` their weights, ``source`` who put them there (``fit``, ``--cpu-moe``, ``--n-cpu-moe``, ``-ot
    REGEX=PLACE``), ``isq`` a type asked for them alone (``-ot``/topology)."""

    layer: int
    devices: list[str]
    memory_kind: str
    bytes: int = 0
    decode: str = "device"
    prefill: str = "device"
    source: str = "fit"
    isq: str | None = None


@dataclasses.dataclass
class DeviceMemory:
    """What one memory must hold under the plan, after sharding.

    ``kind`` is ``device`` (an accelerator, or a CPU device running layers), ``host`` (offloaded weights in pinned
    host memory) or ``disk`` (weights read per forward pass). On a device: resident weights, the KV cache of every
    layer it runs (streamed ones too), the activation peak of one prefill chunk x ``max_batch_size``, and the
    buffers of two streamed layers (double buffering) when it runs offloaded layers. ``capacity_bytes`` is what the
    plan may use (the allocator's limit less what is in use, or the ``--max-memory`` cap) and ``headroom_bytes``
    what it keeps free of that.
    """

    device: str
    weights_bytes: int
    kv_cache_bytes: int
    capacity_bytes: int | None = None
    activation_bytes: int = 0
    streaming_bytes: int = 0
    headroom_bytes: int = 0
    kind: str = "device"

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes + self.streaming_bytes

    @property
    def fits(self) -> bool:
        return self.capacity_bytes is None or self.total_bytes + self.headroom_bytes <= self.capacity_bytes


@dataclasses.dataclass
class DeviceMap:
    model: str
    fingerprint: str
    hardware: str
    platform: str
    num_layers: int
    stages: list[Stage]
    embed: Placement
    final_norm: Placement
    lm_head: Placement
    strategy: str
    reason: str
    memory: list[DeviceMemory] = dataclasses.field(default_factory=list)
    idle_devices: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    dtype: str = "float32"
    max_seq_len: int = 4096
    max_batch_size: int = 1
    prefill_chunk: int | None = None  # prompt tokens per prefill step; None (plans saved before it): the default
    from_topology: bool = False
    memory_notes: list[str] = dataclasses.field(default_factory=list)
    # MoE layers whose routed experts live apart from their layer; a layer not listed keeps them with it
    experts: list[ExpertPlacement] = dataclasses.field(default_factory=list)
    # the layer mode the plan was made to run with (tune's choice); None: the loader's own choice (auto)
    layer_mode: str | None = None

    # ---- queries ---------------------------------------------------------------------------------------------------
    def stage_of(self, layer: int) -> Stage:
        return next(s for s in self.stages if s.start <= layer < s.end)

    @property
    def chunk(self) -> int:
        """Prompt tokens per prefill step under this plan."""
        return prefill_chunk(self.max_seq_len, self.prefill_chunk)

    def experts_of(self, layer: int) -> ExpertPlacement | None:
        """The routed experts' placement of ``layer`` when apart from their layer, else None."""
        return next((e for e in self.experts if e.layer == layer), None)

    def layer_devices(self) -> list[list[str]]:
        return [list(s.devices) for s in self.stages for _ in range(s.start, s.end)]

    def check_model(self, config: ModelConfig) -> None:
        """Refuse a plan made for another model (a saved plan loaded with ``--plan``)."""
        if self.fingerprint != config_fingerprint(config) or self.num_layers != config.num_hidden_layers:
            raise UserError(f"the plan was made for model {self.model!r} (fingerprint {self.fingerprint}) but the "
                            f"model is {config.name or 'unnamed'!r} (fingerprint {config_fingerprint(config)}); "
                            "make a new plan for it")

    # ---- round trip ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, config: ModelConfig | None = None) -> DeviceMap:
        """A plan from its dict form; with ``config`` refuse one made for another model, and give a plan saved
        before the final ISQ types were stored its types (recomputed as the planner decides them)."""
        if not isinstance(raw, dict):
            raise UserError("a plan must be a mapping (as written by --save-plan)")
        try:
            fields = dict(raw)
            fields["stages"] = [Stage(**s) for s in raw["stages"]]
            for key in ("embed", "final_norm", "lm_head"):
                fields[key] = Placement(**raw[key])
            fields["memory"] = [DeviceMemory(**m) for m in raw.get("memory", [])]
            fields["experts"] = [ExpertPlacement(**e) for e in raw.get("experts", None) or []]
            out = cls(**fields)
        except (KeyError, TypeError) as exc:
            raise UserError(f"the plan is malformed ({exc}); write it with --save-plan") from None
        out._validate()
        if config is not None:
            out.check_model(config)
            check_plan_ep(config, out.stages)
            ensure_types(out, config)
        return out

    def _validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UserError(f"plan strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        expected = 0
        for s in self.stages:
            if s.start != expected or s.end <= s.start or len(s.isq) != s.end - s.start:
                raise UserError(f"plan stage {s.start}-{s.end} does not continue at layer {expected}")
            if s.tensor_isq is not None and (not isinstance(s.tensor_isq, list) or len(s.tensor_isq) != len(s.isq)
                                             or not all(isinstance(t, dict) for t in s.tensor_isq)):
                raise UserError(f"plan stage {s.start}-{s.end}: tensor_isq must hold one mapping per layer")
            if s.ep < 1 or s.tp % s.ep:
                raise UserError(f"plan stage {s.start}-{s.end}: ep={s.ep} must divide its tp={s.tp}")
            if s.memory_kind not in MEMORY_KINDS:
                raise UserError(f"plan stage {s.start}-{s.end}: memory_kind must be one of {', '.join(MEMORY_KINDS)}")
            expected = s.end
        if expected != self.num_layers:
            raise UserError(f"the plan's stages cover {expected} layers but the model has {self.num_layers}")
        seen: set[int] = set()
        for e in self.experts:
            if not 0 <= e.layer < self.num_layers or e.layer in seen:
                raise UserError(f"plan experts entry for layer {e.layer}: not a layer of the model, or listed twice")
            if e.memory_kind not in EXPERT_KINDS:
                raise UserError(f"plan experts of layer {e.layer}: memory_kind must be one of "
                                f"{', '.join(EXPERT_KINDS)}")
            seen.add(e.layer)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, source: str | Path, config: ModelConfig | None = None) -> DeviceMap:
        """Load a saved plan (path or text); with ``config`` refuse one made for another model."""
        text = source.read_text() if isinstance(source, Path) else source
        if isinstance(source, str) and "\n" not in source and Path(source).is_file():
            text = Path(source).read_text()
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise UserError(f"the plan is not valid YAML{f' (line {mark.line + 1})' if mark else ''}") from None
        return cls.from_dict(raw, config)

    # ---- other forms -----------------------------------------------------------------------------------------------
    def to_device_layers(self) -> str | None:
        """The equivalent ``-n`` string: single-device stages on distinct ordinals, then the rest on the host CPU."""
        host = "cpu[0]"
        if any(s.memory_kind != "device" for s in self.stages):
            return None  # -n cannot say "streamed from host memory / disk"
        stages = list(self.stages)
        while stages and stages[-1].devices == [host]:
            stages.pop()
        pairs, seen = [], set()
        for s in stages:
            if len(s.devices) != 1:
                return None
            platform, _, rest = s.devices[0].partition("[")
            ordinal = int(rest.rstrip("]"))
            if platform != self.platform or ordinal in seen:
                return None
            seen.add(ordinal)
            pairs.append(f"{ordinal}:{s.end - s.start}")
        return ";".join(pairs) if pairs else "0"

    def to_topology(self) -> str:
        """Topology YAML text (reference format) for this plan; tensor-parallel stages get a comment, no device."""
        lines = [f"# topology for {self.model} on {self.hardware} (from a jaxmap plan)"]
        for s in self.stages:
            for seg in s.segments():
                body = []
                if len(s.devices) == 1:
                    dev = s.devices[0]
                    body.append(f"  device: {'cpu' if dev == 'cpu[0]' and self.platform != 'cpu' else dev}")
                base, own = split_request(seg.isq)
                if base is not None:
                    body.append(f"  isq: {base}")
                if own:  # a range types all its weights alike: the plan's per-weight types came from /regex/ entries
                    lines.append(f"# {seg.start}-{seg.end}: weights with types of their own (write /regex/ entries "
                                 f"for them): {', '.join(f'{k} {v}' for k, v in own.items())}")
                if len(s.devices) > 1:
                    lines.append(f"# {seg.start}-{seg.end}: tensor parallel over {', '.join(s.devices)} "
                                 "(a topology names one device per layer)")
                if s.memory_kind != "device":
                    lines.append(f"# {seg.start}-{seg.end}: weights streamed from {s.memory_kind} (the automatic "
                                 "fill decides this; a topology names devices only)")
                lines.append(f"{seg.start}-{seg.end}:" + ("" if body else " {}"))
                lines += body
        for place in (self.embed, self.final_norm, self.lm_head):
            key = f"/{re.escape(place.tensor.removesuffix('.weight'))}/"
            if place.stage is None and len(place.devices) == 1 and place.tensor:
                lines += [f"'{key}':", f"  device: {place.devices[0]}"]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        """Machine-readable form: one ``layers`` entry per decoder layer, in order."""
        layers = [{"layer": i, "stage": k, "devices": list(s.devices), "memory_kind": s.memory_kind, "dtype": s.dtype,
                   "isq": s.isq[i - s.start],
                   "tensor_isq": dict(s.tensor_isq[i - s.start]) if s.tensor_isq is not None else None,
                   "experts": _experts_json(self.experts_of(i))}
                  for k, s in enumerate(self.stages) for i in range(s.start, s.end)]
        out = self.to_dict()
        out["layers"] = layers
        out["device_layers"] = self.to_device_layers()
        return out

    def render_table(self) -> str:
        """The text logged at INFO at startup: stages, outer weights, memory per device, strategy and reason."""
        head = (f"jaxmap plan: {self.model} on {self.hardware} ({self.dtype}, max_seq_len {self.max_seq_len}, "
                f"max_batch_size {self.max_batch_size}, prefill chunk {self.chunk})")
        rows = [("layers", "devices", "mesh", "memory", "dtype", "isq")]
        for s in self.stages:
            mesh = " x ".join(f"{k}={v}" for k, v in s.mesh.items() if k != "ep") + (f" ep={s.ep}" if s.ep > 1 else "")
            for start, end, isq in _isq_runs(s):
                rows.append((f"{start}-{end - 1}", ",".join(s.devices), mesh, s.memory_kind, s.dtype, isq))
        out = [head, *_columns(rows)]
        for label, place in (("embeddings", self.embed), ("final norm", self.final_norm), ("lm head", self.lm_head)):
            where = f"stage {place.stage}" if place.stage is not None else "off-stage"
            split = ", vocab-parallel" if place.vocab_parallel else ""
            note = f"; {place.note}" if place.note else ""
            out.append(f"{label}: {','.join(place.devices)} ({where}{split}{_outer_isq(place)}{note})")
        mem = [("memory", "weights", "kv cache", "activations", "streaming", "total", "headroom", "capacity")]
        for m in self.memory:
            cap = format_bytes(m.capacity_bytes) if m.capacity_bytes else "-"
            name = m.device if m.kind == "device" else f"{m.kind} ({m.device})"
            mem.append((name, format_bytes(m.weights_bytes), format_bytes(m.kv_cache_bytes),
                        format_bytes(m.activation_bytes), format_bytes(m.streaming_bytes),
                        format_bytes(m.total_bytes), format_bytes(m.headroom_bytes), cap))
        out += _columns(mem)
        out += [f"memory: {n}" for n in self.memory_notes]
        for line in self.expert_lines():
            out.append(f"experts: {line}")
        out.append(f"strategy: {self.strategy}: {self.reason}")
        if self.idle_devices:
            out.append(f"idle: {', '.join(self.idle_devices)}")
        out += [f"warning: {w}" for w in self.warnings]
        if self.from_topology:
            out.append("layer devices (topology):")
            out += [f"  layer {i}: {','.join(d)}" for i, d in enumerate(self.layer_devices())]
        return "\n".join(out)


    def expert_lines(self) -> list[str]:
        """Routed experts apart from their layers, one line per run of layers placed alike: ``layers 30-47: host
        memory, 32.10 GiB; decode on cpu[0], prefill streamed to cuda[0] (fit)``."""
        runs: list[tuple[int, int, ExpertPlacement, int]] = []
        for e in sorted(self.experts, key=lambda e: e.layer):
            key = (e.devices, e.memory_kind, e.decode, e.prefill, e.source, e.isq)
            last = runs[-1] if runs else None
            if last is not None and last[1] == e.layer and (last[2].devices, last[2].memory_kind, last[2].decode,
                                                          last[2].prefill, last[2].source, last[2].isq) == key:
                runs[-1] = (last[0], e.layer + 1, last[2], last[3] + e.bytes)
            else:
                runs.append((e.layer, e.layer + 1, e, e.bytes))
        out = []
        for start, end, e, total in runs:
            where = {"device": f"on {','.join(e.devices)}", "host": "in host memory", "disk": "on disk",
                     "cpu": f"in host memory, computed on {','.join(e.devices)}"}[e.memory_kind]
            home = ",".join(self.stage_of(start).devices)
            phases = "; ".join(f"{phase} {_phase(how, e, home)}" for phase, how in (("decode", e.decode),
                                                                                     ("prefill", e.prefill)))
            isq = f", isq {e.isq}" if e.isq else ""
            layers = f"layer {start}" if end - start == 1 else f"layers {start}-{end - 1}"
            out.append(f"{layers}: {where}, {format_bytes(total)}{isq}; {phases} ({e.source})")
        return out


def _phase(how: str, e: ExpertPlacement, home: str) -> str:
    return {"cpu": f"on {','.join(e.devices)}", "stream": f"streamed to {home}",
            "device": f"on {','.join(e.devices)}"}.get(how, how)


def _experts_json(e: ExpertPlacement | None) -> dict[str, Any] | None:
    return None if e is None else dataclasses.asdict(e)


def _isq_runs(stage: Stage) -> list[tuple[int, int, str]]:
    """Consecutive layers of a stage with the same type label (requested type and fallbacks)."""
    out: list[tuple[int, int, str]] = []
    for i, isq in zip(range(stage.start, stage.end), stage.isq, strict=True):
        types = stage.tensor_isq[i - stage.start] if stage.tensor_isq is not None else None
        label = isq_label(isq, types)
        if out and out[-1][2] == label:
            out[-1] = (out[-1][0], i + 1, label)
        else:
            out.append((i, i + 1, label))
    return out


def _outer_isq(place: Placement) -> str:
    """``, isq Q8_0`` for a quantized outer weight (and the type asked when a fallback replaced it)."""
    if place.tensor_isq is None:
        return ""
    try:
        asked = parse(place.isq)
    except UserError:
        asked = place.isq
    fell = f", {place.isq} requested" if asked not in (None, "native", place.tensor_isq) else ""
    return f", isq {place.tensor_isq}{fell}"


def format_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 100 else f"{n / (1 << 20):.2f} MiB"


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
