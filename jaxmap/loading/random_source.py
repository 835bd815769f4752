"""Random weights for a config: the source behind ``-m preset:NAME`` (benchmarks, compile-time checks, examples).

Each tensor is drawn from a generator seeded by the seed and the tensor's name, so any one tensor can be read alone,
in any order, and comes out the same every time.
"""

from __future__ import annotations

import zlib

import numpy as np

from jaxmap import families
from jaxmap.config import ModelConfig


class RandomSource:
    """A :class:`~jaxmap.loading.source.WeightSource` of seeded random weights in Hugging Face layout."""

    def __init__(self, config: ModelConfig, seed: int = 0, scale: float = 0.02):
        self.config = config
        self.path = f"preset:{config.name or 'random'}"
        self._seed = seed
        self._scale = scale
        specs = dict(families.outer_param_specs(config))
        for i in range(config.num_hidden_layers):
            for key, spec in families.layer_param_specs(config, i).items():
                specs[f"{i}.{key}"] = spec
        self._shapes = {s.hf_name: s.hf_shape for s in specs.values()}
        self._roles = {s.hf_name: s.role for s in specs.values()}

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def stored_nbytes(self, name: str) -> int:
        return int(np.prod(self._shapes[name])) * 4

    def stored_type(self, name: str) -> str:
        return "F32"

    def read(self, name: str, dtype: np.dtype | str = np.float32) -> np.ndarray:
        rng = np.random.default_rng([self._seed, zlib.crc32(name.encode())])
        shape = self._shapes[name]
        if self._roles[name] == "norm":
            out = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif self._roles[name] == "embedding":
            out = rng.standard_normal(shape, dtype=np.float32)
        else:
            out = self._scale * rng.standard_normal(shape, dtype=np.float32)
        return out.astype(dtype)

    def tokenizer(self):
        return None

    def close(self) -> None:
        pass

