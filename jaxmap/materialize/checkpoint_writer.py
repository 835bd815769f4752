"""Write a jaxmap orbax checkpoint from any weight source (``python -m jaxmap.convert``); the format and its
reader are :mod:`jaxmap.loading.orbax_checkpoint`."""

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

from jaxmap import families
from jaxmap.config import ModelConfig
from jaxmap.errors import UserError
from jaxmap.families import config_to_hf
from jaxmap.loading.orbax_checkpoint import (
    FORMAT,
    METADATA,
    OUTER,
    PARAMS,
    VERSION,
    layer_item,
    qtensor_leaves,
    quiet_orbax_logs,
)
from jaxmap.planning.device_map import config_fingerprint
from jaxmap.progress import Progress

log = logging.getLogger(__name__)


def _item_items(config: ModelConfig) -> list[tuple[str, dict[str, families.ParamSpec]]]:
    items = [(OUTER, families.outer_param_specs(config))]
    items += [(layer_item(i), families.layer_param_specs(config, i)) for i in range(config.num_hidden_layers)]
    return items


def _flat_type_function(source: Any, config: ModelConfig, global_isq: str | None):
    """The types a conversion stores: the planner's decision for one unsplit stage with no topology (the global type
    on decoder layers; the LM head and embeddings keep precision unless native), native types read from the source."""
    from jaxmap.materialize import isq as isq_mod

    return isq_mod.flat_type_function(config, global_isq, isq_mod.native_types(source))


def convert(source: Any, out: str | Path, dtype: np.dtype | str | None = None, isq: str | None = None,
            progress: bool = True, compress: bool = False, imatrix=None) -> Path:
    """Write ``source`` (any :class:`~jaxmap.loading.source.WeightSource`) as a jaxmap orbax checkpoint at ``out``.

    ``isq``: store decoder-layer weights quantized (a type, ``native`` or ``none``); unset, a GGUF (or quantized
    checkpoint) converted with no ``dtype`` keeps its stored types, as loading it does
    (:func:`jaxmap.materialize.isq.default_isq`), and an explicit ``dtype`` dequantizes. ``dtype`` is also the dtype of
    everything stored as float (default float32). Weights are read and quantized on the host one tensor
    at a time, written one layer at a time.
    ``imatrix``: an importance matrix (path or :class:`jaxmap.imatrix.Imatrix`) weighting the quantized fit.
    """
    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxmap.materialize import isq as isq_mod
    from jaxmap.materialize.params import read_param

    global_isq = isq_mod.default_isq(source, isq, None if dtype is None else str(dtype))
    dtype = "float32" if dtype is None else dtype
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
    unsplit = NamedSharding(Mesh(np.array([device]), ("x",)), PartitionSpec())  # the stored layout: tp=1
    from jaxmap.loading.imatrix_file import Imatrix

    quantizer = isq_mod.Quantizer(source, _flat_type_function(source, config, global_isq),
                                  None if imatrix is None else Imatrix.load(imatrix))
    tensors: dict[str, dict] = {}
    bar = Progress(sum(len(specs) for _, specs in items), "writing checkpoint", enabled=progress)
    # zstd (orbax's default) made SmolLM2's float32 weights 37% smaller and its restore about 2x slower
    with quiet_orbax_logs():
        checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=compress))
    t0 = time.perf_counter()
    try:
        (tmp / PARAMS).mkdir(parents=True)
        for item, specs in items:
            tree = {}
            for key, spec in specs.items():
                entry = {"item": item, "key": key, "shape": list(spec.shape), "axes": list(spec.axes),
                         "transposed": spec.transpose, "dtype": np.dtype(dtype).name, "isq": None}
                qtype, keep = quantizer.decide(spec, unsplit)
                if qtype is not None:
                    qt = quantizer.place(spec, unsplit, qtype, keep)
                    leaves, layout = qtensor_leaves(qt)
                    layout["in_shards"] = 1
                    layout["leaves"] = {}
                    for leaf, array in leaves.items():
                        tree[f"{key}__{leaf}"] = array
                        layout["leaves"][leaf] = {"key": f"{key}__{leaf}", "shape": list(array.shape),
                                                  "dtype": np.dtype(array.dtype).name}
                    entry.update(isq=qt.qtype, quant=layout)
                    bar.update(qt.nbytes)
                    del qt, leaves
                else:
                    host = read_param(source, spec, np.dtype(np.float32)).astype(dtype, copy=False)
                    tree[key] = jax.device_put(host, device)
                    bar.update(host.nbytes)
                    del host
                tensors[spec.hf_name] = entry
            with quiet_orbax_logs():
                checkpointer.save(tmp / PARAMS / item, tree)
            del tree
        quantized = any(e["isq"] for e in tensors.values())
        _write_json(tmp / "config.json", config_to_hf(config))
        _write_tokenizer(source, tmp)
        _write_json(tmp / METADATA, {
            "format": FORMAT, "version": VERSION if quantized else 1, "model": config.name or "unnamed",
            "fingerprint": config_fingerprint(config), "dtype": np.dtype(dtype).name,
            "isq": global_isq if quantized else None,
            "source": str(source.path), "compressed": compress, "items": [item for item, _ in items],
            "tensors": tensors,
        })
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    quantizer.report(np.dtype(dtype).itemsize)
    types = sorted({e["isq"] for e in tensors.values() if e["isq"]})
    log.info("wrote %s (%d tensors, %s%s) in %.1f s", out, len(tensors), np.dtype(dtype).name,
             f", quantized: {'+'.join(types)}" if types else "", time.perf_counter() - t0)
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


