"""Traced programs kept across runs: a stage's step exported with ``jax.export`` (serialized StableHLO).

The persistent compilation cache saves XLA's compile, not the tracing and lowering in front of it: SmolLM2's 30
unrolled layers cost seconds of Python at every start to trace again into the very program the cache then looks up.
A warm start here reads the exported program instead (milliseconds), wraps it in one ``jax.jit`` (so calls keep jit's
C++ fast path and buffer donation) and lets the compilation cache do the rest.

A stored program is only reused when everything that shaped it is the same: its key hashes jax's and jaxlib's
versions, the backend and its devices, the source of the jaxmap modules that trace model code, the model config, the
stage's settings and layer designs, the step's shapes, and every argument's shape, dtype, sharding and tree (so a
changed ISQ type, dtype, plan or layout makes a new key, never a stale hit). Anything the store cannot handle
(memory kinds other than device memory, an export or read that fails) falls back to plain tracing, logged at DEBUG.

Off unless :func:`enable_program_store` is called (the command-line tools do, beside the compilation cache);
``JAXMAP_PROGRAM_STORE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_root: Path | None = None
_source_digest: str | None = None
FORMAT = 1  # bump when the key's meaning or the stored file changes

# the modules whose code ends up inside a traced step (the whole package is hashed below: cheap and safe)
_PACKAGE = Path(__file__).resolve().parents[1]


def enable_program_store(root: Path | None = None) -> Path | None:
    """Keep exported programs under ``root`` (default ``<jaxmap cache>/programs``); idempotent."""
    global _root
    if os.environ.get("JAXMAP_PROGRAM_STORE", "1") in ("0", "false", "no", "off"):
        return None
    if root is None:
        from jaxmap.config.cache import cache_root

        root = cache_root() / "programs"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.debug("program store disabled: cannot create %s (%s)", root, exc.strerror)
        return None
    _root = root
    return root


def disable_program_store() -> None:
    global _root
    _root = None


def store_root() -> Path | None:
    return _root


def source_digest() -> str:
    """A hash of jaxmap's own source: an edited model file never reuses a program traced from the old one, nor an
    edited native kernel (``*.cc``: its custom calls' operands) a program that calls the old one."""
    global _source_digest
    if _source_digest is None:
        h = hashlib.sha256()
        for path in sorted([*_PACKAGE.rglob("*.py"), *_PACKAGE.rglob("*.cc")]):
            h.update(str(path.relative_to(_PACKAGE)).encode())
            h.update(path.read_bytes())
        _source_digest = h.hexdigest()
    return _source_digest


def _environment() -> tuple:
    import jax
    import jaxlib

    devices = jax.devices()
    return (FORMAT, jax.__version__, jaxlib.__version__, jax.default_backend(), len(devices),
            tuple(sorted({d.device_kind for d in devices})), jax.process_count(), source_digest())


def _leaf_spec(leaf: Any) -> str:
    sharding = getattr(leaf, "sharding", None)
    return f"{getattr(leaf, 'shape', None)}:{getattr(leaf, 'dtype', type(leaf).__name__)}:{sharding!r}"


def program_key(what: Sequence[Any], args: Sequence[Any]) -> str:
    """The key of one program: ``what`` (config, stage settings, shapes: anything with a stable repr) and the
    arguments' tree, shapes, dtypes and shardings."""
    import jax

    leaves, tree = jax.tree.flatten(list(args))
    h = hashlib.sha256()
    for part in (*_environment(), *what, str(tree), *(_leaf_spec(leaf) for leaf in leaves)):
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:40]


def storable(args: Sequence[Any]) -> bool:
    """Whether every argument is an array in device memory (exported programs carry no memory kinds here)."""
    import jax

    for leaf in jax.tree.leaves(list(args)):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None or getattr(sharding, "memory_kind", None) not in (None, "device"):
            return False
    return True


def load_or_export(key: str, fn: Callable, args: Sequence[Any], donate: Sequence[int]) -> Callable | None:
    """A callable taking ``args``' leaves (flattened) that runs ``fn``'s program, read from the store or exported into
    it now; ``None`` when the store is off or the program cannot be stored (the caller then jits ``fn`` itself).

    ``donate``: positions in ``args`` whose buffers the program may reuse (the KV cache), mapped to their leaves."""
    if _root is None or not storable(args):
        return None
    import jax
    from jax import export

    leaves, tree = jax.tree.flatten(list(args))
    # leaf positions of the donated arguments
    donated, offset = [], 0
    for i, arg in enumerate(args):
        n = len(jax.tree.leaves(arg))
        if i in donate:
            donated.extend(range(offset, offset + n))
        offset += n
    path = _root / f"{key}.jaxexport"
    exported = None
    if path.exists():
        try:
            exported = export.deserialize(bytearray(path.read_bytes()))
        except Exception as exc:  # a file from another version or a torn write: trace again
            log.debug("stored program %s unreadable (%s); tracing again", path.name, exc)
    if exported is None:
        def flat(*flat_leaves):
            return fn(*jax.tree.unflatten(tree, flat_leaves))

        try:
            specs = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in leaves]
            from jaxmap.quant import native

            # the native CPU kernels' custom calls: registered by jaxmap itself before any stored program runs
            checks = [export.DisabledSafetyCheck.custom_call(target) for target in native.TARGETS]
            exported = export.export(jax.jit(flat), disabled_checks=checks)(*specs)
            data = exported.serialize()
        except Exception as exc:
            log.debug("program not stored (%s: %s); tracing as usual", type(exc).__name__, exc)
            return None
        _write_atomic(path, data)
    return jax.jit(exported.call, donate_argnums=tuple(donated))


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it over: readers never see half a program."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("could not store program %s (%s)", path.name, exc.strerror)
