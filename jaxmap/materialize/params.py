"""Turn a checkpoint into device arrays, tensor by tensor, each placed where the layout says.

Only one tensor is ever held in host memory beyond what has been placed, so loading never needs a second copy of
the model. Where each parameter goes is decided by ``place_for``: given the stage and the parameter's spec, it
returns a ``jax.sharding.Sharding`` (a single device, or a ``NamedSharding`` over a tensor-parallel mesh).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from jaxmap import families
from jaxmap.config import ModelConfig
from jaxmap.errors import UserError
from jaxmap.loading.source import WeightSource
from jaxmap.progress import Progress

PlaceFn = Callable[[families.ParamSpec], jax.sharding.Sharding]


def read_param(source: WeightSource, spec: families.ParamSpec, dtype: np.dtype) -> np.ndarray:
    """One parameter from the source, in jaxmap's shape (a reshape of Hugging Face's layout, no transpose)."""
    try:
        array = source.read(spec.hf_name, dtype)
    except KeyError:
        raise UserError(f"{source.path}: the checkpoint has no tensor {spec.hf_name!r}") from None
    if tuple(array.shape) != spec.hf_shape:
        raise UserError(
            f"{source.path}: tensor {spec.hf_name!r} has shape {tuple(array.shape)}, the config expects "
            f"{spec.hf_shape}; the checkpoint does not match its config"
        )
    return np.ascontiguousarray(array.T) if spec.transpose else array


def stage_param_specs(config: ModelConfig, start: int, end: int, is_first: bool, is_last: bool) -> dict:
    """The parameter specs one stage holds, in the same tree shape as its parameters."""
    outer = families.outer_param_specs(config)
    specs: dict = {"layers": [families.layer_param_specs(config, i) for i in range(start, end)]}
    if is_first or (is_last and config.tie_word_embeddings):
        specs["embed_tokens"] = outer["embed_tokens"]
    if is_last:
        specs["final_norm"] = outer["final_norm"]
        if "lm_head" in outer:
            specs["lm_head"] = outer["lm_head"]
    return specs


def materialize_stage(source: WeightSource, specs: dict, dtype: np.dtype, place_for: PlaceFn,
                      progress: Progress | None = None, quantizer=None) -> dict:
    """Read and place every parameter of one stage; ``quantizer`` (:class:`jaxmap.materialize.isq.Quantizer`) may take a
    weight instead and return it quantized and placed."""

    def load(spec: families.ParamSpec) -> jax.Array:
        sharding = place_for(spec)
        if not sharding.addressable_devices:  # multi-process: every shard lives on another process, read nothing
            return jax.make_array_from_single_device_arrays(spec.shape, sharding, [], dtype=dtype)
        if quantizer is not None:
            placed = quantizer.load(spec, sharding, dtype)
            if placed is not None:
                if progress is not None:
                    progress.update(placed.nbytes)
                return placed
        host = read_param(source, spec, dtype)
        array = jax.device_put(host, sharding)
        if progress is not None:
            progress.update(host.nbytes)
        return array

    placed = getattr(source, "read_placed", None)  # sources that restore straight into shardings (orbax)

    def load_group(group: dict) -> dict:
        if placed is None:
            return {k: load(v) for k, v in group.items()}
        out, direct = {}, {}
        for k, spec in group.items():
            sharding = place_for(spec)
            qtype, keep = quantizer.decide(spec, sharding) if quantizer is not None else (None, False)
            if qtype is not None and not keep and sharding.addressable_devices:
                out[k] = quantizer.place(spec, sharding, qtype, keep)  # quantized (or requantized) on the host
                if progress is not None:
                    progress.update(out[k].nbytes)
            else:  # float, or the stored quantized blocks: restored straight into their shardings
                direct[k] = (spec, sharding, qtype) if keep else (spec, sharding)
        if direct:
            restored = placed(direct, dtype)
            for k, value in direct.items():
                if len(value) > 2:
                    quantizer.record(value[0], restored[k])
                if progress is not None:
                    progress.update(value[0].size * np.dtype(dtype).itemsize)
            out.update(restored)
        return {k: out[k] for k in group}

    params: dict = load_group({k: v for k, v in specs.items() if k != "layers"})
    params["layers"] = [load_group(layer) for layer in specs["layers"]]
    return params


def count_params(specs: dict) -> int:
    return len([k for k in specs if k != "layers"]) + sum(len(layer) for layer in specs["layers"])
