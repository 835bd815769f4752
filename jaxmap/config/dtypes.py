"""Compute dtypes by name, and the default per platform.

float32 on CPU (XLA:CPU's bfloat16 matmuls are several times slower than float32 ones), bfloat16 on accelerators.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jaxmap.errors import UserError

DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
ALIASES = {"f32": "float32", "fp32": "float32", "bf16": "bfloat16", "f16": "float16", "fp16": "float16",
           "half": "float16"}


def parse_dtype(name) -> np.dtype:
    """A name (``"bf16"``), or a dtype object as JAX code passes one (``jnp.bfloat16``, ``np.float16``)."""
    if not isinstance(name, str):
        try:
            name = np.dtype(name).name
        except TypeError:
            raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def default_dtype(platform: str) -> np.dtype:
    return DTYPES["float32"] if platform == "cpu" else DTYPES["bfloat16"]
