"""Where jaxmap keeps what it makes once and reuses: ``$JAXMAP_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxmap``, else
``~/.cache/jaxmap`` (compiled programs, exported programs, assembled packaged models, disk-tier files, the native
CPU kernels). One definition, so every part of jaxmap moves together when the variable is set."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("JAXMAP_CACHE_DIR"):
        return Path(os.environ["JAXMAP_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxmap"
