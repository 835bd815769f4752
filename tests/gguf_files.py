"""Small GGUF files written with gguf's own writer, for tests of what jaxmap makes of them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


def write_gguf(path: Path, tensors: dict[str, np.ndarray], arch: str = "llama",
               metadata: Callable | None = None) -> Path:
    """``tensors`` as a GGUF file of ``arch``; ``metadata(writer)`` adds key-value entries before the header."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch=arch)
    if metadata is not None:
        metadata(w)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
