"""``offload`` / ``fetch``: subtrees between device memory and host memory (``pinned_host``), sharding kept, and
``memory_kinds`` to see where each leaf lives. ``fetch`` works inside ``jit`` (XLA copies the bytes back to the
device when needed).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import jax

from jaxmap.errors import UserError
from jaxmap.library.paths import is_variable, map_named, path_str, value

log = logging.getLogger("jaxmap.library")  # the package's logger, as before the split: configs that name it still work

Select = Callable[[str], bool] | str | None


def _matcher(select: Select) -> Callable[[str], bool]:
    if select is None:
        return lambda _: True
    if isinstance(select, str):
        try:
            pattern = re.compile(select)
        except re.error as exc:
            raise UserError(f"select {select!r} is not a valid regular expression ({exc})") from None
        return lambda name: bool(pattern.search(name))
    if callable(select):
        return select
    raise UserError(f"select must be a regex, a predicate on paths, or None, got {type(select).__name__}")


def _warn_unmatched(what: str, select: Select, matched: list[str], seen: list[str]) -> None:
    """A selector that matches nothing is almost always a path written for another tree: say so, with real paths."""
    if select is not None and not matched:
        log.warning("jaxmap.%s: select %r matches no leaf, nothing moved; paths look like %s", what, select,
                    ", ".join(seen[:3]) or "(empty tree)")


def _check_memory_kind(x: jax.Array, kind: str) -> None:
    device = next(iter(x.sharding.addressable_devices), None)
    kinds = [m.kind for m in device.addressable_memories()] if device is not None else []
    if kinds and kind not in kinds:
        raise UserError(f"memory_kind {kind!r} is not a memory of {device.platform} devices; they have "
                        f"{', '.join(kinds)}")


def offload(tree: Any, select: Select = None, memory_kind: str = "pinned_host") -> Any:
    """Move the leaves whose path matches ``select`` (a regex or a predicate; None: all) to host memory.

    The sharding is kept (same mesh, same ``PartitionSpec``), only its memory kind changes; pass the result to a
    jitted function and call :func:`fetch` on it there to compute with it on the devices. Only ``jax.Array`` leaves
    move: numpy leaves are in host memory already but unknown to any device, so :func:`shard` them first. A
    ``select`` that matches no path logs a warning.
    """
    def move(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return x
        _check_memory_kind(x, memory_kind)
        return jax.device_put(x, x.sharding.with_memory_kind(memory_kind))

    return _move_selected("offload", tree, select, move)


def fetch(tree: Any, select: Select = None) -> Any:
    """Bring offloaded leaves back to device memory; inside ``jit`` this is a device-memory copy XLA schedules."""
    def move(x: Any) -> Any:
        if isinstance(x, jax.core.Tracer):  # inside jit: the abstract value knows its memory space
            space = getattr(x.aval, "memory_space", None)
            return x if space in (None, jax.memory.Space.Device) else jax.device_put(x, jax.memory.Space.Device)
        sharding = getattr(x, "sharding", None)
        if sharding is None or getattr(sharding, "memory_kind", "device") in (None, "device"):
            return x
        return jax.device_put(x, sharding.with_memory_kind("device"))

    return _move_selected("fetch", tree, select, move)


def _move_selected(what: str, tree: Any, select: Select, move: Callable[[Any], Any]) -> Any:
    """``move`` every leaf whose path ``select`` matches; warn (naming ``what``) when it matches none."""
    match = _matcher(select)
    matched: list[str] = []
    seen: list[str] = []

    def visit(name: str, x: Any) -> Any:
        seen.append(name)
        if not match(name):
            return x
        matched.append(name)
        return move(x)

    out = map_named(visit, tree)
    _warn_unmatched(what, select, matched, seen)
    return out


def memory_kinds(tree: Any) -> dict[str, str]:
    """Path -> memory kind of every array leaf (for checks and logs), by the paths :func:`offload` matches."""
    out: dict[str, str] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)[0]:
        x = value(x) if is_variable(x) else x
        if isinstance(x, jax.Array):
            out[path_str(path)] = x.sharding.memory_kind or "device"
    return out
