"""The disk tier: decoder layers whose weights are read from memory-mapped safetensors at every forward pass.

A Hugging Face folder of safetensors is read in place (zero-copy views of its own memory map). Any other source (a
GGUF file, random preset weights) is written once to an *offload folder* as one safetensors file per layer, in
Hugging Face layout and the compute dtype, and read from there. The folder is written to a temporary name and
renamed when complete, so an interrupted write never leaves a folder that looks usable; a complete one is reused
(its name carries the source's identity, the dtype and the layer).

With ISQ (or a GGUF kept in its quantized types), the quantized weights of disk-tier layers are what the offload
folder stores: each weight as its QTensor leaves (``NAME:q0``, ``NAME:d``...; the layout in the file's
``__metadata__``), so a step reads and moves the quantized bytes, as the planner counted them, and the layer computes
on them as a resident one does; norms stay float. The folder's name then also carries every weight's type.

After each layer of an offload folder is used, its file pages are dropped from the process
(``madvise(MADV_DONTNEED)`` on the map) so the resident set stays about one layer wide; the kernel's page cache may
keep them for the next pass. A source's own safetensors are read through its memory map as they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import mmap
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxmap.config import ModelConfig
from jaxmap.config.cache import cache_root
from jaxmap.errors import UserError
from jaxmap.families import ParamSpec, config_to_hf, layer_param_specs
from jaxmap.loading.safetensors_source import SAFETENSORS_DTYPES, SafetensorsSource, parse_header

log = logging.getLogger(__name__)


def default_offload_folder() -> Path:
    return cache_root() / "offload"


def check_writable(folder: Path) -> None:
    """Fail before loading when the offload folder cannot be written (nothing is left behind by the probe)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as exc:
        raise UserError(f"offload folder {folder} is not writable ({exc.strerror or exc}); pass --offload-folder "
                        "DIR with a writable folder, or --no-disk to forbid disk offload") from None


class DiskLayers:
    """Per-layer host views of the weights of the disk-tier layers ``[start, end)``: float tensors in Hugging Face
    layout, quantized ones as :class:`~jaxmap.quant.QTensor` with numpy leaves."""

    def __init__(self, files: dict[int, tuple[SafetensorsSource | None, Path | None]], specs: dict[int, dict]):
        self._files = files
        self.specs = specs  # layer -> {short name: ParamSpec}
        self._maps: dict[Path, tuple[mmap.mmap, np.ndarray, dict, dict]] = {}

    def read(self, layer: int) -> dict:
        """Zero-copy views of one layer's tensors (stored dtype, Hugging Face shape; quantized: QTensor leaves)."""
        from jaxmap.loading.orbax_checkpoint import qtensor_from

        source, path = self._files[layer]
        specs = self.specs[layer]
        if source is not None:
            return {k: source.view(s.hf_name) for k, s in specs.items()}
        assert path is not None
        if path not in self._maps:
            entries, metadata = parse_header(path)
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[path] = (mm, np.frombuffer(mm, dtype=np.uint8), entries, metadata)
        _, buf, entries, metadata = self._maps[path]

        def view(name):
            e = entries[name]
            return buf[e.start:e.start + e.nbytes].view(SAFETENSORS_DTYPES[e.dtype_name]).reshape(e.shape)

        out = {}
        for k, s in specs.items():
            if s.hf_name in metadata:  # stored quantized: its leaves and layout
                layout = json.loads(metadata[s.hf_name])
                out[k] = qtensor_from({leaf: view(f"{s.hf_name}:{leaf}") for leaf in layout["leaves"]}, layout)
            else:
                out[k] = view(s.hf_name)
        return out

    def release(self, layer: int) -> None:
        """Drop the layer's file pages from this process (they were copied to the device)."""
        _, path = self._files[layer]
        if path is not None and path in self._maps and hasattr(mmap, "MADV_DONTNEED"):
            try:
                self._maps[path][0].madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass

    def stored_bytes(self) -> int:
        return sum(int(v.nbytes) for layer in self._files for v in self.read(layer).values())


@dataclasses.dataclass(frozen=True)
class DiskQuantization:
    """What the disk tier stores quantized: ``qtype(spec)`` is a weight's type (None: float) and ``quantize(spec)``
    its host QTensor; ``key`` names whatever else changes the stored bytes (an importance matrix)."""

    qtype: Callable[[ParamSpec], str | None]
    quantize: Callable[[ParamSpec], Any]
    key: str = ""
    describe: Callable[[ParamSpec], str | None] | None = None  # the type and whatever else shapes its bytes
    reused: Callable[[ParamSpec, Any], None] | None = None  # told of each quantized tensor of a reused folder


def open_disk_layers(source, config: ModelConfig, layers: range, dtype: np.dtype, folder: Path | None,
                     quantization: DiskQuantization | None = None) -> DiskLayers:
    """Disk-tier access for ``layers``: the source's own safetensors when it has them and nothing is quantized, else
    an offload folder (quantized weights stored quantized)."""
    specs = {i: layer_param_specs(config, i) for i in layers}
    types = {s.hf_name: t for i in layers for s in specs[i].values()
             if quantization is not None and (t := quantization.qtype(s)) is not None}
    if isinstance(source, SafetensorsSource) and not types:
        return DiskLayers({i: (source, None) for i in layers}, specs)
    folder = Path(folder) if folder is not None else default_offload_folder()
    check_writable(folder)
    variant = None
    if types:
        assert quantization is not None
        describe = quantization.describe or quantization.qtype
        variant = {"types": {name: describe(s) for i in layers for s in specs[i].values()
                             if (name := s.hf_name) in types}, "key": quantization.key}
    root = folder / _identity(source, config, dtype, variant)
    files, reused = {}, []
    for i in layers:
        path = root / f"layer-{i:04d}.safetensors"
        damage = _damage(path, specs[i]) if path.is_file() else None
        if damage:  # jaxmap's own cache: rebuild the layer rather than fail every run from now on
            log.warning("disk tier: %s is damaged (%s); writing it again", path, damage)
        if not path.is_file() or damage:
            _write_layer(source, specs[i], dtype, path, types, quantization)
        else:
            reused.append(i)
        files[i] = (None, path)
    log.info("disk tier: %d layer(s) read from %s%s", len(files), root,
             f" ({len(types)} weights stored quantized)" if types else "")
    disk = DiskLayers(files, specs)
    if types and quantization is not None and quantization.reused is not None:
        for i in reused:
            for k, value in disk.read(i).items():
                if specs[i][k].hf_name in types:
                    quantization.reused(specs[i][k], value)
    return disk


def _damage(path: Path, specs: dict[str, ParamSpec]) -> str | None:
    """Why a reused layer file cannot be used (truncated, corrupt, or missing a weight), or None when it is whole."""
    try:
        entries, metadata = parse_header(path)
    except UserError as exc:
        return str(exc).removeprefix(f"{path} ")
    for s in specs.values():
        if s.hf_name in metadata:  # stored quantized: every leaf its layout names must be there
            try:
                leaves = [f"{s.hf_name}:{leaf}" for leaf in json.loads(metadata[s.hf_name])["leaves"]]
            except (ValueError, KeyError, TypeError):
                return f"the layout of {s.hf_name} is unreadable"
            if any(leaf not in entries for leaf in leaves):
                return f"it lacks a leaf of {s.hf_name}"
        elif s.hf_name not in entries:
            return f"it lacks {s.hf_name}"
        elif entries[s.hf_name].shape != s.hf_shape:
            return f"{s.hf_name} has shape {entries[s.hf_name].shape}, not {s.hf_shape}"
    return None


def _identity(source, config: ModelConfig, dtype: np.dtype, variant: dict | None = None) -> str:
    path = Path(str(source.path))
    stat = path.stat() if path.exists() else None
    key = {"path": str(path.resolve()) if stat else str(source.path), "size": stat.st_size if stat else 0,
           "mtime": stat.st_mtime_ns if stat else 0, "config": config_to_hf(config), "dtype": np.dtype(dtype).name}
    if stat and path.is_dir():  # a folder's own stat does not change when a weight file is rewritten in place
        key["files"] = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir()
                              if f.is_file() and f.suffix in (".safetensors", ".json"))
    if variant is not None:
        key["quantized"] = variant
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{(config.name or 'model').replace('/', '_')}-{np.dtype(dtype).name}-{'q-' if variant else ''}{digest}"


def _write_layer(source, specs: dict[str, ParamSpec], dtype: np.dtype, path: Path, types: dict | None = None,
                 quantization: DiskQuantization | None = None) -> None:
    """One layer as a safetensors file, written under a temporary name and renamed when complete."""
    from jaxmap.loading.orbax_checkpoint import qtensor_leaves

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tensors, metadata = {}, {}
        for s in specs.values():
            if types and s.hf_name in types:
                assert quantization is not None
                leaves, layout = qtensor_leaves(quantization.quantize(s))
                layout["leaves"] = sorted(leaves)
                metadata[s.hf_name] = json.dumps(layout)
                tensors.update({f"{s.hf_name}:{k}": np.ascontiguousarray(v) for k, v in leaves.items()})
            else:
                tensors[s.hf_name] = np.ascontiguousarray(source.read(s.hf_name, dtype))
        write_safetensors(tensors, tmp, metadata)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write the offload folder {path.parent}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_safetensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> None:
    """The safetensors format (a little-endian u64 header length, a JSON header, the raw bytes), bfloat16 included;
    ``metadata``: string pairs for the header's ``__metadata__``."""
    names = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = ({"__metadata__": dict(metadata)} if metadata else {}), 0
    for name, array in tensors.items():
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for array in tensors.values():
            f.write(array.tobytes())
