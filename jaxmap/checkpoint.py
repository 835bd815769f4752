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

A quantized tensor (``--isq``, coming with ``jaxmap.quant``) will be stored as a small pytree under its key (packed
data and scales) with its isq type in ``jaxmap_checkpoint.json``; restore dispatches on that type.

The folder is written under a temporary name beside ``--out`` and renamed at the end, so an interrupted conversion
never leaves something that looks like a checkpoint; a folder with orbax items but no ``jaxmap_checkpoint.json`` is
refused as incomplete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxmap import param_specs as llama
from jaxmap.config import ModelConfig
from jaxmap.device_map import config_fingerprint
from jaxmap.errors import UserError
from jaxmap.progress import Progress

log = logging.getLogger(__name__)

FORMAT = "jaxmap-orbax"
VERSION = 1
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


def _item_items(config: ModelConfig) -> list[tuple[str, dict[str, llama.ParamSpec]]]:
    items = [(OUTER, llama.outer_param_specs(config))]
    items += [(layer_item(i), llama.layer_param_specs(config, i)) for i in range(config.num_hidden_layers)]
    return items


def _isq_module(isq: str | None):
    if not isq:
        return None
    try:
        import jaxmap.quant as quant  # noqa: F401 - built on another branch
    except ImportError:
        raise UserError(f"--isq {isq}: in-situ quantization is not available in this build (jaxmap.quant is "
                        "missing); convert without --isq") from None
    raise UserError(f"--isq {isq}: writing quantized checkpoints is not wired into convert yet; convert without "
                    "--isq and quantize at load time")


def convert(source: Any, out: str | Path, dtype: np.dtype | str = "float32", isq: str | None = None,
            progress: bool = True, compress: bool = False) -> Path:
    """Write ``source`` (any :class:`~jaxmap.loading.source.WeightSource`) as a jaxmap orbax checkpoint at ``out``."""
    import jax
    import orbax.checkpoint as ocp

    from jaxmap.materialize import read_param

    _isq_module(isq)
    dtype = np.dtype(ml_dtypes.bfloat16) if str(dtype) in ("bfloat16", "bf16") else np.dtype(dtype)
    out = Path(out).expanduser().absolute()
    if out.exists():
        raise UserError(f"{out} already exists; remove it or choose another --out")
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: the folder {out.parent} does not exist")
    if jax.process_count() > 1:
        raise UserError("convert runs as a single process; start it without --coordinator")
    config: ModelConfig = source.config
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    items = _item_items(config)
    device = jax.local_devices(backend="cpu")[0]
    tensors: dict[str, dict] = {}
    bar = Progress(sum(len(specs) for _, specs in items), "writing checkpoint", enabled=progress)
    # zstd (orbax's default) made SmolLM2's float32 weights 37% smaller and its restore about 2x slower
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=compress))
    t0 = time.perf_counter()
    try:
        (tmp / PARAMS).mkdir(parents=True)
        for item, specs in items:
            tree = {}
            for key, spec in specs.items():
                host = read_param(source, spec, np.dtype(np.float32)).astype(dtype, copy=False)
                tree[key] = jax.device_put(host, device)
                tensors[spec.hf_name] = {"item": item, "key": key, "shape": list(spec.shape),
                                         "axes": list(spec.axes), "transposed": spec.transpose,
                                         "dtype": np.dtype(dtype).name, "isq": None}
                bar.update(host.nbytes)
            checkpointer.save(tmp / PARAMS / item, tree)
            del tree
        _write_json(tmp / "config.json", config.to_hf_dict())
        _write_tokenizer(source, tmp)
        _write_json(tmp / METADATA, {
            "format": FORMAT, "version": VERSION, "model": config.name or "unnamed",
            "fingerprint": config_fingerprint(config), "dtype": np.dtype(dtype).name, "isq": isq,
            "source": str(source.path), "compressed": compress, "items": [item for item, _ in items],
            "tensors": tensors,
        })
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    log.info("wrote %s (%d tensors, %s) in %.1f s", out, len(tensors), np.dtype(dtype).name,
             time.perf_counter() - t0)
    return out


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(source: Any, folder: Path) -> None:
    tok = source.tokenizer()
    if tok is None:
        return
    (folder / "tokenizer.json").write_text(tok.inner.to_str(), encoding="utf-8")
    name = tok.id_to_token
    cfg: dict[str, Any] = {"add_bos_token": bool(tok.add_bos), "chat_template": tok.chat_template}
    if tok.bos_token_id is not None:
        cfg["bos_token"] = name(tok.bos_token_id)
    if tok.eos_token_ids:
        cfg["eos_token"] = name(tok.eos_token_ids[0])
    if tok.pad_token_id is not None:
        cfg["pad_token"] = name(tok.pad_token_id)
    _write_json(folder / "tokenizer_config.json", cfg)
    _write_json(folder / "generation_config.json", {"bos_token_id": tok.bos_token_id,
                                                    "eos_token_id": list(tok.eos_token_ids)})


class OrbaxSource:
    """A jaxmap orbax checkpoint as a :class:`~jaxmap.loading.source.WeightSource`, plus :meth:`read_placed`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            meta = json.loads((self.path / METADATA).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{self.path / METADATA} is unreadable: {exc}") from None
        if meta.get("format") != FORMAT or not isinstance(meta.get("tensors"), dict):
            raise UserError(f"{self.path} is not a jaxmap checkpoint ({METADATA} has no format {FORMAT!r})")
        if int(meta.get("version", 0)) > VERSION:
            raise UserError(f"{self.path} was written by a newer jaxmap (checkpoint version {meta['version']}, this "
                            f"jaxmap reads up to {VERSION})")
        self.meta = meta
        missing = [i for i in meta["items"] if not (self.path / PARAMS / i / "_CHECKPOINT_METADATA").exists()]
        if missing:
            raise UserError(f"{self.path} is an incomplete checkpoint: item {PARAMS}/{missing[0]} is missing "
                            f"({len(missing)} of {len(meta['items'])}); convert it again")
        try:
            raw = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{self.path}/config.json is unreadable: {exc}") from None
        self.config = ModelConfig.from_hf_dict(raw, name=str(meta.get("model") or self.path.name))
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

    def stored_nbytes(self, name: str) -> int:
        e = self._entry(name)
        from jaxmap.dtypes import parse_dtype

        return int(np.prod(e["shape"])) * parse_dtype(e["dtype"]).itemsize

    def read(self, name: str, dtype: np.dtype | str = np.float32) -> np.ndarray:
        """One tensor on the host, in Hugging Face layout (for conversions and checks; loading uses read_placed)."""
        import orbax.checkpoint as ocp

        e = self._entry(name)
        from jaxmap.loading.safetensors_source import as_numpy_dtype

        args = {e["key"]: ocp.RestoreArgs(restore_type=np.ndarray, dtype=as_numpy_dtype(dtype))}
        out = self._restore(e["item"], args)[e["key"]]
        return np.ascontiguousarray(out.T) if e["transposed"] else out

    def read_placed(self, group: dict[str, tuple[llama.ParamSpec, Any]], dtype: np.dtype) -> dict[str, Any]:
        """Several parameters, each restored straight into its sharding (one orbax call per checkpoint item)."""
        import orbax.checkpoint as ocp

        by_item: dict[str, dict[str, tuple[str, llama.ParamSpec, Any]]] = {}
        for name, (spec, sharding) in group.items():
            try:
                e = self._entry(spec.hf_name)
            except KeyError:
                raise UserError(f"{self.path}: the checkpoint has no tensor {spec.hf_name!r}") from None
            if tuple(e["shape"]) != tuple(spec.shape):
                raise UserError(f"{self.path}: tensor {spec.hf_name!r} has shape {tuple(e['shape'])}, the model "
                                f"expects {spec.shape}; the checkpoint does not match its config")
            if e["isq"]:
                raise UserError(f"{self.path}: tensor {spec.hf_name!r} is quantized ({e['isq']}), which this build "
                                "cannot restore")
            by_item.setdefault(e["item"], {})[e["key"]] = (name, spec, sharding)
        import jax

        out: dict[str, Any] = {}
        for item, wanted in by_item.items():
            args, elsewhere = {}, {}
            for key, (name, spec, sharding) in wanted.items():
                if sharding.addressable_devices:
                    args[key] = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(spec.shape),
                                                     dtype=np.dtype(dtype))
                else:  # every shard lives on other processes: nothing to read here (orbax 0.12.8 fails on these)
                    elsewhere[name] = jax.make_array_from_single_device_arrays(tuple(spec.shape), sharding, [],
                                                                               dtype=np.dtype(dtype))
            if not args:  # every process makes the same restore calls (orbax synchronises them): read a tiny one
                key = min(self.tensors_by_item(item), key=lambda k: np.prod(self.tensors_by_item(item)[k]["shape"]))
                args = {key: ocp.RestoreArgs(restore_type=np.ndarray)}
            restored = self._restore(item, args)
            for key, (name, _, _) in wanted.items():
                out[name] = elsewhere[name] if name in elsewhere else restored[key]
        return out

    def _restore(self, item: str, restore_args: dict) -> dict:
        import jax
        import orbax.checkpoint as ocp

        if self._checkpointer is None:
            self._checkpointer = ocp.PyTreeCheckpointer()
        abstract = {k: jax.ShapeDtypeStruct(tuple(self.tensors_by_item(item)[k]["shape"]), np.float32)
                    for k in restore_args}
        try:
            return self._checkpointer.restore(self.path / PARAMS / item, args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=restore_args, partial_restore=True))
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"{self.path}: cannot restore {PARAMS}/{item}: {str(exc).splitlines()[0][:200]}") from None

    def tensors_by_item(self, item: str) -> dict[str, dict]:
        cache = self.__dict__.setdefault("_by_item", {})
        if item not in cache:
            cache[item] = {e["key"]: e for e in self.tensors.values() if e["item"] == item}
        return cache[item]

    def tokenizer(self):
        from jaxmap.tokenizer import Tokenizer

        path = self.path / "tokenizer.json"
        if not path.is_file():
            return None
        return Tokenizer.from_file(path, config_eos=self.config.eos_token_ids, config_bos=self.config.bos_token_id)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None

