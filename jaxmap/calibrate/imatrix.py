"""Collect an importance matrix by running a loaded model over calibration text.

The file format and what the numbers mean: :mod:`jaxmap.loading.imatrix_file`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxmap.errors import UserError
from jaxmap.loading.imatrix_file import Imatrix

log = logging.getLogger(__name__)

CALIBRATION_TEXT = Path(__file__).resolve().parents[1] / "data" / "calibration.txt"
DEFAULT_CHUNK = 512
MIN_CALIBRATION_TOKENS = 512


def _tapped_layer(config, p, x, ctx, design):
    """One decoder layer over a prefill chunk from an empty cache; returns ``x`` and each projection input's sum of
    squares over the chunk's tokens (float32, ``[in]``)."""
    import jax.numpy as jnp

    from jaxmap.engine import layers

    b, t, _ = x.shape
    cache = jnp.zeros((b, config.num_key_value_heads, t, config.head_dim), x.dtype)
    taps: dict = {}
    x, _, _ = layers.decoder_layer(p, x, cache, cache, jnp.int32(0), ctx, t, config, design, taps=taps)
    return x, {k: _sum_squares(v) for k, v in taps.items()}


def _sum_squares(a):
    import jax.numpy as jnp

    a = a.astype(jnp.float32)
    return jnp.sum(a * a, axis=tuple(range(a.ndim - 1)))


def _head_input(config, final_norm, x):
    from jaxmap.engine.blocks import rms_norm
    from jaxmap.families import family_of

    plus_one = family_of(config).outer_design(config).norm_plus_one
    return _sum_squares(rms_norm(x, final_norm, config.rms_norm_eps, plus_one))


class _Programs:
    """The jitted pieces collection runs, one per (stage, kind): compiled once per chunk length."""

    def __init__(self, config):
        import jax

        from jaxmap.engine.engine import weights_from_raw

        self._layer = functools.partial(_tapped_layer, config)
        self.layer = jax.jit(self._layer, static_argnames=("design",))
        self.head = jax.jit(functools.partial(_head_input, config))
        self._raw: dict[int, object] = {}
        self._weights_from_raw = weights_from_raw

    def raw_layer(self, stage_index: int, stage):
        """A disk-tier layer from its stored tensors (the engine's conversion), then the tapped layer."""
        import jax

        if stage_index not in self._raw:
            specs, targets = stage.disk.specs[stage.start], stage.layer_shardings

            def run(raw, x, ctx, design):
                return self._layer(self._weights_from_raw(raw, specs, targets, stage.dtype), x, ctx, design)

            self._raw[stage_index] = jax.jit(run, static_argnames=("design",))
        return self._raw[stage_index]


def collect(model, ids: Sequence[int], chunk: int = DEFAULT_CHUNK, progress: bool = True) -> Imatrix:
    """Run ``model`` (a loaded :class:`jaxmap.api.Model`, float weights) over ``ids`` in independent chunks of
    ``chunk`` tokens and measure every projection's input energy, stage by stage and layer by layer as the model is
    placed (device, host and disk tiers alike)."""
    import jax
    import jax.numpy as jnp

    from jaxmap import quant
    from jaxmap.engine.engine import StepShape
    from jaxmap.engine.multihost import put, to_local
    from jaxmap.engine.sampling import SamplerShape
    from jaxmap.families import family_of, layer_param_specs
    from jaxmap.progress import Progress

    engine, config = model.engine, model.config
    ids = [int(t) for t in ids]
    chunk = max(1, min(int(chunk), engine.max_seq_len))
    if not ids:
        raise UserError("no calibration tokens: the text is empty")
    for stage in engine.stages:
        layers = list(stage.params.get("layers", []))
        if stage.disk is not None:
            layers.append(stage.disk.read(stage.start))
        for lp in layers:
            if any(quant.is_quantized(w) for w in lp.values()):
                raise UserError("collect an importance matrix from float weights: load the model with isq='none' "
                                "(--isq none), not quantized")
    programs = _Programs(config)
    sums: dict[tuple[int, str], np.ndarray] = {}
    head = None
    pieces = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    bar = Progress(len(pieces) * config.num_hidden_layers, "imatrix", enabled=progress, unit="layer passes")
    zero = jnp.int32(0)

    def add(key, value):
        value = np.asarray(to_local(value), np.float64)
        sums[key] = sums.get(key, 0) + value

    def run_piece(piece: list[int]) -> None:
        nonlocal head
        t = len(piece)
        shape = StepShape(1, t, t, True, SamplerShape())
        x = jnp.asarray([piece], jnp.int32)
        for i, stage in enumerate(engine.stages):
            x = put(x, stage.activation_sharding)
            pad = put(jnp.zeros(1, jnp.int32), stage.activation_sharding)
            outer = {k: v for k, v in stage.params.items() if k != "layers"}
            x, ctx = engine._call(i, shape, "enter", outer, x, put(zero, stage.activation_sharding), pad,
                                  put(jnp.int32(t - 1), stage.activation_sharding))
            for j in range(stage.num_layers):
                layer = stage.start + j
                if stage.memory_kind == "disk":
                    raw = put(stage.disk.read(layer), stage.activation_sharding)
                    x, taps = programs.raw_layer(i, stage)(raw, x, ctx, design=engine.designs[layer])
                    jax.block_until_ready(x)
                    stage.disk.release(layer)
                else:
                    p = stage.params["layers"][j]
                    if stage.memory_kind == "host":
                        p = jax.device_put(p, stage.layer_shardings)
                    x, taps = programs.layer(p, x, ctx, design=engine.designs[layer])
                for name, value in taps.items():
                    add((layer, name), value)
                bar.update(n=1)
            if stage.is_last:
                value = np.asarray(to_local(programs.head(stage.params["final_norm"], x)), np.float64)
                head = value if head is None else head + value

    with jax.default_matmul_precision("highest"):  # float32 means float32 (TF32 on GPUs otherwise)
        for piece in pieces:
            run_piece(piece)
    bar.close()
    n = len(ids)
    values = {}
    family = family_of(config)
    for layer in range(config.num_hidden_layers):
        specs = layer_param_specs(config, layer)
        for key, tap in family.projection_inputs.items():
            values[specs[key].hf_name] = (sums[(layer, tap)] / n).astype(np.float32)
    if head is not None:
        values[family.head_name(config)] = (head / n).astype(np.float32)
    return Imatrix(values, n)


def calibration_ids(tokenizer, text_path: str | Path | None, max_tokens: int | None,
                    what: str = "calibration text") -> list[int]:
    """Token ids of a calibration text file (default: the shipped one), at most ``max_tokens`` of them; ``what``
    names the text in error messages."""
    path = Path(text_path) if text_path is not None else CALIBRATION_TEXT
    text = _read_text(path, what)
    if tokenizer is None:
        raise UserError(f"the model has no tokenizer, so the {what} cannot be encoded")
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError(f"{what} {path} is empty")
    return ids[:max_tokens] if max_tokens else ids


def _read_text(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"cannot read {what} {path}: it is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not text.strip():
        raise UserError(f"{what} {path} is empty")
    return text


