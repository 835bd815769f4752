"""In-situ quantization while loading: which type each weight gets, fallbacks, GGUF-native repacking, the report.

Rules (the README's ISQ section says the same):

- ``isq=TYPE`` / ``--isq TYPE`` quantizes every decoder-layer projection and the LM head (for tied embeddings the
  shared table, whose lookup then dequantizes the gathered rows); a topology range's ``isq`` overrides it for its
  layers, a ``/regex/`` entry's for the embeddings or head. Norms and biases stay float.
- A GGUF loaded with neither ``isq`` nor ``dtype`` keeps its stored types ("native"): Q4_0, Q4_1, Q5_0, Q5_1,
  Q8_0, Q4_K and Q6_K blocks are repacked as integers, never through float32; other stored types are dequantized.
  ``isq="none"`` (or an explicit ``dtype``) dequantizes everything to the compute dtype. A quantized jaxmap
  checkpoint (``python -m jaxmap.convert --isq``) follows the same rules: its stored types are native, restored
  as they are, straight into their shardings; another ``isq`` requantizes its dequantized weights (with a warning).
- A type that does not fit a tensor's per-shard input dimension (:func:`jaxmap.quant.fits`: its block must divide
  it, except that a K type keeps a short last super-block on an unsplit input that is a whole number of its
  sub-blocks), or whose packed rows do not divide its per-shard output rows, falls back along
  :data:`jaxmap.quant.FALLBACK` (Q4K -> Q5_0 -> INT8, ...), with a warning that says why.
- Those decisions are the planner's (:mod:`jaxmap.planning.isq_types`): the DeviceMap stores each weight's final
  type and the Quantizer reads it (:func:`type_function`), checking it against the weight's real split (a split the
  plan did not decide is an error naming the tensor) and keeping a checkpoint's stored blocks where the final type
  is the stored one.
- ``imatrix=`` / ``--imatrix FILE`` (:mod:`jaxmap.imatrix`): every weight quantized from float with a type in
  :data:`jaxmap.quant.IMPORTANCE_TYPES` has its block fits weighted by its inputs' importance; weights kept in their
  native type are not requantized, so it does not touch them (a warning says when it weighted nothing).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import jax
import numpy as np

from jaxmap import quant
from jaxmap.errors import UserError
from jaxmap.families import ParamSpec
from jaxmap.planning.isq_types import TensorType, flat_types, planned_types
from jaxmap.quant.qtensor import is_stack, leaf_shardings, split_of
from jaxmap.quant.types import NATIVE

log = logging.getLogger(__name__)

_LAYER_PREFIX = re.compile(r"^.*?\.\d+\.")  # a per-layer name up to its layer number, whatever the family


def parse(name: str | None) -> str | None:
    """``--isq`` / ``isq=`` value: a type, ``native`` or None (``none`` -> None)."""
    if name is not None and str(name).strip().lower() == NATIVE:
        return NATIVE
    return quant.parse_isq(name)


def is_gguf(source) -> bool:
    return hasattr(source, "raw") and hasattr(source, "stored_type")


def is_prequantized(source) -> bool:
    """A source whose tensors may be stored quantized: a GGUF file, or a jaxmap checkpoint (``stored_qtype``)."""
    return is_gguf(source) or hasattr(source, "stored_qtype")


def default_isq(source, isq: str | None, dtype: str | None) -> str | None:
    """What an unset ``isq`` means: native types for a GGUF (or quantized checkpoint) loaded without a dtype, else
    float."""
    if isq is not None:
        return None if str(isq).strip().lower() in ("none", "off", "float") else parse(isq)
    if dtype is None and is_prequantized(source) and any(native_qtype(source, n) for n in source.names()):
        return NATIVE
    return None


def _native_type(source, hf_name: str) -> str | None:
    try:
        stored = source.stored_type(hf_name)
    except KeyError:
        return None
    return stored if stored in quant.GGUF_NATIVE else None


def native_bytes(source) -> dict[str, int]:
    """Bytes in the file of every tensor kept in its native quantized type (from the GGUF's tensor headers)."""
    if hasattr(source, "native_nbytes"):  # a Hugging Face folder's MXFP4 experts
        return source.native_nbytes()
    if not is_gguf(source):
        return {}  # other pre-quantized sources (jaxmap checkpoints) are planned at float size: conservative
    return {n: int(source.stored_nbytes(n)) for n in source.names() if _native_type(source, n)}


def native_qtype(source, hf_name: str) -> str | None:
    """The jaxmap type a tensor is stored in and can be loaded as without requantizing (None: stored as float, or in
    a type with no native form, which is dequantized)."""
    if hasattr(source, "stored_qtype"):
        try:
            return source.stored_qtype(hf_name)
        except KeyError:
            return None
    if not is_gguf(source):
        return None
    native = _native_type(source, hf_name)
    return quant.gguf_to_jaxmap_type(native) if native is not None else None


def check_types(isq: str | None, topology_types: list[str | None]) -> None:
    for t in [isq, *topology_types]:
        if t is not None:
            parse(t)


def native_types(source) -> dict[str, str]:
    """The jaxmap type of every tensor the source stores in a type it can be loaded as without requantizing (what
    the planner's ``native_types`` takes)."""
    if not is_prequantized(source):
        return {}
    return {n: t for n in source.names() if (t := native_qtype(source, n)) is not None}


class Quantizer:
    """Loads one 2-D weight as a placed :class:`~jaxmap.quant.QTensor` (or None: keep it float).

    ``type_for(spec, in_shards, out_shards)`` gives the plan's decision for a weight placed with that split:
    ``(requested, final)`` (None: float), from :func:`type_function` over a DeviceMap's stored types. The final type
    is the plan's; the Quantizer only checks it against the real split and reads or quantizes accordingly.
    """

    def __init__(self, source, type_for: Callable[[ParamSpec, int, int], tuple[str, str] | None], imatrix=None):
        self.source = source
        self.type_for = type_for
        self.imatrix = imatrix  # jaxmap.imatrix.Imatrix or None: weights each requantized block's fit
        self.weighted: list[str] = []  # weights quantized with their importance
        self.unweighted: list[str] = []  # weights quantized from float without one (not in the imatrix, or a type
        # that takes none)
        self.fallbacks: dict[tuple[str, str, str, str], list[str]] = {}  # (kind, wanted, got, why) -> names
        self.requantized: set[str] = set()
        self.bytes: dict[str, tuple[int, int, str]] = {}  # hf name -> (stored bytes, float32 bytes, type)

    def load(self, spec: ParamSpec, sharding, dtype: np.dtype):
        qtype, keep = self.decide(spec, sharding)
        if qtype is None:
            return None
        return self.place(spec, sharding, qtype, keep)

    def decide(self, spec: ParamSpec, sharding) -> tuple[str | None, bool]:
        """The type this weight gets placed with ``sharding`` (None: float), as the plan says, and whether the
        source's stored blocks are kept as they are (the plan's type is the stored one); records fallbacks and
        requantizations."""
        if len(spec.shape) != 2 and not is_stack(spec):
            return None, False
        out, n, _, _, in_shards, out_shards = split_of(spec, sharding)
        planned = self.type_for(spec, in_shards, out_shards)
        if planned is None:
            return None, False
        want, qtype = planned
        native = native_qtype(self.source, spec.hf_name) if is_prequantized(self.source) else None
        if qtype == NATIVE:
            raise UserError(f"the plan leaves the type of {spec.hf_name} to the checkpoint ('native') but was not "
                            "given its stored types; load it through jaxmap.load, which reads them")
        if want == NATIVE:
            want = native if native is not None else qtype  # the plan's native type, stored as float here
        elif native is not None and want != native:
            self.requantized.add(self.source.stored_type(spec.hf_name))
        self._check(want, qtype, spec, out, n, in_shards, out_shards)
        return qtype, native is not None and qtype == native
    def place(self, spec: ParamSpec, sharding, qtype: str, keep: bool):
        """Read (``keep``: the stored blocks, else the float weights, then quantized to ``qtype``) and place."""
        qt = self.host(spec, sharding, qtype, keep)
        targets = leaf_shardings(spec, sharding, qt)
        if sharding.memory_kind is not None:  # host-tier layers: every leaf in the same memory kind (pinned_host)
            targets = jax.tree.map(lambda t: t.with_memory_kind(sharding.memory_kind), targets)
        return jax.device_put(qt, targets)

    def host(self, spec: ParamSpec, sharding, qtype: str, keep: bool):
        """The weight as a host QTensor (numpy leaves) of ``qtype`` laid out for ``sharding``'s split: what
        :meth:`place` places, and what the disk tier stores."""
        out, n, _, _, in_shards, _ = split_of(spec, sharding)
        if is_stack(spec):
            qt = self._stack(spec, qtype, keep, out, n, in_shards)
        elif keep and is_gguf(self.source):
            raw, _ = self.source.raw(spec.hf_name)
            qt = quant.from_gguf(raw, quant.QTYPES[qtype].gguf, (out, n))
        elif keep:  # a quantized jaxmap checkpoint, read on the host (loading restores it placed: read_placed)
            qt = self.source.read_qtensor(spec.hf_name, in_shards)
        else:
            host = self.source.read(spec.hf_name, np.float32)
            if tuple(host.shape) != spec.hf_shape:
                raise UserError(f"{self.source.path}: tensor {spec.hf_name!r} has shape {tuple(host.shape)}, the "
                                f"config expects {spec.hf_shape}; the checkpoint does not match its config")
            importance = self.imatrix.for_weight(spec.hf_name, n) if self.imatrix is not None else None
            weighted = importance is not None and qtype in quant.IMPORTANCE_TYPES
            (self.weighted if weighted else self.unweighted).append(spec.hf_name)
            qt = quant.quantize(host, qtype, in_shards, importance=importance if weighted else None)
            del host
        self.record(spec, qt)
        return qt

    def _stack(self, spec: ParamSpec, qtype: str, keep: bool, out: int, n: int, in_shards: int):
        """A layer's stacked experts, one ``[out, in]`` QTensor per expert stacked along a leading axis: a GGUF's own
        blocks repacked expert by expert (``raw``: ``[E, out, bytes]``), else the float stack ``[E, in, out]``
        quantized expert by expert (no importance matrix: llama.cpp's per-expert entries are not read yet)."""
        if keep and hasattr(self.source, "read_qstack"):  # a Hugging Face folder's MXFP4 experts
            return self.source.read_qstack(spec.hf_name)
        if keep and is_gguf(self.source):
            raw, _ = self.source.raw(spec.hf_name)
            gguf_type = quant.QTYPES[qtype].gguf
            return quant.stack([quant.from_gguf(raw[e], gguf_type, (out, n)) for e in range(raw.shape[0])])
        if keep:
            raise UserError(f"{self.source.path}: stacked experts {spec.hf_name} cannot be restored in their stored "
                            f"type {qtype} from this checkpoint; load it with --isq none")
        host = self.source.read(spec.hf_name, np.float32)
        if tuple(host.shape) != spec.hf_shape:
            raise UserError(f"{self.source.path}: tensor {spec.hf_name!r} has shape {tuple(host.shape)}, the "
                            f"config expects {spec.hf_shape}; the checkpoint does not match its config")
        self.unweighted.append(spec.hf_name)
        parts = [quant.quantize(np.ascontiguousarray(host[e].T), qtype, in_shards) for e in range(host.shape[0])]
        del host
        return quant.stack(parts)

    def stored(self, spec: ParamSpec, qt) -> None:
        """A tensor quantized earlier (a reused disk-tier folder, whose name carries the imatrix): report it as if
        quantized now."""
        if self.imatrix is not None:
            weighted = spec.hf_name in self.imatrix.values and qt.qtype in quant.IMPORTANCE_TYPES
            (self.weighted if weighted else self.unweighted).append(spec.hf_name)
        self.record(spec, qt)

    def record(self, spec: ParamSpec, qt) -> None:
        self.bytes[spec.hf_name] = (qt.nbytes, spec.size * 4, qt.qtype, spec.layer)  # a stack: all its experts

    def _check(self, want: str, qtype: str, spec: ParamSpec, out: int, n: int, in_shards: int,
               out_shards: int) -> None:
        """The plan's type must fit the weight's real split; a type other than the one requested is a fallback the
        requested one needed (recorded for the warning, with the reason)."""
        if not _fits(qtype, out, n, in_shards, out_shards):
            raise UserError(f"the plan gives {spec.hf_name} type {qtype}, which does not fit its split ({out}x{n} "
                            f"over {out_shards}x{in_shards} devices); make a new plan")
        if qtype == want:
            return
        if not quant.fits(want, n, in_shards):
            why = quant.misfit_reason(want, n, in_shards)
        elif out % (quant.row_classes(want) * out_shards):
            why = (f"its {quant.row_classes(want)} rows packed per byte do not divide the tensor's "
                   f"{out // out_shards} output rows per device")
        else:
            raise UserError(f"the plan gives {spec.hf_name} type {qtype} although {want}, the type its layer asks "
                            "for, fits it (an edited plan, or one made for a checkpoint stored in other types); "
                            "make a new plan")
        short = _LAYER_PREFIX.sub("", spec.hf_name) if spec.layer is not None else spec.hf_name
        names = self.fallbacks.setdefault((short, want, qtype, why), [])
        if spec.hf_name not in names:  # the disk tier decides a weight's type before quantizing it
            names.append(spec.hf_name)

    def report(self, float_itemsize: int) -> None:
        """Warnings for fallbacks and requantized GGUF types; one INFO line per layer range with bytes saved."""
        for (short, want, got, why), names in self.fallbacks.items():
            log.warning("isq: %s does not fit %s (%s); %s used instead for %d tensor(s), e.g. %s", want, short, why,
                        got, len(names), names[0])
        if self.imatrix is not None:
            if not self.weighted:
                log.warning("imatrix %s not used: no weight of this load is quantized from float with a type it "
                            "weights (%s); pass --isq TYPE", self.imatrix.path, ", ".join(quant.IMPORTANCE_TYPES))
            else:
                log.info("isq: imatrix %s (%d calibration tokens) weighted %d of %d quantized weights%s",
                         self.imatrix.path, self.imatrix.tokens, len(self.weighted),
                         len(self.weighted) + len(self.unweighted),
                         f"; not {self.unweighted[0]} and {len(self.unweighted) - 1} more (no entry, or a "
                         f"type it does not weight)" if self.unweighted else "")
        for native in sorted(self.requantized):
            log.warning("isq: the checkpoint is already quantized (%s); the requested type requantizes its "
                        "dequantized weights (precision lost in %s is not recovered)", native, native)
        per_layer: dict[int | str, list] = {}
        for name, (stored, f32, qtype, layer) in self.bytes.items():
            key: int | str = layer if layer is not None else name
            entry = per_layer.setdefault(key, [0, 0, set()])
            entry[0] += stored
            entry[1] += f32 // 4 * float_itemsize
            entry[2].add(qtype)
        rows = []
        for key, (stored, full, types) in sorted(per_layer.items(), key=lambda kv: (isinstance(kv[0], str), kv[0])):
            label = f"layer {key}" if isinstance(key, int) else key
            rows.append((label, "+".join(sorted(types)), stored, full))
        merged: list[list] = []
        for label, types, stored, full in rows:  # merge consecutive layers with the same line
            if (merged and label.startswith("layer") and merged[-1][0].startswith("layer")
                    and merged[-1][1] == types and merged[-1][2] == stored):
                merged[-1][4] = label.split()[-1]
                merged[-1][5] += 1
                continue
            merged.append([label, types, stored, full, None, 1])
        for label, types, stored, full, last, count in merged:
            span = f"layers {label.split()[-1]}-{last}" if last else label
            saved = full - stored
            log.info("isq: %s: %s, %.2f MiB%s (float %.2f MiB, saved %.2f MiB, %.0f%%)", span, types,
                     stored / 2**20, " each" if count > 1 else "", full / 2**20, saved / 2**20,
                     100 * saved / max(full, 1))


def _fits(qtype: str, out: int, n: int, in_shards: int, out_shards: int) -> bool:
    return quant.fits(qtype, n, in_shards) and out % (quant.row_classes(qtype) * out_shards) == 0


def type_function(device_map, config) -> Callable[[ParamSpec, int, int], tuple[str, str] | None]:
    """Each weight's ``(requested, final)`` type as the plan stores it (:func:`jaxmap.planning.isq_types.
    planned_types`); a weight placed with another split than the plan gave it is an error naming it."""
    return _lookup(planned_types(device_map, config))


def flat_type_function(config, global_isq: str | None, native: dict[str, str] | None = None):
    """The same for one unsplit stage with no topology (:func:`jaxmap.planning.isq_types.flat_types`)."""
    return _lookup(flat_types(config, global_isq, native))


def _lookup(planned: dict[str, list[TensorType]]) -> Callable[[ParamSpec, int, int], tuple[str, str] | None]:
    def type_for(spec: ParamSpec, in_shards: int, out_shards: int) -> tuple[str, str] | None:
        entries = planned.get(spec.hf_name)
        if not entries:
            return None
        for t in entries:  # a tied embedding table: one entry per placement holding it, told apart by the split
            if (t.split.in_shards, t.split.out_shards) == (in_shards, out_shards):
                return t.requested, t.final
        splits = " or ".join(f"{t.split.out_shards}x{t.split.in_shards}" for t in entries)
        raise UserError(f"{spec.hf_name} is placed split {out_shards}x{in_shards} (output x input) but the plan "
                        f"decided its type ({entries[0].final}) for a {splits} split; the plan does not match its "
                        "layout: make a new plan")

    return type_for
