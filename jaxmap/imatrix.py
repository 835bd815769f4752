"""Importance matrices: how much activation energy each input of each projection carries, measured on calibration
text, so that ISQ fits every quantized block where the model's activations actually fall.

A weight's quantization error reaches the output as ``sum_j e_j x_j``: an error on an input column whose activations
are large costs more than one on a column that is nearly always zero. The importance matrix holds, for every
projection, the mean of ``x_j ** 2`` over the calibration tokens (llama.cpp's imatrix; mistral.rs collects the same
from a ``--calibration-file``); :func:`jaxmap.quant.quantize` then minimises the error weighted by it.

Workflow: ``python -m jaxmap.imatrix -m MODEL -o model.imatrix.npz`` runs the model in float (mapped like any load:
``-n``, ``--topology``, host and disk tiers) over a calibration text (default: the one shipped in
``jaxmap/data/calibration.txt``; pass ``--text`` for your own domain), and ``--isq TYPE --imatrix model.imatrix.npz``
(``jaxmap.load(..., isq=, imatrix=)``) uses it. The file is a plain ``.npz``: one float32 vector per Hugging Face
weight name, plus the token count. llama.cpp's imatrix files (GGUF or legacy ``.dat``) load too:
:mod:`jaxmap.imatrix_llamacpp`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxmap.errors import ArgumentParser, UserError

log = logging.getLogger(__name__)

CALIBRATION_TEXT = Path(__file__).resolve().parent / "data" / "calibration.txt"
TOKENS_KEY = "__tokens__"
DEFAULT_CHUNK = 512
MIN_CALIBRATION_TOKENS = 512


@dataclasses.dataclass
class Imatrix:
    """Per weight (Hugging Face name): the mean squared activation of each of its inputs, ``[in]`` float32."""

    values: dict[str, np.ndarray]
    tokens: int
    path: str = "<memory>"

    def for_weight(self, hf_name: str, n_inputs: int) -> np.ndarray | None:
        """The importance of ``hf_name``'s inputs (None: not measured, e.g. a head the collection did not reach)."""
        v = self.values.get(hf_name)
        if v is None:
            return None
        if v.shape != (n_inputs,):
            raise UserError(f"imatrix {self.path} has {v.size} inputs for {hf_name}, the model has {n_inputs}: it "
                            f"was collected for another model; collect one for this model with python -m "
                            f"jaxmap.imatrix")
        return v

    def check_model(self, config) -> None:
        """Refuse an imatrix that names none of this model's projections (another model's, or another naming), before
        any weight is read; note entries for weights the model lacks (a deeper model's file, say)."""
        from jaxmap.llama import PROJECTION_INPUTS
        from jaxmap.param_specs import layer_param_specs

        ours = {s.hf_name for i in range(config.num_hidden_layers)
                for k, s in layer_param_specs(config, i).items() if k in PROJECTION_INPUTS}
        ours |= {"lm_head.weight", "model.embed_tokens.weight"}
        theirs = set(self.values)
        if not theirs & ours:
            raise UserError(f"imatrix {self.path} has no entry for any weight of this model (it names e.g. "
                            f"{min(theirs)}; the model's are like model.layers.0.self_attn.q_proj.weight): it was "
                            f"collected for another model; collect one with python -m jaxmap.imatrix")
        extra = sorted(theirs - ours)
        if extra:
            log.warning("imatrix %s: %d entries name weights this model lacks (e.g. %s): collected for another "
                        "model?", self.path, len(extra), extra[0])

    def digest(self) -> str:
        """A short hash of the values: names what an offload folder quantized with this matrix holds."""
        import hashlib

        h = hashlib.sha256()
        for name in sorted(self.values):
            h.update(name.encode())
            h.update(np.ascontiguousarray(self.values[name], np.float32).tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write atomically (a temporary file renamed into place): a failed write leaves nothing behind."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **{TOKENS_KEY: np.int64(self.tokens)}, **self.values)
            tmp.replace(path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot write {path}: {exc.strerror}") from None

    @classmethod
    def load(cls, source: str | Path | Imatrix | dict) -> Imatrix:
        """An importance matrix from a file written by :meth:`save`, a llama.cpp imatrix (GGUF or legacy ``.dat``,
        see :mod:`jaxmap.imatrix_llamacpp`), or a dict of vectors."""
        if isinstance(source, Imatrix):
            return source
        if isinstance(source, dict):
            bad = [k for k, v in source.items() if not _importance_vector(np.asarray(v))]
            if bad or not source:
                raise UserError(f"imatrix dict: entry {bad[0]!r} is not a vector of finite non-negative numbers"
                                if bad else "imatrix dict is empty")
            return cls({k: np.asarray(v, np.float32) for k, v in source.items()}, 0)
        path = Path(source)
        if not path.is_file():
            raise UserError(f"cannot read imatrix {path}: no such file (write one with python -m jaxmap.imatrix)")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"PK\x03\x04" and magic[:1] != b"\x93":  # not an .npz (zip) nor a bare .npy: llama.cpp's?
            from jaxmap import imatrix_llamacpp

            return imatrix_llamacpp.read(path)
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array
                raise ValueError("a single array, not an archive of named vectors")
            with data:
                raw = {k: data[k] for k in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise UserError(f"cannot read imatrix {path}: not an .npz importance matrix ({exc})") from None
        tokens = raw.pop(TOKENS_KEY, None)
        bad = [k for k, v in raw.items() if not _importance_vector(v)]
        counted = tokens is not None and tokens.ndim == 0 and np.issubdtype(tokens.dtype, np.integer)
        if not counted or bad or not raw:
            what = f"entry {bad[0]!r} is not a vector of non-negative numbers" if bad else (
                "it has no entries" if not raw else "it lacks a token count (an integer)")
            raise UserError(f"cannot read imatrix {path}: {what}; write one with python -m jaxmap.imatrix")
        return cls({k: v.astype(np.float32) for k, v in raw.items()}, int(tokens), str(path))


def _importance_vector(v: np.ndarray) -> bool:
    return (v.ndim == 1 and v.size > 0 and np.issubdtype(v.dtype, np.number) and not np.issubdtype(v.dtype, np.bool_)
            and bool(np.isfinite(v).all()) and not (v < 0).any())


def _tapped_layer(config, p, x, cos, sin, mask):
    """One decoder layer over a prefill chunk from an empty cache; returns ``x`` and each projection input's sum of
    squares over the chunk's tokens (float32, ``[in]``)."""
    import jax.numpy as jnp

    from jaxmap import llama

    b, t, _ = x.shape
    cache = jnp.zeros((b, config.num_key_value_heads, t, config.head_dim), x.dtype)
    taps: dict = {}
    x, _, _ = llama.decoder_layer(p, x, cache, cache, jnp.int32(0), cos, sin, mask, t, config, taps=taps)
    return x, {k: _sum_squares(v) for k, v in taps.items()}


def _sum_squares(a):
    import jax.numpy as jnp

    a = a.astype(jnp.float32)
    return jnp.sum(a * a, axis=tuple(range(a.ndim - 1)))


def _head_input(config, final_norm, x):
    from jaxmap import llama

    return _sum_squares(llama.rms_norm(x, final_norm, config.rms_norm_eps))


class _Programs:
    """The jitted pieces collection runs, one per (stage, kind): compiled once per chunk length."""

    def __init__(self, config):
        import jax

        from jaxmap.engine import weights_from_raw

        self._layer = functools.partial(_tapped_layer, config)
        self.layer = jax.jit(self._layer)
        self.head = jax.jit(functools.partial(_head_input, config))
        self._raw: dict[int, object] = {}
        self._weights_from_raw = weights_from_raw

    def raw_layer(self, stage_index: int, stage):
        """A disk-tier layer from its stored tensors (the engine's conversion), then the tapped layer."""
        import jax

        if stage_index not in self._raw:
            specs, targets = stage.disk.specs[stage.start], stage.layer_shardings

            def run(raw, x, cos, sin, mask):
                return self._layer(self._weights_from_raw(raw, specs, targets, stage.dtype), x, cos,
                                              sin, mask)

            self._raw[stage_index] = jax.jit(run)
        return self._raw[stage_index]


def collect(model, ids: Sequence[int], chunk: int = DEFAULT_CHUNK, progress: bool = True) -> Imatrix:
    """Run ``model`` (a loaded :class:`jaxmap.api.Model`, float weights) over ``ids`` in independent chunks of
    ``chunk`` tokens and measure every projection's input energy, stage by stage and layer by layer as the model is
    placed (device, host and disk tiers alike)."""
    import jax
    import jax.numpy as jnp

    from jaxmap import llama, quant
    from jaxmap.engine import StepShape
    from jaxmap.multihost import put, to_local
    from jaxmap.param_specs import layer_param_specs
    from jaxmap.progress import Progress
    from jaxmap.sampling import SamplerShape

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
            x, cos, sin, mask = engine._call(i, shape, "enter", outer, x, put(zero, stage.activation_sharding), pad)
            for j in range(stage.num_layers):
                layer = stage.start + j
                if stage.memory_kind == "disk":
                    raw = put(stage.disk.read(layer), stage.activation_sharding)
                    x, taps = programs.raw_layer(i, stage)(raw, x, cos, sin, mask)
                    jax.block_until_ready(x)
                    stage.disk.release(layer)
                else:
                    p = stage.params["layers"][j]
                    if stage.memory_kind == "host":
                        p = jax.device_put(p, stage.layer_shardings)
                    x, taps = programs.layer(p, x, cos, sin, mask)
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
    for layer in range(config.num_hidden_layers):
        specs = layer_param_specs(config, layer)
        for key, tap in llama.PROJECTION_INPUTS.items():
            values[specs[key].hf_name] = (sums[(layer, tap)] / n).astype(np.float32)
    if head is not None:
        name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        values[name] = (head / n).astype(np.float32)
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


def main(argv: Sequence[str] | None = None) -> int:
    from jaxmap.generate import add_model_arguments, guarded, setup_logging
    from jaxmap.multihost import add_distributed_arguments
    from jaxmap.plan import add_mapping_arguments

    summary = " ".join(__doc__.split("\n\n")[0].split())
    parser = ArgumentParser(prog="python -m jaxmap.imatrix", description=summary)
    add_model_arguments(parser)
    add_mapping_arguments(parser)
    add_distributed_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="where to write the importance matrix (.npz)")
    parser.add_argument("--text", default=None, help="calibration text file (default: jaxmap's shipped one)")
    parser.add_argument("--max-tokens", type=int, default=None, help="use at most this many tokens of the text")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="tokens per independent sequence")
    parser.add_argument("--seed", type=int, default=0, help="random weights' seed (preset:NAME models)")
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    return guarded(_run, args)


def _run(args) -> int:
    from jaxmap.api import load
    from jaxmap.compile_cache import enable_compile_cache
    from jaxmap.multihost import is_primary, start_from_args

    if args.chunk < 1:
        raise UserError(f"--chunk must be at least 1, got {args.chunk}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.imatrix is not None:
        raise UserError("--imatrix is for loading quantized (generate, convert); this command writes one (-o)")
    if args.isq is not None and str(args.isq).strip().lower() not in ("none", "off", "float"):
        raise UserError("an importance matrix is measured on float weights: drop --isq (or pass --isq none)")
    output = Path(args.output)
    if not output.parent.is_dir():
        raise UserError(f"cannot write {output}: folder {output.parent} does not exist")
    if output.is_dir():
        raise UserError(f"cannot write {output}: it is a folder; give a file name such as "
                        f"{output / 'model.imatrix.npz'}")
    if args.text is not None:
        _read_text(Path(args.text), "calibration text")  # a bad text is reported before the model loads
    if start_from_args(args):
        args.quiet = True
    enable_compile_cache()
    model = load(args.model, dtype=args.dtype, max_seq_len=args.max_seq_len, layer_mode=args.layer_mode,
                 seed=args.seed, progress=not args.quiet, tp=args.tp, pp=args.pp, devices=args.devices,
                 device_layers=args.device_layers, topology=args.topology, plan=args.plan,
                 max_memory=args.max_memory, auto=args.auto, allow_disk=args.allow_disk,
                 offload_folder=args.offload_folder, isq=None if args.plan else "none")
    ids = calibration_ids(model.tokenizer, args.text, args.max_tokens)
    if len(ids) < MIN_CALIBRATION_TOKENS:
        log.warning("imatrix: only %d calibration tokens; a few thousand give a steadier measure (the shipped "
                    "text has about 3,300)", len(ids))
    result = collect(model, ids, args.chunk, progress=not args.quiet)
    if is_primary():  # every process measured the same; one writes
        result.save(output)
    log.info("imatrix: %d weights measured over %d tokens, written to %s", len(result.values), result.tokens, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
