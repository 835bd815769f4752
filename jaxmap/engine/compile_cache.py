"""jax's persistent compilation cache, on by default in the user's cache directory.

A second run of the same model and layout then loads its compiled programs from disk instead of compiling them,
which takes time to first token from seconds to well under a second. ``JAXMAP_COMPILE_CACHE=0`` turns it off;
``JAXMAP_CACHE_DIR`` moves jaxmap's cache folder (default ``$XDG_CACHE_HOME/jaxmap`` or ``~/.cache/jaxmap``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from jaxmap.config.cache import cache_root

log = logging.getLogger(__name__)
_enabled: Path | None = None


def enable_compile_cache() -> Path | None:
    """Point jax at ``<cache_root>/xla`` unless disabled or already configured by the user; idempotent."""
    global _enabled
    if _enabled is not None:
        return _enabled
    if os.environ.get("JAXMAP_COMPILE_CACHE", "1") in ("0", "false", "no", "off"):
        return None
    import jax

    if jax.config.jax_compilation_cache_dir:  # the user chose one: respect it
        _enabled = Path(jax.config.jax_compilation_cache_dir)
        return _enabled
    path = cache_root() / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("compilation cache disabled: cannot create %s (%s)", path, exc.strerror)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _enabled = path
    log.debug("persistent compilation cache at %s", path)
    return path
