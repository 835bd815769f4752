"""Why a GGUF file cannot be read, said in the file's own terms.

gguf's reader reports a damaged file through numpy's internals ("cannot reshape array of size 399424 into shape
(576,960)", "index 0 is out of bounds"). This module walks the same layout (header, metadata, tensor index, aligned
tensor data) with a bounds check at every step, so that the error names where the header ends early, or which
tensor's bytes lie past the end of the file and how many bytes it needs against how many are there. It runs only
after the reader failed (or to check a reader's tensors), so a good file pays nothing for it.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

from jaxmap.errors import UserError

DEFAULT_ALIGNMENT = 32
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9
_ALIGNMENT_KEY = "general.alignment"


class _Short(Exception):
    """The file ends inside the part being read."""


class _Cursor:
    """Bounds-checked reads over the mapped file, in its byte order."""

    def __init__(self, data: mmap.mmap | bytes, order: str):
        self.data, self.order, self.pos = data, order, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _Short
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return struct.unpack(self.order + "I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(self.order + "Q", self.take(8))[0]

    def string(self) -> str:
        return self.take(self.u64()).decode("utf-8", errors="replace")

    def skip_value(self, kind: int) -> int | None:
        """Step over one metadata value; an unsigned integer value is returned (for general.alignment)."""
        if kind in _SCALAR_SIZES:
            raw = self.take(_SCALAR_SIZES[kind])
            return int.from_bytes(raw, "little" if self.order == "<" else "big") if kind in (4, 10) else None
        if kind == _STRING:
            self.take(self.u64())
            return None
        if kind != _ARRAY:
            raise ValueError(f"unknown value type {kind}")
        item, count = self.u32(), self.u64()
        if item in _SCALAR_SIZES:
            self.take(count * _SCALAR_SIZES[item])
            return None
        if count * 8 > len(self.data) - self.pos:  # every string or array item takes at least 8 bytes
            raise _Short
        for _ in range(count):
            self.skip_value(item)
        return None


def version_of(raw: bytes) -> tuple[int, str]:
    """The version and byte order (``<`` or ``>``) from the 4 bytes after the magic, as gguf's reader decides them:
    a little-endian read whose low half is zero means a big-endian file."""
    number = int.from_bytes(raw, "little")
    if number & 0xFFFF == 0:
        return int.from_bytes(raw, "big"), ">"
    return number, "<"


def tensor_sizes() -> dict[int, tuple[int, int]]:
    """ggml type number -> (elements per block, bytes per block), from the installed gguf package."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(t): (int(block), int(nbytes)) for t, (block, nbytes) in GGML_QUANT_SIZES.items()}


def _type_name(number: int) -> str:
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(number).name
    except ValueError:
        return f"type {number}"


def extent_problem(name: str, type_name: str, start: int, nbytes: int, size: int) -> str | None:
    """The message for a tensor whose bytes ``[start, start + nbytes)`` do not fit a file of ``size`` bytes."""
    if start + nbytes <= size:
        return None
    there = max(0, size - start)
    return (f"tensor {name} ({type_name}) needs {nbytes} bytes from byte {start} but only {there} are there "
            f"(the file has {size} bytes; an incomplete download?)")


def _metadata(cur: _Cursor, count: int) -> int:
    """Walk the metadata entries; return the data alignment."""
    alignment, seen = DEFAULT_ALIGNMENT, set()
    for i in range(count):
        where = f"metadata, at entry {i + 1} of the {count} its header lists"
        try:
            key = cur.string()
            value = cur.skip_value(cur.u32())
        except _Short:
            raise _Short(where) from None
        except ValueError as exc:
            raise UserError(f"its metadata entry {key!r} has an {exc}") from None
        if key in seen:
            raise UserError(f"its metadata key {key!r} appears twice")
        seen.add(key)
        if key == _ALIGNMENT_KEY:
            if not value or value & (value - 1):
                raise UserError(f"its {_ALIGNMENT_KEY} is {value}, not a power of two")
            alignment = value
    return alignment


def _tensor_index(cur: _Cursor, count: int) -> list[tuple[str, int, int, int]]:
    """Walk the tensor index: (name, ggml type, element count, offset in the data section) per tensor."""
    tensors = []
    for i in range(count):
        try:
            name = cur.string()
            dims = [cur.u64() for _ in range(cur.u32())]
            kind, offset = cur.u32(), cur.u64()
        except _Short:
            raise _Short(f"tensor index, at tensor {i + 1} of the {count} its header lists") from None
        tensors.append((name, kind, math.prod(dims), offset))
    return tensors


def _check_tensors(tensors: list[tuple[str, int, int, int]], data_start: int, size: int) -> None:
    sizes, names = tensor_sizes(), set()
    for name, kind, elements, offset in tensors:
        if name in names:
            raise UserError(f"tensor {name} appears twice in its index")
        names.add(name)
        if kind not in sizes:
            raise UserError(f"tensor {name} has ggml type {kind}, which the installed gguf package does not know")
        block, nbytes = sizes[kind]
        if elements % block:
            raise UserError(f"tensor {name} has {elements} elements, not a whole number of {_type_name(kind)} "
                            f"blocks of {block}")
        problem = extent_problem(name, _type_name(kind), data_start + offset, elements // block * nbytes, size)
        if problem:
            raise UserError(problem)


def diagnose(path: Path) -> str | None:
    """What is wrong with the GGUF file at ``path`` (the text after "is truncated or corrupt: "), or None when its
    layout looks whole (the trouble is then elsewhere)."""
    try:
        with path.open("rb") as fh:
            size = path.stat().st_size
            data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except (OSError, ValueError):
        return None
    try:
        cur = _Cursor(data, "<")
        cur.take(4)
        _, cur.order = version_of(cur.take(4))
        try:
            tensor_count, kv_count = cur.u64(), cur.u64()
        except _Short:
            raise _Short("header") from None
        alignment = _metadata(cur, kv_count)
        tensors = _tensor_index(cur, tensor_count)
        data_start = -(-cur.pos // alignment) * alignment
        _check_tensors(tensors, data_start, size)
    except _Short as short:
        return f"it ends inside its {short.args[0] if short.args else 'header'} (the file has {size} bytes)"
    except UserError as exc:
        return str(exc)
    finally:
        if isinstance(data, mmap.mmap):
            data.close()
    return None
