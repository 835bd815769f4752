"""The loader's view of a checkpoint: tensors by Hugging Face name, read one at a time.

Every format (a Hugging Face safetensors folder, a GGUF file, a jaxmap orbax checkpoint, random weights) presents
the same interface, so materialising a model never cares where the bytes come from. Names and shapes are the ones
the model's family declares for its Hugging Face files (:mod:`jaxmap.families`; projections ``[out, in]``); a GGUF
source maps its own names to them through the same family.

``read`` returns a fresh numpy array in the requested dtype: the source never holds a second copy of the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from jaxmap.config import ModelConfig
    from jaxmap.loading.tokenizer import Tokenizer


class WeightSource(Protocol):
    config: ModelConfig
    path: str

    def names(self) -> list[str]:
        """Every tensor name, Hugging Face convention."""

    def shape(self, name: str) -> tuple[int, ...]:
        """Logical shape in Hugging Face layout (after any GGUF reordering)."""

    def stored_nbytes(self, name: str) -> int:
        """Bytes the tensor takes in the file (quantized size for GGUF)."""

    def stored_type(self, name: str) -> str:
        """Storage type as the file names it: ``F32``, ``BF16``, ``Q4_1``..."""

    def read(self, name: str, dtype: np.dtype | str = np.float32) -> np.ndarray:
        """The tensor, dequantized/converted to ``dtype``, in Hugging Face layout."""

    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer that ships with the weights, or None."""

    def close(self) -> None:
        """Release file handles and memory maps."""
