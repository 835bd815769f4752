"""Weight-only quantization, in three parts: :mod:`~jaxmap.quant.types` (the jax-free table of types and their
bytes, which the planner reads), :mod:`~jaxmap.quant.core` (packed storage, host quantizers, GGUF repacking,
the jitted kernels). Names are re-exported lazily, so importing the types imports no jax.
"""

from __future__ import annotations

import importlib

_TYPES = (
    'QType', 'QTYPES', 'FALLBACK', '_ALIASES', '_planes', 'parse_isq', 'fits', 'misfit_reason', 'choose_type',
    'row_bits', 'tensor_nbytes', 'row_classes', 'IMPORTANCE_TYPES', 'GGUF_NATIVE', 'gguf_to_jaxmap_type',
    'fitted_type',
)


def __getattr__(name: str):
    module = "jaxmap.quant.types" if name in _TYPES else "jaxmap.quant.core"
    try:
        return getattr(importlib.import_module(module), name)
    except AttributeError:
        raise AttributeError(f"module 'jaxmap.quant' has no attribute {name!r}") from None
