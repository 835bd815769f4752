"""The user's wish, parsed and checked: ``-n`` device layers, a topology YAML, ``--tp/--pp/--devices``, ``--isq``.

Semantics follow mistral.rs (``/work/shared/reference``): a topology range ``start-end`` covers ``[start, end)``;
where ranges overlap the one with the higher end wins, and at equal ends the one written later; the winner replaces
the whole entry (device and isq). A covered layer takes its winner's ``isq`` (none when the winner has none), an
uncovered layer the global ``--isq``. ``/regex/`` keys match full Hugging Face weight names; the last match wins.
Checks that need the model or the hardware (a layer past the last one, an ordinal that does not exist) happen in the
planner; everything else fails here with one line.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxmap.errors import UserError
from jaxmap.planning.memory import parse_max_memory
from jaxmap.quant.types import NATIVE, QTYPES, parse_isq

DEVICE_PATTERN = re.compile(r"^(cpu|(cpu|cuda|rocm|metal|tpu)\[(\d+)\])$")
_RANGE_KEY = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_LAYER_KEY = re.compile(r"^\s*(\d+)\s*$")
_ENTRY_KEYS = ("isq", "device")


# ---- -ot / --override-tensor (llama.cpp) ---------------------------------------------------------------------

_LLAMACPP_BUFFER = re.compile(r"^(CUDA|ROCm|Vulkan|SYCL|Metal)(\d*)$", re.IGNORECASE)
PLACES = ("cpu", "host", "disk")


@dataclasses.dataclass(frozen=True)
class TensorOverride:
    """One ``-ot REGEX=PLACE``: ``place`` is ``cpu``, ``host``, ``disk`` or a device name (``cuda[1]``)."""

    pattern: str
    place: str
    text: str  # as written, for messages and the plan's "source"


def parse_place(text: str, what: str) -> str:
    """``cpu``/``CPU`` -> cpu, ``host``, ``disk``, ``cuda[1]``, llama.cpp's buffer names ``CUDA1`` -> cuda[1]."""
    place = text.strip()
    if place.lower() in PLACES:
        return place.lower()
    if DEVICE_PATTERN.match(place.lower()):
        return place.lower()
    m = _LLAMACPP_BUFFER.match(place)
    if m:
        platform = {"cuda": "cuda", "rocm": "rocm", "metal": "metal"}.get(m.group(1).lower())
        if platform is not None:
            return f"{platform}[{m.group(2) or 0}]"
    raise UserError(f"{what}: unknown place {place!r}; write cpu (held and computed on the CPU), host (host memory, "
                    "streamed to the accelerator), disk, a device such as cuda[1], or llama.cpp's CPU / CUDA0")


def parse_overrides(values: str | Sequence[str] | None) -> list[TensorOverride]:
    """``-ot`` values (repeatable, each maybe comma-separated, as llama.cpp) in order: the first match wins."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out = []
    for value in values:
        for part in str(value).split(","):
            if not part.strip():
                continue
            pattern, sep, place = part.rpartition("=")
            if not sep or not pattern:
                raise UserError(f"-ot {part!r} is not REGEX=PLACE (e.g. -ot 'ffn_.*_exps=CPU')")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UserError(f"-ot {part!r}: {pattern!r} is not a regular expression ({exc})") from None
            out.append(TensorOverride(pattern, parse_place(place, f"-ot {part!r}"), part.strip()))
    return out


# ---- -n / --device-layers --------------------------------------------------------------------------------------

def parse_device_layers(spec: str | int | Sequence[str]) -> list[tuple[int | None, int]]:
    """``"16"`` -> ``[(None, 16)]`` (ordinal 0 of the default platform); ``"0:16;1:14"`` -> ``[(0, 16), (1, 14)]``.

    The Python API's list form ``["0:16", "1:14"]`` is accepted too.
    """
    if isinstance(spec, bool):
        raise UserError(f"-n expects a layer count or ORD:NUM;..., got {spec!r}")
    if isinstance(spec, int):
        spec = str(spec)
    parts = spec.split(";") if isinstance(spec, str) else [str(p) for p in spec]
    if not parts or (len(parts) == 1 and not parts[0].strip()):
        raise UserError("-n is empty; expected a layer count (16) or ORD:NUM;... (0:16;1:14)")
    out: list[tuple[int | None, int]] = []
    for raw in parts:
        part = raw.strip()
        if not part:
            raise UserError(f"-n {_show(spec)}: empty part; expected ORD:NUM;ORD:NUM")
        if ":" not in part:
            if len(parts) > 1:
                raise UserError(f"-n {_show(spec)}: {part!r} lacks an ordinal; with several parts write ORD:NUM")
            out.append((None, _count(part, spec, "layer count")))
            continue
        ordinal_text, _, count_text = part.partition(":")
        ordinal = _count(ordinal_text, spec, "ordinal")
        if any(o == ordinal for o, _ in out):
            raise UserError(f"-n {_show(spec)}: ordinal {ordinal} is given twice")
        out.append((ordinal, _count(count_text, spec, "layer count")))
    return out


def _count(text: str, spec: Any, what: str) -> int:
    text = text.strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        raise UserError(f"-n {_show(spec)}: {what} {text!r} is not a whole number")
    value = int(text)
    if value < 0:
        raise UserError(f"-n {_show(spec)}: {what} {value} is negative")
    return value


def _show(spec: Any) -> str:
    return repr(spec if isinstance(spec, str) else ";".join(str(p) for p in spec))


def format_device_layers(pairs: Sequence[tuple[int | None, int]]) -> str:
    return ";".join(str(n) if o is None else f"{o}:{n}" for o, n in pairs)


# ---- topology ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TopologyEntry:
    """One top-level entry: a layer range ``[start, end)`` or a ``/regex/`` over weight names."""

    key: str
    index: int
    line: int | None
    isq: str | None = None
    device: str | None = None
    start: int | None = None
    end: int | None = None
    pattern: str | None = None

    @property
    def where(self) -> str:
        return f"{self.key!r} (line {self.line})" if self.line is not None else repr(self.key)


@dataclasses.dataclass(frozen=True)
class Override:
    """Layers a range covers but lost to a later-ending (or same-ending, later-written) range."""

    loser: TopologyEntry
    winner: TopologyEntry
    layers: tuple[int, ...]

    def message(self) -> str:
        span = _span(self.layers)
        why = "ends at the same layer and is written later" if self.loser.end == self.winner.end else "ends later"
        return f"topology: range {self.loser.where} loses layer(s) {span} to range {self.winner.where}, which {why}"


def _span(layers: Sequence[int]) -> str:
    runs, start = [], layers[0]
    for a, b in zip(layers, [*layers[1:], None], strict=True):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(runs)


@dataclasses.dataclass(frozen=True)
class Topology:
    """A parsed topology: range entries and regex entries in the order written."""

    entries: tuple[TopologyEntry, ...]
    source: str = "topology"

    def with_isq(self, isq: str | None) -> Topology:
        """The same devices with every entry's ``isq`` replaced (a pre-quantized checkpoint keeps its own types)."""
        return dataclasses.replace(self, entries=tuple(dataclasses.replace(e, isq=isq) for e in self.entries))

    @property
    def ranges(self) -> list[TopologyEntry]:
        return [e for e in self.entries if e.pattern is None]

    @property
    def patterns(self) -> list[TopologyEntry]:
        return [e for e in self.entries if e.pattern is not None]

    def winner(self, layer: int) -> TopologyEntry | None:
        """The range that decides ``layer``: highest end, then written last."""
        covering = [e for e in self.ranges if e.start <= layer < e.end]  # type: ignore[operator]
        return max(covering, key=lambda e: (e.end, e.index), default=None)

    def layer_isq(self, layer: int, global_isq: str | None) -> str | None:
        win = self.winner(layer)
        return global_isq if win is None else win.isq

    def layer_device(self, layer: int) -> str | None:
        win = self.winner(layer)
        return None if win is None else win.device

    def match_for_name(self, name: str) -> TopologyEntry | None:
        """The last ``/regex/`` entry that matches a full Hugging Face weight name."""
        return next((e for e in reversed(self.patterns) if re.search(e.pattern, name)), None)  # type: ignore[arg-type]

    def overrides(self) -> list[Override]:
        """Which ranges lost which layers to which winner (the planner logs one warning each)."""
        lost: dict[tuple[int, int], list[int]] = {}
        for layer in range(max((e.end for e in self.ranges), default=0)):  # type: ignore[type-var]
            win = self.winner(layer)
            for e in self.ranges:
                if win is not None and e is not win and e.start <= layer < e.end:  # type: ignore[operator]
                    lost.setdefault((e.index, win.index), []).append(layer)
        by_index = {e.index: e for e in self.entries}
        return [Override(by_index[lo], by_index[wi], tuple(ls)) for (lo, wi), ls in sorted(lost.items())]

    def check_layers(self, num_layers: int) -> None:
        """Refuse a range past the model's last layer (the reference silently grows; we say so)."""
        for e in self.ranges:
            if e.end > num_layers:  # type: ignore[operator]
                raise UserError(f"{self.source}: {e.where} reaches layer {e.end - 1} but the model's last layer is "
                                f"{num_layers - 1} ({num_layers} layers)")

    # ---- parsing ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, source: str | Path | Mapping[Any, Any]) -> Topology:
        """Parse a path, YAML text or an already-loaded mapping."""
        if isinstance(source, Mapping):
            items = [(str(k), None, v) for k, v in source.items()]
            return cls._from_items(items, "topology")
        text, name = _read(source)
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "parse error"
            raise UserError(f"{name} is not valid YAML{where}: {problem}") from None
        if node is None:
            return cls((), name)
        if not isinstance(node, yaml.MappingNode):
            raise UserError(f"{name} must be a mapping of layer ranges (START-END:) to entries, "
                            f"found a {_kind(node)} at line {node.start_mark.line + 1}")
        items = []
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise UserError(f"{name}: the key at line {line} must be START-END, a layer number or /regex/")
            items.append((str(key_node.value), line, _entry_value(value_node, name, line)))
        return cls._from_items(items, name)

    @classmethod
    def _from_items(cls, items: list[tuple[str, int | None, Any]], name: str) -> Topology:
        entries = []
        seen: set[str] = set()
        for index, (key, line, value) in enumerate(items):
            where = f"{key!r} (line {line})" if line is not None else repr(key)
            if key in seen:
                raise UserError(f"{name}: key {where} appears twice")
            seen.add(key)
            entries.append(_entry(key, index, line, value, name, where))
        return cls(tuple(entries), name)


def _read(source: str | Path) -> tuple[str, str]:
    looks_like_path = isinstance(source, Path) or ("\n" not in source and source.strip().endswith((".yml", ".yaml")))
    if looks_like_path:
        path = Path(source)
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError:
            raise UserError(f"cannot read topology {path}: it is not UTF-8 text") from None
        except OSError as exc:
            raise UserError(f"cannot read topology {path}: {exc.strerror}") from None
    return str(source), "topology"


def _kind(node: yaml.Node) -> str:
    return {yaml.SequenceNode: "list", yaml.ScalarNode: "scalar"}.get(type(node), "node")


def _entry_value(node: yaml.Node, name: str, line: int) -> dict[str, Any] | None:
    """An entry's mapping as plain strings (values are scalars; a bare ``0-8:`` is an empty entry)."""
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return None
    if not isinstance(node, yaml.MappingNode):
        raise UserError(f"{name}: the entry at line {line} must be a mapping with isq and/or device")
    out: dict[str, Any] = {}
    for k, v in node.value:
        if not isinstance(v, yaml.ScalarNode):
            raise UserError(f"{name}: {k.value!r} at line {k.start_mark.line + 1} must be a single value")
        out[str(k.value)] = None if v.tag == "tag:yaml.org,2002:null" else str(v.value)
    return out


def _entry(key: str, index: int, line: int | None, value: Any, name: str, where: str) -> TopologyEntry:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise UserError(f"{name}: entry {where} must be a mapping with isq and/or device")
    unknown = [k for k in value if k not in _ENTRY_KEYS]
    if unknown:
        raise UserError(f"{name}: entry {where} has unknown key {str(unknown[0])!r}; allowed: isq, device")
    isq = None if value.get("isq") is None else str(value["isq"])
    if isq is not None and isq.strip().lower() != NATIVE:
        try:
            parse_isq(isq)
        except UserError:
            raise UserError(f"{name}: entry {where} has unknown isq type {isq!r}; known types: "
                            f"{', '.join(QTYPES)} (or none)") from None
    device = None if value.get("device") is None else str(value["device"]).strip()
    stripped = key.strip()
    regex = len(stripped) >= 2 and stripped.startswith("/") and stripped.endswith("/")
    # host and disk: places for routed expert tensors, which a /regex/ entry may name (jaxmap.planning.experts)
    if device is not None and not DEVICE_PATTERN.match(device) and not (regex and device in ("host", "disk")):
        raise UserError(f"{name}: entry {where} has unknown device {device!r}; "
                        "use cpu, cpu[N], cuda[N], rocm[N], metal[N] or tpu[N] (and host or disk in a /regex/ "
                        "entry for routed experts)")
    if len(stripped) >= 2 and stripped.startswith("/") and stripped.endswith("/"):
        pattern = stripped[1:-1]
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserError(f"{name}: invalid regex in key {where}: {exc}") from None
        return TopologyEntry(key, index, line, isq, device, pattern=pattern)
    m = _RANGE_KEY.match(key)
    if m:
        start, end = int(m.group(1)), int(m.group(2))
        if start >= end:
            raise UserError(f"{name}: range {where} must have start < end (end is exclusive)")
    elif _LAYER_KEY.match(key):
        start = int(key)
        end = start + 1
    else:
        raise UserError(f"{name}: key {where} is not START-END, a layer number or /regex/")
    return TopologyEntry(key, index, line, isq, device, start=start, end=end)


# ---- the wish ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Wish:
    """Everything the user asked for about placement; ``None`` means "decide for me"."""

    tp: int | None = None
    pp: int | None = None
    ep: int | None = None  # --ep: expert-parallel ways for MoE layers (jaxmap.planning.expert_parallel)
    devices: list[int] | None = None
    device_layers: list[tuple[int | None, int]] | None = None
    topology: Topology | None = None
    isq: str | None = None
    max_memory: dict[str, int] | None = None  # --max-memory, parsed (jaxmap.planning.memory.parse_max_memory)
    auto: bool = True  # False: --no-auto, keep the layout even where it does not fit
    allow_disk: bool = True  # False: --no-disk
    # llama.cpp's expert flags (jaxmap.planning.experts): -ot REGEX=PLACE entries in order, --cpu-moe, --n-cpu-moe N
    overrides: list[Any] = dataclasses.field(default_factory=list)
    cpu_moe: bool = False
    n_cpu_moe: int | None = None

    def __post_init__(self) -> None:
        for flag, value in (("--tp", self.tp), ("--pp", self.pp), ("--ep", self.ep)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise UserError(f"{flag} must be a positive integer, got {value!r}")
        if self.devices is not None:
            if not self.devices or any(not isinstance(o, int) or o < 0 for o in self.devices):
                raise UserError(f"--devices must list device ordinals (0,2), got {self.devices!r}")
            if len(set(self.devices)) != len(self.devices):
                raise UserError(f"--devices lists an ordinal twice: {','.join(map(str, self.devices))}")
        if self.device_layers is not None and (self.tp or self.pp or self.devices or (self.ep or 1) > 1):
            raise UserError("-n/--device-layers places layers by hand; it cannot be combined with --tp, --pp, --ep "
                            "or --devices")

    @property
    def is_automatic(self) -> bool:
        return (self.device_layers is None and self.tp is None and self.pp is None and self.ep is None
                and self.devices is None)


def parse_devices(text: str) -> list[int]:
    """``"0,2"`` -> ``[0, 2]`` for ``--devices``."""
    parts = [p.strip() for p in text.split(",")]
    if not all(re.fullmatch(r"\d+", p) for p in parts):
        raise UserError(f"--devices expects comma-separated ordinals like 0,2, got {text!r}")
    return [int(p) for p in parts]


def make_wish(
    tp: int | None = None,
    pp: int | None = None,
    devices: str | Sequence[int] | None = None,
    device_layers: str | int | Sequence[str] | None = None,
    topology: str | Path | Mapping[Any, Any] | Topology | None = None,
    isq: str | None = None,
    max_memory: str | Mapping[str, Any] | None = None,
    auto: bool = True,
    allow_disk: bool = True,
    override_tensor: str | Sequence[str] | None = None,
    cpu_moe: bool = False,
    n_cpu_moe: int | None = None,
    ep: int | None = None,
) -> Wish:
    """A :class:`Wish` from the forms the CLI and the Python API take (``"0,2"`` or ``[0, 2]``, ``"0:16;1:14"`` or
    ``["0:16", "1:14"]``, a topology path, YAML text or dict)."""
    if isinstance(devices, str):
        devices = parse_devices(devices)
    if topology is not None and not isinstance(topology, Topology):
        topology = Topology.from_yaml(topology)
    return Wish(tp=tp, pp=pp, ep=ep, devices=list(devices) if devices is not None else None,
                device_layers=parse_device_layers(device_layers) if device_layers is not None else None,
                topology=topology, isq=isq, max_memory=parse_max_memory(max_memory), auto=auto,
                allow_disk=allow_disk, overrides=parse_overrides(override_tensor), cpu_moe=cpu_moe,
                n_cpu_moe=n_cpu_moe)
