"""llama.cpp's importance-matrix files, read into jaxmap's :class:`~jaxmap.imatrix.Imatrix`.

Published quantizations often come with the imatrix llama.cpp measured for them, and a user who already has one
should not need to measure it again. ``llama-imatrix`` writes two formats, both holding per weight (GGUF names:
``blk.3.attn_q.weight``) the sum of each input's squared activation and how many calls it summed:

- GGUF (``general.type = imatrix``): tensors ``NAME.in_sum2`` ``[n_mat, n_in]`` and ``NAME.counts`` ``[n_mat, 1]``
  (``n_mat`` > 1 only for mixture-of-experts stacks), with ``imatrix.chunk_count`` / ``imatrix.chunk_size``;
- the legacy ``.dat``: little-endian ``int32 n_entries``, then per entry ``int32 len, name, int32 ncall,
  int32 nval, float32[nval]`` (already ``mean * ncall``), then optionally ``int32 chunks, int32 len, dataset``.

The mean squared activation is the sum over its count, as ``llama-quantize`` computes it (a zero count reads as 1
there for GGUF files). Names are mapped to Hugging Face names with the GGUF loader's table; entries jaxmap has no
weight for (expert stacks, other architectures' tensors) are skipped and counted in a log line.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np

from jaxmap.errors import UserError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
_SUM, _COUNT = ".in_sum2", ".counts"
_MAX_NAME = 1 << 12  # no tensor name is longer; a larger length means this is not a legacy imatrix


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _hf(name: str) -> str | None:
    from jaxmap.families import gguf_name_to_hf

    return gguf_name_to_hf(name)


def _finish(path: Path, means: dict[str, np.ndarray], tokens: int, fmt: str):
    """Map names and skip what jaxmap has no weight for: ``(values by Hugging Face name, tokens)``, which
    :meth:`jaxmap.loading.imatrix_file.Imatrix.load` wraps."""
    values, skipped = {}, []
    for name, v in means.items():
        hf = _hf(name)
        if hf is None or v.ndim != 1:
            skipped.append(name)
            continue
        if not np.isfinite(v).all() or (v < 0).any():
            raise UserError(f"cannot read imatrix {path}: entry {name!r} holds negative or non-finite sums")
        values[hf] = v.astype(np.float32)
    if not values:
        raise UserError(f"cannot read imatrix {path}: none of its {len(means)} entries names a weight jaxmap knows "
                        f"(the GGUF tensor names of a model family jaxmap reads)")
    if skipped:
        log.info("imatrix %s: skipped %d llama.cpp entries with no matching weight (e.g. %s)", path, len(skipped),
                 skipped[0])
    log.info("imatrix %s: llama.cpp %s format, %d weights", path, fmt, len(values))
    return values, tokens


def read_gguf(path: Path):
    """A GGUF imatrix (``llama-imatrix --output-format gguf``, the default in current llama.cpp)."""
    from jaxmap.loading.gguf_reader import GGUFFormatError, open_gguf

    try:
        reader = open_gguf(path)
    except GGUFFormatError as exc:
        raise UserError(f"cannot read imatrix {path}: a damaged GGUF file ({exc.problem})") from None
    sums, counts = {}, {}
    try:
        for t in reader.tensors.values():
            for suffix, into in ((_SUM, sums), (_COUNT, counts)):
                if t.name.endswith(suffix):
                    if t.type_name != "F32":
                        raise UserError(f"cannot read imatrix {path}: {t.name} is {t.type_name}, not F32")
                    into[t.name[: -len(suffix)]] = np.array(reader.tensor_data(t.name), np.float32).reshape(-1)
    finally:
        reader.close()
    if not sums and not counts:
        kind = _field_str(reader, "general.type")
        raise UserError(f"cannot read imatrix {path}: a GGUF file without .in_sum2/.counts tensors"
                        + (f" (general.type is {kind!r})" if kind else "") + "; pass llama-imatrix's output")
    unpaired = sorted(set(sums) ^ set(counts))
    if unpaired:
        raise UserError(f"cannot read imatrix {path}: {unpaired[0]} has sums without counts or counts without sums")
    means = {}
    for name, s in sums.items():
        c = counts[name]
        if c.size == 0 or s.size % c.size:
            raise UserError(f"cannot read imatrix {path}: {name} has {s.size} sums for {c.size} counts")
        per = s.reshape(c.size, -1)
        mean = np.where(c[:, None] > 0, per / np.where(c > 0, np.rint(c), 1)[:, None], 1.0)
        means[name] = mean[0] if c.size == 1 else mean
    chunks, size = _field_int(reader, "imatrix.chunk_count"), _field_int(reader, "imatrix.chunk_size")
    return _finish(path, means, chunks * size, "GGUF")


def _field_int(reader, key: str) -> int:
    value = reader.metadata.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _field_str(reader, key: str) -> str | None:
    value = reader.metadata.get(key)
    return value if isinstance(value, str) else None


def read_legacy(path: Path):
    """A legacy ``.dat`` / ``.imatrix`` binary (``llama-imatrix --output-format dat``, the only one before 2025)."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise UserError(f"cannot read imatrix {path}: it ends mid-entry (truncated, or not an importance "
                            f"matrix: jaxmap reads its own .npz and llama.cpp's GGUF or .dat imatrix files)")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > len(data) // 16:
        raise UserError(f"cannot read imatrix {path}: not an importance matrix (jaxmap reads its own .npz and "
                        f"llama.cpp's GGUF or .dat imatrix files)")
    means = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length <= _MAX_NAME:
            raise UserError(f"cannot read imatrix {path}: an entry name of {length} bytes; the file is damaged")
        (raw,) = take(f"<{length}s")
        ncall, nval = take("<ii")
        if nval < 1:
            raise UserError(f"cannot read imatrix {path}: entry {raw!r} has {nval} values; the file is damaged")
        if pos + 4 * nval > len(data):
            take(f"<{nval}f")  # the truncation error
        sums = np.frombuffer(data, "<f4", nval, pos).astype(np.float32)
        pos += 4 * nval
        name = raw.decode("utf-8", "replace")
        means[name] = sums / ncall if ncall > 0 else sums
    chunks = take("<i")[0] if pos + 4 <= len(data) else 0
    del chunks  # chunks of an unrecorded size: no token count to report
    return _finish(path, means, 0, "legacy .dat")


def read(path: Path):
    """A llama.cpp imatrix file of either format."""
    return read_gguf(path) if is_gguf(path) else read_legacy(path)
