"""Importance-matrix files (the :class:`Imatrix` container).

Importance matrices: how much activation energy each input of each projection carries, measured on calibration
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
:mod:`jaxmap.loading.imatrix_llamacpp`.
"""

from __future__ import annotations

import dataclasses
import logging
import zipfile
from pathlib import Path

import numpy as np

from jaxmap.errors import UserError

log = logging.getLogger(__name__)

TOKENS_KEY = "__tokens__"


@dataclasses.dataclass
class Imatrix:
    """Per weight (Hugging Face name): the mean squared activation of each of its inputs, ``[in]`` float32."""

    values: dict[str, np.ndarray]
    tokens: int
    path: str = "<memory>"

    def for_weight(self, hf_name: str, n_inputs: int) -> np.ndarray | None:
        """The importance of ``hf_name``'s inputs (None: not measured, e.g. a head the collection did not reach). A
        part of a fused tensor (``<stored>[<part>]``) shares its inputs with the stored tensor, so llama.cpp's entry
        for the stored one (``blk.N.attn_qkv.weight``) serves each part."""
        v = self.values.get(hf_name)
        if v is None and hf_name.endswith("]") and "[" in hf_name:
            v = self.values.get(hf_name.rsplit("[", 1)[0])
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
        from jaxmap.families import family_of, layer_param_specs

        family = family_of(config)
        projections = [[s.hf_name for k, s in layer_param_specs(config, i).items() if k in family.projection_inputs]
                       for i in range(config.num_hidden_layers)]
        ours = {name for layer in projections for name in layer}
        ours |= {s.stored for i in range(config.num_hidden_layers) for s in layer_param_specs(config, i).values()
                 if s.stored}  # fused tensors as llama.cpp names them
        ours |= {family.head_name(config), family.embedding_name(config)}
        theirs = set(self.values)
        if not theirs & ours:
            raise UserError(f"imatrix {self.path} has no entry for any weight of this model (it names e.g. "
                            f"{min(theirs)}; the model's are like {projections[0][0]}): it was "
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
        see :mod:`jaxmap.loading.imatrix_llamacpp`), or a dict of vectors."""
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
            from jaxmap.loading import imatrix_llamacpp

            return cls(*imatrix_llamacpp.read(path), str(path))
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

