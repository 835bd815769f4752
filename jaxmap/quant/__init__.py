"""Weight-only quantization, one job per module:

- :mod:`~jaxmap.quant.types`: the jax-free table of types and their bytes, which the planner reads;
- :mod:`~jaxmap.quant.qtensor`: the packed storage (:class:`QTensor`), its bit planes and shardings;
- :mod:`~jaxmap.quant.host`: the numpy quantizers, a float matrix -> a QTensor (:func:`quantize`);
- :mod:`~jaxmap.quant.gguf`: GGUF blocks -> a QTensor by integer repacking (:func:`from_gguf`);
- :mod:`~jaxmap.quant.kernels`: dequantization and the jitted products (:func:`dense`).

``jaxmap.quant.X`` resolves lazily to the module that defines ``X`` (:data:`_MODULE_OF`), so importing the types
imports no jax. Setting one (``monkeypatch.setattr(quant, "CHUNK_BYTES", ...)``) sets it in that module, where
its functions read it, as when this package was one module.
"""

from __future__ import annotations

import importlib
import sys

_EXPORTS = {
    "jaxmap.quant.types": (
        "NATIVE", "QType", "_planes", "QTYPES", "FALLBACK", "_ALIASES", "parse_isq", "fits", "misfit_reason",
        "choose_type", "row_bits", "tensor_nbytes", "row_classes", "IMPORTANCE_TYPES", "GGUF_NATIVE",
        "gguf_to_jaxmap_type", "fitted_type",
    ),
    "jaxmap.quant.qtensor": (
        "QTensor", "is_quantized", "shardings_for", "split_of", "leaf_shardings", "pack_np", "unpack_np", "is_stack",
        "stack",
    ),
    "jaxmap.quant.host": (
        "_round", "importance_weights", "quantize", "_pad_to", "_from_gguf_simple", "host_threads", "_pool",
        "_chunked", "_dot", "_search_symmetric", "_Q8_0_DIVISORS", "_Q8_0_WEIGHTED_DIVISORS", "_search_q8_0",
        "_search_affine", "_best_k_codes", "_quantize_k", "_k_rows",
    ),
    "jaxmap.quant.gguf": ("from_gguf",),
    "jaxmap.quant.kernels": (
        "_class_codes", "_class_rows", "_per_sub", "SMALL_ROWS", "CHUNK_BYTES", "_materialized", "_ones_after",
        "_codes", "_block_scales", "_apply_scales", "_value_classes", "_class_weight", "_weight", "dequantize",
        "_chunk_classes", "qdot", "dense", "dense_rows", "take_rows",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def _owner(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxmap.quant' has no attribute {name!r}")
    return importlib.import_module(module)


def __getattr__(name: str):
    return getattr(_owner(name), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))


class _Package(type(sys)):
    """This package's module type: setting (or deleting) a re-exported name acts on the module that defines it."""

    def __setattr__(self, name: str, value) -> None:
        if name in _MODULE_OF:
            setattr(_owner(name), name, value)
        else:
            super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in _MODULE_OF:
            delattr(_owner(name), name)
        else:
            super().__delattr__(name)


sys.modules[__name__].__class__ = _Package
