"""The disk tier: decoder layers whose weights are read from memory-mapped safetensors at every forward pass.

A Hugging Face folder of safetensors is read in place (zero-copy views of its own memory map). Any other source (a
GGUF file, random preset weights) is written once to an *offload folder* as one safetensors file per layer, in
Hugging Face layout and the compute dtype, and read from there. The folder is written to a temporary name and
renamed when complete, so an interrupted write never leaves a folder that looks usable; a complete one is reused
(its name carries the source's identity, the dtype and the layer).

After each layer of an offload folder is used, its file pages are dropped from the process
(``madvise(MADV_DONTNEED)`` on the map) so the resident set stays about one layer wide; the kernel's page cache may
keep them for the next pass. A source's own safetensors are read through its memory map as they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import tempfile
from pathlib import Path

import numpy as np

from jaxmap.config import ModelConfig
from jaxmap.errors import UserError
from jaxmap.loading.safetensors_source import SAFETENSORS_DTYPES, SafetensorsSource, parse_header
from jaxmap.param_specs import ParamSpec, layer_param_specs

log = logging.getLogger(__name__)


def default_offload_folder() -> Path:
    base = os.environ.get("JAXMAP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxmap")
    return Path(base) / "offload"


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
    """Per-layer host views of the weights of the disk-tier layers ``[start, end)``, in Hugging Face layout."""

    def __init__(self, files: dict[int, tuple[SafetensorsSource | None, Path | None]], specs: dict[int, dict]):
        self._files = files
        self.specs = specs  # layer -> {short name: ParamSpec}
        self._maps: dict[Path, tuple[mmap.mmap, np.ndarray, dict]] = {}

    def read(self, layer: int) -> dict[str, np.ndarray]:
        """Zero-copy views of one layer's tensors (stored dtype, Hugging Face shape)."""
        source, path = self._files[layer]
        specs = self.specs[layer]
        if source is not None:
            return {k: source.view(s.hf_name) for k, s in specs.items()}
        assert path is not None
        if path not in self._maps:
            entries, _ = parse_header(path)
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[path] = (mm, np.frombuffer(mm, dtype=np.uint8), entries)
        _, buf, entries = self._maps[path]
        out = {}
        for k, s in specs.items():
            e = entries[s.hf_name]
            out[k] = buf[e.start:e.start + e.nbytes].view(SAFETENSORS_DTYPES[e.dtype_name]).reshape(e.shape)
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


def open_disk_layers(source, config: ModelConfig, layers: range, dtype: np.dtype, folder: Path | None) -> DiskLayers:
    """Disk-tier access for ``layers``: the source's own safetensors when it has them, else an offload folder."""
    specs = {i: layer_param_specs(config, i) for i in layers}
    if isinstance(source, SafetensorsSource):
        return DiskLayers({i: (source, None) for i in layers}, specs)
    folder = Path(folder) if folder is not None else default_offload_folder()
    check_writable(folder)
    root = folder / _identity(source, config, dtype)
    files = {}
    for i in layers:
        path = root / f"layer-{i:04d}.safetensors"
        if not path.is_file():
            _write_layer(source, specs[i], dtype, path)
        files[i] = (None, path)
    log.info("disk tier: %d layer(s) read from %s", len(files), root)
    return DiskLayers(files, specs)


def _identity(source, config: ModelConfig, dtype: np.dtype) -> str:
    path = Path(str(source.path))
    stat = path.stat() if path.exists() else None
    key = json.dumps({"path": str(path.resolve()) if stat else str(source.path), "size": stat.st_size if stat else 0,
                      "mtime": stat.st_mtime_ns if stat else 0, "config": config.to_hf_dict(),
                      "dtype": np.dtype(dtype).name}, sort_keys=True, default=str)
    return f"{(config.name or 'model').replace('/', '_')}-{np.dtype(dtype).name}-" \
           f"{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _write_layer(source, specs: dict[str, ParamSpec], dtype: np.dtype, path: Path) -> None:
    """One layer as a safetensors file, written under a temporary name and renamed when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tensors = {s.hf_name: np.ascontiguousarray(source.read(s.hf_name, dtype)) for s in specs.values()}
        write_safetensors(tensors, tmp)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write the offload folder {path.parent}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    """The safetensors format (a little-endian u64 header length, a JSON header, the raw bytes), bfloat16 included."""
    names = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
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
