"""jaxmap's orbax checkpoints: write one from any weight source, read it back straight into a plan's shardings.

A checkpoint is a folder::

    config.json              the model (Hugging Face keys)
    tokenizer.json           the tokenizer (for a GGUF source, the one jaxmap builds from the GGUF vocabulary)
    tokenizer_config.json    chat template, bos/eos/pad tokens, add_bos_token
    generation_config.json   eos/bos token ids
    params/outer/            an orbax PyTree checkpoint: embed_tokens, final_norm, lm_head (when untied)
    params/layer_00000/ ...  one orbax PyTree checkpoint per decoder layer: attn_norm, wq, wk, wv, wo, ...
    jaxmap_checkpoint.json   written last: format version, model fingerprint, and per tensor its item, key, shape,
                             logical axes, dtype and isq type

Arrays are stored in jaxmap's layout (projections ``[in, out]``), so restoring needs no transpose: each array is
read by orbax directly into the ``NamedSharding`` the plan gives it, and each process reads only the shards of its
own devices. One orbax item per layer keeps the peak memory of writing a checkpoint at one layer (a 70B model is
converted with a few GiB of RAM) and lets a stage restore only its own layers.

A quantized tensor (``--isq TYPE``, or a GGUF's own types) is stored as the array leaves of its
:class:`~jaxmap.quant.QTensor` (packed bit planes, scales, mins), each under ``KEY__LEAF`` in its layer's item
(``wq__q0``, ``wq__d``...), with the QTensor's static fields (type, ``[out, in]`` shape, group size) and every
leaf's key, shape and dtype in ``jaxmap_checkpoint.json``. Restoring reads each leaf straight into the sharding the
Quantizer would give it (:func:`jaxmap.quant.shardings_for` of the weight's split), so types are kept in any layout.

The stored layout is the unsplit (tp=1) one. Block types (Q4_0 ... Q6K) do not depend on the split at all; the
per-channel types (INT8, F8E4M3) differ only by their row scale repeated once per input shard, which restore
repeats (exact). A split the stored type does not fit (its blocks do not divide a shard's inputs, or its packed
rows a shard's outputs: Q4K on a 1536-wide input cut in 4, or a K type's short last super-block, kept only on an
unsplit input) falls back along ``quant.FALLBACK`` as ``--isq`` does at load: that tensor is requantized from its
dequantized weights, with the fallback warning.

The folder is written under a temporary name beside ``--out`` and renamed at the end, so an interrupted conversion
never leaves something that looks like a checkpoint; a folder with orbax items but no ``jaxmap_checkpoint.json`` is
refused as incomplete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxmap.config import config_fingerprint
from jaxmap.errors import UserError
from jaxmap.families import read_config_json

log = logging.getLogger(__name__)

FORMAT = "jaxmap-orbax"
VERSION = 2  # 2: quantized tensors (a float-only checkpoint is still written as version 1)
METADATA = "jaxmap_checkpoint.json"
PARAMS = "params"
OUTER = "outer"


def layer_item(i: int) -> str:
    return f"layer_{i:05d}"


def is_checkpoint_dir(path: Path) -> bool:
    return (path / METADATA).is_file()


def looks_incomplete(path: Path) -> bool:
    """A folder that was being written as a checkpoint and never finished."""
    return ((path / PARAMS).is_dir() or ".partial-" in path.name) and not is_checkpoint_dir(path)


@contextlib.contextmanager
def quiet_orbax_logs() -> Iterator[None]:
    """orbax reports every save and restore through absl at INFO (760 lines for one conversion of SmolLM2): keep
    them out of jaxmap's INFO output, unless jaxmap's own logger is at DEBUG."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in ("absl", "orbax")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


_TENSORSTORE_STATUS = re.compile(r"(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|FAILED_PRECONDITION|INVALID_ARGUMENT): ")


def _from_orbax(exc: BaseException | None, obj: object = None) -> bool:
    """Whether an exception (or the coroutine that raised it) comes from orbax's reads, or is their event loop
    closing under them."""
    code = getattr(obj, "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
        return True
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
            return True
        if exc.__traceback__ is None and _TENSORSTORE_STATUS.match(str(exc)):
            return True  # set on a future by tensorstore's C++ side: no Python frames to recognise it by
        tb = exc.__traceback__
        while tb is not None:
            if any(part in tb.tb_frame.f_code.co_filename for part in ("orbax", "tensorstore")):
                return True
            tb = tb.tb_next
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class _OrbaxLeftovers(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for orbax's reads of a damaged item."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not _from_orbax(exc):
            return True
        log.debug("after a failed checkpoint read: %s", " ".join(str(exc).split())[:200])
        return False


def _mute_orbax_leftovers() -> None:
    """When one read of a damaged item fails, orbax's other reads of it fail in its background threads, while the
    error is raised and after, and print their tracebacks (unraisable exceptions, asyncio's unretrieved task
    errors) around jaxmap's one-line error. Installed before the first read, this sends those to the debug log;
    anything not from orbax still reaches the previous hook."""
    previous = sys.unraisablehook
    if not getattr(previous, "jaxmap_orbax", False):
        def hook(unraisable: Any) -> None:
            if _from_orbax(unraisable.exc_value, unraisable.object):
                log.debug("after a failed checkpoint read: %s", " ".join(str(unraisable.exc_value).split())[:200])
            else:
                previous(unraisable)

        hook.jaxmap_orbax = True  # type: ignore[attr-defined]
        sys.unraisablehook = hook
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _OrbaxLeftovers) for f in asyncio_log.filters):
        asyncio_log.addFilter(_OrbaxLeftovers())


# ---- QTensor <-> named leaves --------------------------------------------------------------------------------------

def _qfields():
    import dataclasses

    from jaxmap.quant import QTensor

    return dataclasses.fields(QTensor)


# where a weight runs (chosen when it is placed), not what is stored
_RUNTIME_FIELDS = ("kernel",)


def qtensor_leaves(qt) -> tuple[dict[str, Any], dict]:
    """A QTensor's arrays by leaf name (``q0``, ``d``, ``sc1``...) and what rebuilds it (static fields, tuple sizes)."""
    leaves: dict[str, Any] = {}
    static: dict[str, Any] = {}
    tuples: dict[str, int] = {}
    for f in _qfields():
        v = getattr(qt, f.name)
        if f.name in _RUNTIME_FIELDS:
            continue
        if f.metadata.get("static"):
            static[f.name] = list(v) if isinstance(v, tuple) else v
        elif isinstance(v, tuple):
            tuples[f.name] = len(v)
            leaves.update({f"{f.name}{i}": a for i, a in enumerate(v)})
        elif v is not None:
            leaves[f.name] = v
    return leaves, {"static": static, "tuples": tuples}


def qtensor_from(leaves: dict[str, Any], layout: dict):
    from jaxmap.quant import QTensor

    kw: dict[str, Any] = {}
    for f in _qfields():
        if f.name in _RUNTIME_FIELDS:
            continue
        if f.metadata.get("static"):
            v = layout["static"][f.name]
            kw[f.name] = tuple(v) if isinstance(v, list) else v
        elif f.name in layout["tuples"]:
            kw[f.name] = tuple(leaves[f"{f.name}{i}"] for i in range(layout["tuples"][f.name]))
        else:
            kw[f.name] = leaves.get(f.name)
    return QTensor(**kw)


def _leaf_dtype(name: str) -> np.dtype:
    """A stored leaf's dtype by name (uint8, float16, float32, float8_e4m3fn)."""
    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype(getattr(ml_dtypes, name))


def _resplit(layout: dict, in_shards: int) -> tuple[dict, bool]:
    """The stored (unsplit) layout re-split for ``in_shards`` input shards: per-channel types (INT8, F8E4M3) keep
    one copy of each row's scale per shard (``d`` ``[out, in_shards]``, group ``in / in_shards``), others are
    unchanged. Returns the layout and whether ``d`` must be repeated."""
    from jaxmap import quant

    static = layout["static"]
    if quant.QTYPES[static["qtype"]].block or in_shards == int(layout.get("in_shards", 1)):
        return layout, False
    out, n = static["shape"]
    static = {**static, "sub": n // in_shards}
    leaves = {**layout["leaves"], "d": {**layout["leaves"]["d"], "shape": [out, in_shards]}}
    return {**layout, "static": static, "leaves": leaves, "in_shards": in_shards}, True


_ENTRY_KEYS = ("item", "key", "shape", "transposed", "dtype", "isq")
_ITEM_NAME = re.compile(rf"{OUTER}|layer_\d{{5}}")  # what convert writes: never a path out of params/


def _read_metadata(path: Path) -> dict:
    """``jaxmap_checkpoint.json``, checked as far as loading relies on it: a damaged one is one line, not a
    KeyError from deep inside a restore."""
    file = path / METADATA
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{file} is not valid JSON (not UTF-8 text); convert the checkpoint again") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{file} is not valid JSON (line {exc.lineno}: {exc.msg}); convert the checkpoint "
                        "again") from None
    except OSError as exc:
        raise UserError(f"cannot read {file}: {exc.strerror or exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("tensors"), dict):
        raise UserError(f"{path} is not a jaxmap checkpoint ({METADATA} has no format {FORMAT!r})")
    version = meta.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{file} is damaged (version {version!r} is not a number); convert the checkpoint again")
    if version > VERSION:
        raise UserError(f"{path} was written by a newer jaxmap (checkpoint version {version}, this jaxmap reads up "
                        f"to {VERSION})")
    items = meta.get("items")
    if not isinstance(items, list) or not all(isinstance(i, str) and _ITEM_NAME.fullmatch(i) for i in items):
        raise UserError(f"{file} is damaged (its items are not {OUTER} and layer_NNNNN); convert the checkpoint "
                        "again")
    for name, entry in meta["tensors"].items():
        if not isinstance(entry, dict) or any(k not in entry for k in _ENTRY_KEYS) or entry["item"] not in items:
            raise UserError(f"{file} is damaged (the entry for {name!r} is incomplete); convert the checkpoint "
                            "again")
    return meta


class OrbaxSource:
    """A jaxmap orbax checkpoint as a :class:`~jaxmap.loading.source.WeightSource`, plus :meth:`read_placed`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = _read_metadata(self.path)
        self.meta = meta
        missing = [i for i in meta["items"] if not (self.path / PARAMS / i / "_CHECKPOINT_METADATA").exists()]
        if missing:
            raise UserError(f"{self.path} is an incomplete checkpoint: item {PARAMS}/{missing[0]} is missing "
                            f"({len(missing)} of {len(meta['items'])}); convert it again")
        config = read_config_json(self.path / "config.json")
        self.config = config.with_changes(name=str(meta.get("model") or self.path.name))
        if config_fingerprint(self.config) != meta.get("fingerprint"):
            raise UserError(f"{self.path}: config.json does not match the arrays (fingerprint "
                            f"{config_fingerprint(self.config)} != {meta.get('fingerprint')}); convert it again")
        self.tensors: dict[str, dict] = meta["tensors"]
        self._checkpointer = None

    # ---- WeightSource ----------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.tensors)

    def _entry(self, name: str) -> dict:
        if name not in self.tensors:
            raise KeyError(name)
        return self.tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        e = self._entry(name)
        shape = tuple(e["shape"])
        return tuple(reversed(shape)) if e["transposed"] else shape

    def stored_type(self, name: str) -> str:
        e = self._entry(name)
        return e["isq"] or {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(e["dtype"], e["dtype"])

    def stored_qtype(self, name: str) -> str | None:
        """The quantized type a tensor is stored in (None: float); :mod:`jaxmap.materialize.isq` keeps it as native."""
        return self._entry(name)["isq"]

    def stored_nbytes(self, name: str) -> int:
        e = self._entry(name)
        from jaxmap.config.dtypes import parse_dtype

        if e["isq"]:
            return sum(int(np.prod(v["shape"])) * _leaf_dtype(v["dtype"]).itemsize
                       for v in e["quant"]["leaves"].values())
        return int(np.prod(e["shape"])) * parse_dtype(e["dtype"]).itemsize

    def read(self, name: str, dtype: np.dtype | str = np.float32) -> np.ndarray:
        """One tensor on the host, in Hugging Face layout (for conversions and checks; loading uses read_placed);
        a quantized tensor is dequantized."""
        import orbax.checkpoint as ocp

        e = self._entry(name)
        from jaxmap.loading.safetensors_source import as_numpy_dtype

        if e["isq"]:
            import jax

            from jaxmap import quant

            qt = self.read_qtensor(name)
            with jax.default_device(jax.local_devices(backend="cpu")[0]):
                if len(e["shape"]) == 3:  # stacked MoE experts: one [out, in] QTensor per expert -> [E, in, out]
                    stack = jax.vmap(lambda q: quant.dequantize(q, np.float32))(qt)
                    return np.asarray(np.swapaxes(np.asarray(stack), 1, 2)).astype(as_numpy_dtype(dtype), copy=False)
                return np.asarray(quant.dequantize(qt, np.float32)).astype(as_numpy_dtype(dtype), copy=False)
        args = {e["key"]: ocp.RestoreArgs(restore_type=np.ndarray, dtype=as_numpy_dtype(dtype))}
        out = self._restore(e["item"], args)[e["key"]]
        return np.ascontiguousarray(out.T) if e["transposed"] else out

    def read_qtensor(self, name: str, in_shards: int = 1):
        """A quantized tensor as a host :class:`~jaxmap.quant.QTensor` (numpy leaves) laid out for ``in_shards``."""
        import orbax.checkpoint as ocp

        e = self._entry(name)
        if not e["isq"]:
            raise UserError(f"{self.path}: tensor {name!r} is not stored quantized")
        layout, repeat = _resplit(e["quant"], in_shards)
        leaves = e["quant"]["leaves"]
        restored = self._restore(e["item"], {v["key"]: ocp.RestoreArgs(restore_type=np.ndarray)
                                             for v in leaves.values()})
        host = {leaf: restored[v["key"]] for leaf, v in leaves.items()}
        if repeat:
            host["d"] = np.repeat(host["d"], in_shards, axis=1)
        return qtensor_from(host, layout)

    def read_placed(self, group: dict[str, tuple], dtype: np.dtype) -> dict[str, Any]:
        """Several parameters, each restored straight into its sharding (one orbax call per checkpoint item).

        ``group``: name -> ``(spec, sharding)``, or ``(spec, sharding, qtype)`` for a tensor stored quantized that
        the plan keeps in its stored type ``qtype``: its QTensor leaves are restored into the shardings of the
        weight's split. A quantized tensor the plan wants as float (``isq="none"``, an explicit dtype) is
        dequantized on the host and placed.
        """
        import jax
        import orbax.checkpoint as ocp

        from jaxmap import quant

        by_item: dict[str, dict[str, tuple]] = {}
        out: dict[str, Any] = {}
        for name, value in group.items():
            spec, sharding = value[0], value[1]
            qtype = value[2] if len(value) > 2 else None
            try:
                e = self._entry(spec.hf_name)
            except KeyError:
                raise UserError(f"{self.path}: the checkpoint has no tensor {spec.hf_name!r}") from None
            if tuple(e["shape"]) != tuple(spec.shape):
                raise UserError(f"{self.path}: tensor {spec.hf_name!r} has shape {tuple(e['shape'])}, the model "
                                f"expects {spec.shape}; the checkpoint does not match its config")
            if qtype is not None and qtype != e["isq"]:
                raise UserError(f"{self.path}: tensor {spec.hf_name!r} is stored as {e['isq'] or e['dtype']}, "
                                f"not {qtype}")
            if e["isq"] and qtype is None:  # wanted as float: dequantize
                if sharding.addressable_devices:
                    host = self.read(spec.hf_name, dtype)
                    out[name] = jax.device_put(np.ascontiguousarray(host.T) if spec.transpose else host, sharding)
                else:
                    out[name] = jax.make_array_from_single_device_arrays(tuple(spec.shape), sharding, [],
                                                                         dtype=np.dtype(dtype))
                continue
            by_item.setdefault(e["item"], {})[name] = (spec, sharding, e)

        for item, wanted in by_item.items():
            args: dict[str, Any] = {}
            elsewhere: dict[str, Any] = {}
            quantized: dict[str, tuple] = {}
            for name, (spec, sharding, e) in wanted.items():
                if e["isq"]:
                    _, _, out_axis, in_axis, in_shards, _ = quant.split_of(spec, sharding)
                    layout, repeat = _resplit(e["quant"], in_shards)
                    abstract = qtensor_from({leaf: jax.ShapeDtypeStruct(tuple(v["shape"]), _leaf_dtype(v["dtype"]))
                                             for leaf, v in layout["leaves"].items()}, layout)
                    shardings, _ = qtensor_leaves(quant.shardings_for(abstract, out_axis, in_axis, sharding.mesh))
                    quantized[name] = (layout, shardings, repeat)
                    for leaf, v in layout["leaves"].items():
                        if not shardings[leaf].addressable_devices:
                            elsewhere[(name, leaf)] = jax.make_array_from_single_device_arrays(
                                tuple(v["shape"]), shardings[leaf], [], dtype=_leaf_dtype(v["dtype"]))
                        elif repeat and leaf == "d":  # one scale per row, repeated per input shard after reading
                            args[v["key"]] = ocp.RestoreArgs(restore_type=np.ndarray)
                        else:
                            args[v["key"]] = ocp.ArrayRestoreArgs(sharding=shardings[leaf],
                                                                  global_shape=tuple(v["shape"]),
                                                                  dtype=_leaf_dtype(v["dtype"]))
                elif sharding.addressable_devices:
                    args[e["key"]] = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(spec.shape),
                                                          dtype=np.dtype(dtype))
                else:  # every shard lives on other processes: nothing to read here (orbax 0.12.8 fails on these)
                    elsewhere[name] = jax.make_array_from_single_device_arrays(tuple(spec.shape), sharding, [],
                                                                               dtype=np.dtype(dtype))
            if not args:  # every process makes the same restore calls (orbax synchronises them): read a tiny one
                keys = self._keys(item)
                key = min(keys, key=lambda k: np.prod(keys[k][0]))
                args = {key: ocp.RestoreArgs(restore_type=np.ndarray)}
            restored = self._restore(item, args)
            for name, (_, _, e) in wanted.items():
                if name in elsewhere:
                    out[name] = elsewhere[name]
                elif name in quantized:
                    layout, shardings, repeat = quantized[name]
                    leaves = {}
                    for leaf, v in e["quant"]["leaves"].items():
                        if (name, leaf) in elsewhere:
                            leaves[leaf] = elsewhere[(name, leaf)]
                        elif repeat and leaf == "d":
                            in_shards = layout["in_shards"]
                            leaves[leaf] = jax.device_put(np.repeat(restored[v["key"]], in_shards, axis=1),
                                                          shardings[leaf])
                        else:
                            leaves[leaf] = restored[v["key"]]
                    out[name] = qtensor_from(leaves, layout)
                else:
                    out[name] = restored[e["key"]]
        return out

    def _keys(self, item: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Every array stored in ``item``: key -> (shape, dtype); quantized tensors contribute their leaves."""
        cache = self.__dict__.setdefault("_keys_by_item", {})
        if item not in cache:
            keys = {}
            for e in self.tensors.values():
                if e["item"] != item:
                    continue
                if e["isq"]:
                    keys.update({v["key"]: (tuple(v["shape"]), _leaf_dtype(v["dtype"]))
                                 for v in e["quant"]["leaves"].values()})
                else:
                    keys[e["key"]] = (tuple(e["shape"]), np.dtype(np.float32))
            cache[item] = keys
        return cache[item]

    def _restore(self, item: str, restore_args: dict) -> dict:
        import jax
        import orbax.checkpoint as ocp

        keys = self._keys(item)
        abstract = {k: jax.ShapeDtypeStruct(*keys[k]) for k in restore_args}
        with quiet_orbax_logs():
            if self._checkpointer is None:
                _mute_orbax_leftovers()
                self._checkpointer = ocp.PyTreeCheckpointer()
            try:
                return self._checkpointer.restore(self.path / PARAMS / item, args=ocp.args.PyTreeRestore(
                    item=abstract, restore_args=restore_args, partial_restore=True))
            except Exception as exc:  # tensorstore raises plain Exceptions for damaged files: the file's fault
                cause = exc.__cause__ or exc
                raise UserError(f"{self.path} is truncated or corrupt ({PARAMS}/{item}: "
                                f"{str(cause).splitlines()[0][:200]}); convert it again") from None

    def tokenizer(self):
        from jaxmap.loading.tokenizer import Tokenizer

        path = self.path / "tokenizer.json"
        if not path.is_file():
            return None
        return Tokenizer.from_file(path, config_eos=self.config.eos_token_ids, config_bos=self.config.bos_token_id)

    def close(self) -> None:
        if self._checkpointer is not None:
            with quiet_orbax_logs():
                self._checkpointer.close()
            self._checkpointer = None

