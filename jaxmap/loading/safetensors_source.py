"""A Hugging Face model folder: ``config.json`` plus one or many ``*.safetensors`` files.

The safetensors format is simple enough to read without the library: 8 bytes of little-endian header length, a JSON
header mapping each tensor name to its dtype, shape and byte range, then the raw bytes. Parsing it ourselves lets
every header be checked against the file size when the folder is opened, so a truncated download fails at once with
a message naming the file instead of halfway through placing weights; the bytes are only touched, through a numpy
memory map, when a tensor is read.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

from jaxmap.config import ModelConfig
from jaxmap.errors import UserError
from jaxmap.families import (
    config_from_hf,
    fused_parts,
    interleaved_parts,
    layer_param_specs,
    missing_tensors,
    model_tensor_names,
    read_config_json,
    stacked_experts,
    wrapper_of,
)
from jaxmap.families.wrapped import Wrapper

if TYPE_CHECKING:
    from jaxmap.loading.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# safetensors dtype names -> numpy dtypes (little-endian, as the format mandates).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation refuses headers above 100 MB too


def as_numpy_dtype(dtype: np.dtype | str | type) -> np.dtype:
    """Accept numpy dtypes, ml_dtypes types and names such as ``"bfloat16"``."""
    if isinstance(dtype, str) and dtype.lower() in ("bfloat16", "bf16"):
        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(dtype)
    except TypeError:
        raise UserError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


# quantization_config.quant_method (transformers' QuantizationMethod values and a few more) -> the name users know.
QUANT_METHOD_NAMES = {
    "gptq": "GPTQ", "awq": "AWQ", "fp8": "FP8", "fbgemm_fp8": "FBGEMM FP8", "bitsandbytes": "bitsandbytes",
    "compressed-tensors": "compressed-tensors", "mxfp4": "MXFP4", "exl2": "EXL2", "aqlm": "AQLM", "hqq": "HQQ",
    "quanto": "Quanto", "eetq": "EETQ", "torchao": "torchao", "higgs": "HIGGS", "vptq": "VPTQ", "spqr": "SpQR",
    "bitnet": "BitNet", "fp_quant": "FP-Quant", "auto-round": "AutoRound", "modelopt": "NVIDIA ModelOpt",
    "quark": "Quark",
}


def check_not_prequantized(raw: object, folder: str | Path) -> None:
    """Refuse a Hugging Face checkpoint shipped pre-quantized (``quantization_config`` in its ``config.json``).

    Its weights are packed integers (GPTQ, AWQ, bitsandbytes...) or low-precision floats that only mean something
    with scales stored beside them (FP8, MXFP4...): read as plain floats they would load without complaint and make
    nonsense. ``raw`` is the config.json object as parsed, before :class:`ModelConfig` sees it. One format is read:
    gpt-oss's MXFP4 experts (``quant_method: mxfp4`` on a ``gpt_oss`` config), kept as MXFP4.
    """
    if not isinstance(raw, dict):
        return
    quant = raw.get("quantization_config")
    if quant is None or quant == {} or quant is False:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method is None and isinstance(quant, dict) and (quant.get("load_in_4bit") or quant.get("load_in_8bit")):
        method = "bitsandbytes"  # configs written before transformers recorded quant_method
    if isinstance(method, str) and method.strip().lower() == "mxfp4" and raw.get("model_type") == "gpt_oss":
        return  # gpt-oss's published MXFP4 experts: read as they are (SafetensorsSource._add_mxfp4)
    if isinstance(method, str) and method.strip():
        key = method.strip()
        name = QUANT_METHOD_NAMES.get(key.lower(), key)
        detail = f"quantization_config.quant_method = {json.dumps(key)}"
        fmt = quant.get("format") if isinstance(quant, dict) else None
        if isinstance(fmt, str) and fmt.strip() and len(fmt) <= 40:
            detail += f", format {json.dumps(fmt.strip())}"
        what = f"is pre-quantized with {name[:60]} ({detail[:200]})"
    else:
        what = "is pre-quantized (its config.json has a quantization_config)"
    raise UserError(f"{folder} {what}, which jaxmap does not read; use the original float checkpoint (jaxmap can "
                    f"quantize it itself with --isq) or a GGUF")


def read_hf_config(folder: str | Path) -> ModelConfig:
    """A Hugging Face folder's ``config.json`` as a :class:`ModelConfig`, refusing pre-quantized checkpoints first.

    What every reader of such a folder goes through: opening it to load (:class:`SafetensorsSource`) and reading
    its facts alone (``python -m jaxmap.plan -m FOLDER``, ``doctor -m FOLDER``).
    """
    folder = Path(folder)
    config_file = folder / "config.json"
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return read_config_json(config_file)  # which says what is wrong with the file
    if not isinstance(raw, dict):
        return read_config_json(config_file)
    check_not_prequantized(raw, folder)
    return config_from_hf(raw, name=folder.name)


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype_name: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def parse_header(path: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Read and validate one file's header: its tensors (absolute offsets) and its ``__metadata__``."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise UserError(f"{path} is truncated or corrupt: too short to be a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, _MAX_HEADER):
                raise UserError(f"{path} is truncated or corrupt: its header claims {length} bytes but the file "
                                f"has {size} bytes")
            raw = fh.read(length)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} is truncated or corrupt: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is truncated or corrupt: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    data_size = size - data_start
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        try:
            dtype_name = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path} is truncated or corrupt: malformed header entry for {name!r}") from None
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise UserError(f"{path}: tensor {name!r} has dtype {dtype_name!r}, which jaxmap cannot read")
        if end > data_size:
            raise UserError(f"{path} is truncated or corrupt: tensor {name!r} ends at byte {data_start + end} but "
                            f"the file has only {size} bytes (an incomplete download?)")
        if not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize or min(shape, default=1) < 0:
            raise UserError(f"{path} is truncated or corrupt: tensor {name!r} has inconsistent shape and offsets")
        entries[name] = _Entry(path, dtype_name, shape, data_start + begin, end - begin)
    return entries, {str(k): str(v) for k, v in metadata.items()}


class SafetensorsSource:
    """A :class:`~jaxmap.loading.source.WeightSource` over a Hugging Face model folder."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.path = str(folder)
        self.folder = folder
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise UserError(f"{folder} is a folder without config.json; expected a Hugging Face model folder")
        self.config: ModelConfig = read_hf_config(folder)  # refuses a pre-quantized checkpoint before any tensor
        # The model's own weights are floats (an integer one is a quantized format jaxmap lacks); other tensors
        # a folder may hold (integer buffers, say) are nobody's business until someone reads them as weights.
        self._weights = model_tensor_names(self.config)
        self._entries: dict[str, _Entry] = {}
        self.metadata: dict[str, str] = {}
        for file in self._weight_files():
            entries, metadata = parse_header(file)
            self.metadata.update(metadata)
            twice = sorted(set(entries) & set(self._entries))
            if twice:  # without an index nothing says which copy is meant: refuse rather than keep the last
                raise UserError(f"{folder}: tensor {twice[0]!r} appears in both {self._entries[twice[0]].file.name} "
                                f"and {file.name}; remove the stray file, or add model.safetensors.index.json")
            self._entries.update(entries)
        self._check_index()
        wrapper = wrapper_of(json.loads(config_file.read_text(encoding="utf-8")))
        if wrapper is not None:
            self._unwrap(wrapper)
        self._stored = set(self._entries)
        self._add_fused_parts()
        # MoE experts stored one tensor per expert, presented stacked [E, in, out] under the family's name (a copy
        # when read: one layer's experts at a time)
        self._stacks = {name: parts for name, parts in stacked_experts(self.config).items()
                        if all(p in self._entries for p in parts)}
        self._stored |= set(self._stacks)
        # Interleaved columns of a stored tensor (gpt-oss's gate and up in experts.gate_up_proj): strided views
        self._strided = {name: part for name, part in interleaved_parts(self.config).items()
                         if part[0] in self._entries}
        self._stored |= set(self._strided)
        self._mxfp4 = self._add_mxfp4()
        self._stored |= set(self._mxfp4)
        self._maps: dict[Path, np.memmap] = {}

    def _add_fused_parts(self) -> None:
        """The parts of fused tensors (Phi-3's qkv_proj) as entries of their own: a row range of a row-major
        tensor is a byte range of the file, so each part is read, mapped and viewed like any stored tensor."""
        for part, (stored, r0, r1, total) in fused_parts(self.config).items():
            entry = self._entries.get(stored)
            if entry is None:
                continue  # check_complete names it
            if not entry.shape or entry.shape[0] != total:
                raise UserError(f"{self.folder}: tensor {stored!r} has shape {entry.shape}, the config expects "
                                f"{total} rows (its fused parts); the checkpoint does not match its config")
            row = entry.nbytes // total
            self._entries[part] = _Entry(entry.file, entry.dtype_name, (r1 - r0, *entry.shape[1:]),
                                         entry.start + r0 * row, (r1 - r0) * row)

    def _add_mxfp4(self) -> dict[str, tuple[str, str, int, int]]:
        """Expert stacks stored in MXFP4 (gpt-oss's published checkpoints): ``<name>_blocks`` ``[E, out, in / 32,
        16]`` uint8 and ``<name>_scales`` ``[E, out, in / 32]`` E8M0 in place of the float ``<name>`` ``[E, in,
        out]``; an interleaved part (gate, up) is every ``step``-th output row of them. jaxmap name -> (blocks,
        scales, first row, step)."""
        out: dict[str, tuple[str, str, int, int]] = {}
        for spec in (s for i in range(self.config.num_hidden_layers)
                     for s in layer_param_specs(self.config, i).values() if s.role == "expert" and len(s.shape) == 3):
            stored, first, step = interleaved_parts(self.config).get(spec.hf_name, (spec.hf_name, 0, 1))
            blocks, scales = stored + "_blocks", stored + "_scales"
            if stored in self._entries or blocks not in self._entries or scales not in self._entries:
                continue
            e, rows, n_blocks, half = self._entries[blocks].shape
            if self._entries[scales].shape != (e, rows, n_blocks) or half != 16 or rows % step \
                    or (e, n_blocks * 32, rows // step) != spec.shape:
                raise UserError(f"{self.folder}: MXFP4 tensors {blocks!r} {self._entries[blocks].shape} and {scales!r} "
                                f"{self._entries[scales].shape} do not hold {spec.hf_name} {spec.shape} [E, in, out]")
            out[spec.hf_name] = (blocks, scales, first, step)
        return out

    def stored_qtype(self, name: str) -> str | None:
        """``MXFP4`` for the expert stacks a checkpoint stores in it (kept as they are), None for the rest."""
        return "MXFP4" if name in self._mxfp4 else None

    def native_nbytes(self) -> dict[str, int]:
        """Bytes of each tensor kept in its stored quantized type (the planner counts them so)."""
        return {name: self.stored_nbytes(name) for name in self._mxfp4}

    def _mxfp4_parts(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        blocks, scales, first, step = self._mxfp4[name]
        return self.view(blocks)[:, first::step], self.view(scales)[:, first::step]

    def read_qstack(self, name: str):
        """An MXFP4 expert stack as a host QTensor stack (one ``[out, in]`` per expert), its blocks repacked, never
        through float."""
        from jaxmap.quant import stack
        from jaxmap.quant.mxfp4 import from_blocks

        blocks, scales = self._mxfp4_parts(name)
        return stack([from_blocks(blocks[e], scales[e]) for e in range(blocks.shape[0])])

    def check_complete(self) -> None:
        """Refuse a folder that lacks a tensor its config's model needs (before planning, not halfway through
        loading)."""
        missing = missing_tensors(self.config, self._stored)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UserError(f"{self.folder} lacks the tensor {missing[0].hf_name!r}{more}, which the model its "
                            "config.json describes needs; the checkpoint is incomplete or does not match its config")

    def _unwrap(self, wrapper: Wrapper) -> None:
        """Rename a wrapped text model's tensors to the family's names and drop the parts jaxmap leaves out (Gemma
        3's vision tower), saying so in one line."""
        entries: dict[str, _Entry] = {}
        left_out: dict[str, list[int]] = {}
        for stored, entry in self._entries.items():
            name = wrapper.text_name(stored)
            if name is None:
                part = left_out.setdefault(wrapper.part_of(stored) or "rest", [0, 0])
                part[0] += 1
                part[1] += entry.nbytes
                continue
            if name in entries:
                raise UserError(f"{self.folder}: tensor {name!r} is stored twice (as {stored!r} and under another "
                                "prefix); the checkpoint mixes two naming schemes")
            entries[name] = entry
        self._entries = entries
        self._index = {wrapper.text_name(k) or k: v for k, v in self._index.items()}
        if left_out:
            parts = ", ".join(f"the {what} ({n} tensors, {nbytes / 2**20:.1f} MiB)"
                              for what, (n, nbytes) in left_out.items())
            log.info("%s is a %s checkpoint: running its text model; left out %s", self.folder.name,
                     wrapper.architectures[0], parts)

    def _weight_files(self) -> list[Path]:
        """The files to open: those the index names, else ``model.safetensors``, else every ``*.safetensors``."""
        index_file = self.folder / "model.safetensors.index.json"
        if index_file.is_file():
            try:
                index = json.loads(index_file.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise UserError(f"{index_file} is not valid JSON (not UTF-8 text)") from None
            except json.JSONDecodeError as exc:
                raise UserError(f"{index_file} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
            except OSError as exc:
                raise UserError(f"cannot read {index_file}: {exc.strerror or exc}") from None
            try:
                weight_map = index["weight_map"]
                files = sorted({str(v) for v in weight_map.values()})
            except (KeyError, TypeError, AttributeError):
                raise UserError(f"{index_file} is not a valid safetensors index (no weight_map)") from None
            # by name, not by resolved path: a Hugging Face cache snapshot's files are symlinks into ../blobs
            outside = [f for f in files if Path(f).is_absolute() or ".." in Path(f).parts]
            if outside:
                raise UserError(f"{index_file} refers to {outside[0]}, outside the model folder; an index names "
                                f"files in its own folder")
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise UserError(f"{index_file} refers to {missing[0]}, which is not in {self.folder}")
            self._index = dict(weight_map)
            return [self.folder / f for f in files]
        self._index = {}
        single = self.folder / "model.safetensors"
        if single.is_file():
            return [single]
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.folder} has config.json but no *.safetensors weights")
        return files

    def _check_index(self) -> None:
        for name, file in self._index.items():
            entry = self._entries.get(name)
            if entry is None or entry.file.name != Path(file).name:
                raise UserError(f"{self.folder}: the index says {name!r} is in {file}, but that file has no such "
                                "tensor (corrupt or mismatched shards)")

    # ---- WeightSource --------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every stored tensor, the parts of fused ones and stacks of per-expert ones under the family's names."""
        return list(self._entries) + list(self._stacks) + list(self._strided) + list(self._mxfp4)

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            where = f" (the index names {self._index[name]})" if name in self._index else ""
            raise UserError(f"{self.folder} has no tensor {name!r}{where}")
        return entry

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._mxfp4:
            e, rows, n_blocks, _ = self._entry(self._mxfp4[name][0]).shape
            return (e, n_blocks * 32, rows // self._mxfp4[name][3])
        if name in self._strided:
            stored, first, step = self._strided[name]
            *lead, cols = self._entry(stored).shape
            return (*lead, len(range(first, cols, step)))
        if name in self._stacks:
            parts = self._stacks[name]
            return (len(parts), *reversed(self._entry(parts[0]).shape))
        return self._entry(name).shape

    def stored_nbytes(self, name: str) -> int:
        if name in self._mxfp4:
            blocks, scales, _, step = self._mxfp4[name]
            return (self._entry(blocks).nbytes + self._entry(scales).nbytes) // step
        if name in self._strided:
            stored = self._strided[name][0]
            return self._entry(stored).nbytes // math.prod(self._entry(stored).shape) * math.prod(self.shape(name))
        if name in self._stacks:
            return sum(self._entry(p).nbytes for p in self._stacks[name])
        return self._entry(name).nbytes

    def stored_type(self, name: str) -> str:
        if name in self._mxfp4:
            return "MXFP4"
        if name in self._strided:
            return self._entry(self._strided[name][0]).dtype_name
        return self._entry(self._stacks[name][0] if name in self._stacks else name).dtype_name

    def view(self, name: str) -> np.ndarray:
        """A read-only, zero-copy view of the tensor in its stored dtype (backed by the memory map); a stack of
        per-expert tensors is a copy, each expert transposed to ``[in, out]``."""
        if name in self._stacks:
            return np.stack([self.view(p).T for p in self._stacks[name]])
        if name in self._mxfp4:  # dequantized (a copy): [E, in, out]
            from jaxmap.quant.mxfp4 import dequantize_blocks

            return np.swapaxes(dequantize_blocks(*self._mxfp4_parts(name)), 1, 2)
        if name in self._strided:  # a strided (non-contiguous) view; read() copies it
            stored, first, step = self._strided[name]
            return self.view(stored)[..., first::step]
        entry = self._entry(name)
        if SAFETENSORS_DTYPES[entry.dtype_name].kind in "iub" and name in self._weights:
            raise UserError(f"{entry.file}: tensor {name!r} is stored as {entry.dtype_name}; jaxmap reads "
                            f"floating-point weights (F32, F16, BF16, F8), not integer-quantized checkpoints")
        mm = self._maps.get(entry.file)
        if mm is None:
            try:
                mm = self._maps[entry.file] = np.memmap(entry.file, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as exc:
                raise UserError(f"cannot map {entry.file}: {exc}") from None
        if entry.start + entry.nbytes > mm.size:  # the file shrank since it was opened
            raise UserError(f"{entry.file} is truncated or corrupt: tensor {name!r} lies past the end of the file")
        raw = mm[entry.start:entry.start + entry.nbytes]
        return raw.view(SAFETENSORS_DTYPES[entry.dtype_name]).reshape(entry.shape)

    def expert_parts(self, name: str) -> list[str]:
        """The per-expert tensors a stacked expert name stands for, in expert order (so a caller can read only the
        experts it needs, each one ``[out, in]``: the disk tier's routed experts)."""
        if name not in self._stacks:
            raise UserError(f"{self.folder}: {name!r} is not stored one tensor per expert")
        return list(self._stacks[name])

    def read(self, name: str, dtype: np.dtype | str = np.float32) -> np.ndarray:
        return np.array(self.view(name), dtype=as_numpy_dtype(dtype), order="C", copy=True)

    def tokenizer(self) -> Tokenizer | None:
        from jaxmap.loading.tokenizer import Tokenizer

        file = self.folder / "tokenizer.json"
        if not file.is_file():
            return None
        return Tokenizer.from_file(file, config_eos=self.config.eos_token_ids, config_bos=self.config.bos_token_id)

    def close(self) -> None:
        # np.memmap closes its mapping when the last view goes; dropping ours is all that is needed.
        self._maps.clear()

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
