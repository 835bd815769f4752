"""jaxmap's own reader of GGUF files: metadata and tensor index parsed in bulk from a memory map.

``gguf.GGUFReader`` builds a handful of numpy objects for every metadata item, which for a vocabulary of 262k tokens
takes many seconds. Here fixed-size arrays are one ``np.frombuffer`` each and a string array is one Python walk over
its length prefixes (the only sequential part: each length says where the next one is) followed by a single UTF-8
decode and split of all its bytes, so opening a 262k-token file takes tens of milliseconds.

Values: scalars are Python ``int``/``float``/``bool``/``str``; arrays of numbers are read-only-by-convention numpy
arrays (little-endian dtypes, copied out of the file); arrays of strings are ``list[str]``; arrays of arrays are
lists of those. Values are shared between readers of the same file (see :func:`open_gguf`): do not modify them.

The parse of a file is kept for the process (at most a few files), keyed by resolved path, size, modification time
and inode, and checked against the header's bytes, so that opening a file twice (the tokenizer check before a
load, then the load) parses it once. Every failure is a :class:`GGUFFormatError`, one line naming what is wrong.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaxmap.errors import UserError
from jaxmap.loading.gguf_layout import extent_problem, tensor_sizes, version_of

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"

# GGUF value types (gguf.GGUFValueType): scalar ones as struct formats and numpy dtypes.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_FORMATS = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f", BOOL: "?",
            UINT64: "Q", INT64: "q", FLOAT64: "d"}
_STRUCTS = {kind: struct.Struct("<" + fmt) for kind, fmt in _FORMATS.items()}
_DTYPES = {kind: np.dtype("<" + fmt) if fmt != "?" else np.dtype(np.bool_) for kind, fmt in _FORMATS.items()}
_INTEGER_KINDS = (UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64)
# ggml types gguf.GGUFReader hands out as typed arrays; every other type is rows of bytes (what gguf.quants reads).
_TYPED = {0: np.dtype("<f4"), 1: np.dtype("<f2"), 24: np.dtype("i1"), 25: np.dtype("<i2"), 26: np.dtype("<i4"),
          27: np.dtype("<i8"), 28: np.dtype("<f8")}
_U32, _U64 = _STRUCTS[UINT32], _STRUCTS[UINT64]
_CACHE_SIZE = 4


class GGUFFormatError(UserError):
    """A file that is not a GGUF file jaxmap reads; ``problem`` is the text after the path."""

    def __init__(self, path: Path | str, problem: str, corrupt: bool = True):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path} is truncated or corrupt: {problem}" if corrupt else f"{path} {problem}")


class _Short(Exception):
    """The file ends inside the part being read."""


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor index. ``dims`` are in ggml order (fastest first), ``shape`` in numpy order."""

    name: str
    ggml_type: int
    type_name: str
    dims: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.dims[::-1]

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


@dataclass(frozen=True)
class _Parsed:
    """What a file's header says: kept in the process cache, independent of any open mapping."""

    version: int
    metadata: dict[str, Any]
    value_types: dict[str, tuple[int, ...]]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_start: int
    header: bytes  # the bytes parsed, to check a cached parse still describes the file
    stamp: tuple[int, ...]
    # what readers built from the metadata alone (the tokenizer), kept as long as this parse is
    derived: dict[str, Any] = field(default_factory=dict)


class GGUFFile:
    """An open GGUF file: ``metadata``, ``value_types`` (key -> GGUF value type, then element types for arrays),
    ``tensors`` (name -> :class:`TensorInfo`, in file order) and :meth:`tensor_data` views of the mapped bytes."""

    def __init__(self, path: Path, parsed: _Parsed, mapping: mmap.mmap, size: int):
        self.path = path
        self.size = size
        self.version = parsed.version
        self.metadata: dict[str, Any] = dict(parsed.metadata)
        self.value_types = parsed.value_types
        self.tensors: dict[str, TensorInfo] = parsed.tensors
        self.alignment = parsed.alignment
        self.data_start = parsed.data_start
        self._mmap: mmap.mmap | None = mapping
        self._bytes: np.ndarray | None = np.frombuffer(mapping, np.uint8)
        self._parsed = parsed

    def derived(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()``, built once per parse of the unchanged file: a process that opens the file twice (generate
        checks the tokenizer before loading) builds what depends on the metadata only once."""
        cache = self._parsed.derived
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def _data(self) -> np.ndarray:
        if self._bytes is None:
            raise UserError(f"{self.path} was closed")
        return self._bytes

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The tensor's stored bytes, flat ``uint8``, a view of the mapped file."""
        t = self.tensors[name]
        return self._data()[t.offset:t.offset + t.nbytes]

    def tensor_data(self, name: str) -> np.ndarray:
        """The tensor as ``gguf.GGUFReader`` gives it: F32/F16/F64/I8..I64 as typed arrays in numpy order, every
        other type (quantized, and BF16) as ``uint8`` rows ``[..., bytes per row]``, which ``gguf.quants`` reads."""
        t = self.tensors[name]
        raw = self.tensor_bytes(name)
        typed = _TYPED.get(t.ggml_type)
        if typed is not None:
            return raw.view(typed).reshape(t.shape)
        return raw.reshape(*t.shape[:-1], -1) if t.shape else raw

    def drop_pages(self) -> None:
        """Let the kernel drop the file pages read so far (clean pages, read again on demand)."""
        if self._mmap is not None and hasattr(mmap, "MADV_DONTNEED"):
            try:
                self._mmap.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        """Drop the mapping; views handed out keep it alive until they go."""
        mapping, self._mmap, self._bytes = self._mmap, None, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:  # a tensor view still uses it: it is unmapped when the last one goes
                pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_cache: dict[str, _Parsed] = {}


def open_gguf(path: str | Path) -> GGUFFile:
    """Open and parse ``path`` (or reuse this process's parse of the unchanged file)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            st = os.fstat(fh.fileno())
            head = fh.read(8)
            if head[:4] != MAGIC:
                raise GGUFFormatError(path, "is not a GGUF file (it does not start with 'GGUF')", corrupt=False)
            if len(head) < 8:
                raise GGUFFormatError(path, f"it ends inside its header (the file has {st.st_size} bytes)")
            number, order = version_of(head[4:8])
            if order != "<":
                raise GGUFFormatError(path, f"is a big-endian GGUF file (version {number}), which jaxmap does not "
                                            "read; convert the model again on a little-endian machine", corrupt=False)
            if number not in VERSIONS:
                raise GGUFFormatError(path, f"is GGUF version {number}, which jaxmap does not read (versions "
                                            f"{', '.join(map(str, VERSIONS))}; convert it again with a current "
                                            "llama.cpp)", corrupt=False)
            mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    size = len(mapping)
    key = str(path.resolve())
    stamp = (size, st.st_mtime_ns, st.st_ino, st.st_dev)
    parsed = _cache.get(key)
    if parsed is None or parsed.stamp != stamp or mapping[:len(parsed.header)] != parsed.header:
        try:
            parsed = _parse(path, mapping, number, stamp)
        except BaseException:
            mapping.close()
            raise
        _cache.pop(key, None)
        while len(_cache) >= _CACHE_SIZE:
            _cache.pop(next(iter(_cache)))
        _cache[key] = parsed
    return GGUFFile(path, parsed, mapping, size)


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf: mmap.mmap, pos: int):
        self.buf, self.pos, self.size = buf, pos, len(buf)

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Short

    def scalar(self, kind: int) -> Any:
        s = _STRUCTS[kind]
        self.need(s.size)
        value = s.unpack_from(self.buf, self.pos)[0]
        self.pos += s.size
        return value

    def u32(self) -> int:
        return self.scalar(UINT32)

    def u64(self) -> int:
        return self.scalar(UINT64)

    def raw_string(self) -> bytes:
        n = self.u64()
        self.need(n)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8 text") from None


def _value(cur: _Cursor, kind: int, types: list[int]) -> Any:
    """One metadata value of GGUF type ``kind``; ``types`` collects the (element) types met on the way."""
    types.append(kind)
    if kind in _STRUCTS:
        return cur.scalar(kind)
    if kind == STRING:
        return _text(cur.raw_string(), "its value")
    if kind != ARRAY:
        raise ValueError(f"an unknown value type {kind}")
    item, count = cur.u32(), cur.u64()
    if item in _DTYPES:
        dtype = _DTYPES[item]
        cur.need(count * dtype.itemsize)
        out = np.frombuffer(cur.buf, dtype, count, cur.pos).copy()
        cur.pos += count * dtype.itemsize
        types.append(item)
        return out
    if item == STRING:
        types.append(item)
        return _strings(cur, count)
    if item != ARRAY:
        raise ValueError(f"an array of unknown value type {item}")
    cur.need(count * 12)  # each inner array takes at least its type and count
    inner: list[int] = []
    out = [_value(cur, ARRAY, inner if i == 0 else []) for i in range(count)]
    types.extend(inner or [ARRAY])
    return out


def _strings(cur: _Cursor, count: int) -> list[str]:
    """``count`` length-prefixed strings from the cursor, decoded in bulk.

    The walk over the length prefixes is the one loop per string. Then every prefix's first byte is set to a byte
    that no string holds (\\x00 almost always), its other 7 bytes are dropped, and the whole run is decoded once
    and split on that byte. Strictly decoding the joined bytes succeeds exactly when each string is valid UTF-8 on
    its own, since the separators are ASCII.
    """
    cur.need(count * 8)
    if count == 0:
        return []
    unpack, buf = _U64.unpack_from, cur.buf
    start = pos = cur.pos
    heads = []
    append = heads.append
    try:
        for _ in range(count):
            append(pos)
            pos += 8 + unpack(buf, pos)[0]
    except (struct.error, OverflowError):
        raise _Short from None
    if pos > cur.size:
        raise _Short
    cur.pos = pos
    rel = np.asarray(heads, np.int64) - start
    keep = np.ones(pos - start, bool)
    for k in range(1, 8):
        keep[rel + k] = False
    joined = np.frombuffer(buf, np.uint8, pos - start, start)[keep]
    seps = rel - 7 * np.arange(count, dtype=np.int64)  # where each prefix's kept byte landed
    joined[seps] = 0
    sep = 0
    if np.count_nonzero(joined == 0) != count:
        sep = next((c for c in range(1, 128) if not np.count_nonzero(joined == c)), None)
        if sep is None:  # every ASCII byte occurs in some string: decode them one by one
            return _one_by_one(joined.tobytes(), seps, count)
        joined[seps] = sep
    try:
        text = joined.tobytes().decode("utf-8")
    except UnicodeDecodeError:
        return _one_by_one(joined.tobytes(), seps, count)  # names the first string that is not UTF-8
    out = text.split(chr(sep))
    del out[0]
    return out


def _one_by_one(raw: bytes, seps: np.ndarray, count: int) -> list[str]:
    """Each string of ``raw`` (one separator byte at each of ``seps`` before it) decoded on its own."""
    ends = np.append(seps[1:], len(raw)).tolist()
    return [_text(raw[s + 1:e], f"string {i + 1} of its {count}")
            for i, (s, e) in enumerate(zip(seps.tolist(), ends, strict=True))]


def _parse(path: Path, buf: mmap.mmap, version: int, stamp: tuple[int, ...]) -> _Parsed:
    size = len(buf)
    cur = _Cursor(buf, 8)
    try:
        tensor_count, kv_count = cur.u64(), cur.u64()
    except _Short:
        raise GGUFFormatError(path, f"it ends inside its header (the file has {size} bytes)") from None
    metadata: dict[str, Any] = {}
    value_types: dict[str, tuple[int, ...]] = {}
    alignment = DEFAULT_ALIGNMENT
    for i in range(kv_count):
        key = None
        try:
            key = _text(cur.raw_string(), "a metadata key")
            types: list[int] = []
            value = _value(cur, cur.u32(), types)
        except _Short:
            raise GGUFFormatError(path, f"it ends inside its metadata, at entry {i + 1} of the {kv_count} its header "
                                        f"lists (the file has {size} bytes)") from None
        except ValueError as exc:
            where = f"its metadata entry {key!r}" if key is not None else f"its metadata entry {i + 1}"
            raise GGUFFormatError(path, f"{where} has {exc}" if str(exc).startswith("an ") else f"{where}: {exc}") \
                from None
        if key in metadata:
            raise GGUFFormatError(path, f"its metadata key {key!r} appears twice")
        if key == ALIGNMENT_KEY:
            if types[0] not in _INTEGER_KINDS or isinstance(value, bool) or value <= 0 or value & (value - 1):
                raise GGUFFormatError(path, f"its {ALIGNMENT_KEY} is {value!r}, not a power of two")
            alignment = value
        metadata[key] = value
        value_types[key] = tuple(types)
    index = []
    for i in range(tensor_count):
        try:
            name = _text(cur.raw_string(), "a tensor name")
            n_dims = cur.u32()
            cur.need(8 * n_dims)
            dims = tuple(np.frombuffer(buf, "<u8", n_dims, cur.pos).tolist())
            cur.pos += 8 * n_dims
            index.append((name, dims, cur.u32(), cur.u64()))
        except _Short:
            raise GGUFFormatError(path, f"it ends inside its tensor index, at tensor {i + 1} of the {tensor_count} "
                                        f"its header lists (the file has {size} bytes)") from None
        except ValueError as exc:
            raise GGUFFormatError(path, f"tensor {i + 1} of its index: {exc}") from None
    header_end = cur.pos
    data_start = -(-header_end // alignment) * alignment
    return _Parsed(version, metadata, value_types, _tensors(path, index, data_start, size), alignment, data_start,
                   buf[:header_end], stamp)


def _type_names() -> dict[int, str]:
    from gguf.constants import GGMLQuantizationType

    return {int(t): t.name for t in GGMLQuantizationType}


def _tensors(path: Path, index: list[tuple[str, tuple[int, ...], int, int]], data_start: int,
             size: int) -> dict[str, TensorInfo]:
    """The tensor index checked: known types, whole blocks per row, and every tensor's bytes inside the file."""
    sizes, names = tensor_sizes(), _type_names()
    out: dict[str, TensorInfo] = {}
    for name, dims, kind, offset in index:
        if name in out:
            raise GGUFFormatError(path, f"tensor {name} appears twice in its index")
        if kind not in sizes:
            raise GGUFFormatError(path, f"tensor {name} has ggml type {kind}, which the installed gguf package does "
                                        "not know")
        block, block_bytes = sizes[kind]
        type_name = names.get(kind, f"type {kind}")
        if not dims:
            raise GGUFFormatError(path, f"tensor {name} has no dimensions")
        elements = 1
        for d in dims:
            elements *= d
        if elements <= 0:
            raise GGUFFormatError(path, f"tensor {name} has no elements")
        if dims[0] % block:
            raise GGUFFormatError(path, f"tensor {name} has rows of {dims[0]} elements, not a whole number of "
                                        f"{type_name} blocks of {block}")
        info = TensorInfo(name, kind, type_name, dims, data_start + offset, elements // block * block_bytes)
        problem = extent_problem(name, type_name, info.offset, info.nbytes, size)
        if problem:
            raise GGUFFormatError(path, problem)
        out[name] = info
    return out
