"""One naming of leaves for every library function: '/'-joined pytree paths, an nnx Module or State seen as its
variables' values (``lin/kernel``, never ``lin/kernel/value``), so that a regex written for ``shard`` selects the
same leaves in ``offload``, ``fetch``, ``plan_for`` and ``memory_kinds``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

SCALARS = (bool, int, float, complex)  # Python scalars: leaves jax stores as 0-d arrays


def path_str(path: tuple) -> str:
    """'/'-joined pytree path: ``{'layers': [{'w': x}]}`` -> ``layers/0/w``."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


# ---- flax nnx: seen as the values of its variables ------------------------------------------------------------------
@functools.cache
def _nnx() -> Any:
    """flax.nnx, or None: the library works on plain pytrees where flax is not installed."""
    try:
        from flax import nnx
    except ImportError:
        return None
    return nnx


def is_variable(x: Any) -> bool:
    nnx = _nnx()
    return nnx is not None and isinstance(x, nnx.Variable)


def nnx_state(params: Any) -> Any:
    """The nnx.State of a module or state (None for other trees, or when flax is missing)."""
    nnx = _nnx()
    if nnx is None:
        return None
    if isinstance(params, nnx.Module):
        params = nnx.state(params)
    return params if isinstance(params, nnx.State) else None


def value(v: Any) -> Any:
    """A variable's value without reading it (``v[...]`` fails on the ShapeDtypeStructs of an abstract model)."""
    return v.get_value() if hasattr(v, "get_value") else v.value


def plain(params: Any) -> Any:
    """Modules as their nnx.State, and nnx variables as their values, so that every function sees the same paths."""
    state = nnx_state(params)
    tree = params if state is None else state
    return jax.tree.map(lambda v: value(v) if is_variable(v) else v, tree, is_leaf=is_variable)


def nnx_axes(params: Any) -> Any:
    """Logical axes from nnx variables' ``out_sharding`` / ``sharding_names`` / ``sharding`` metadata, or None."""
    state = nnx_state(params)
    tree = params if state is None else state
    if not any(is_variable(v) for v in jax.tree.leaves(tree, is_leaf=is_variable)):
        return None

    def axes(v: Any) -> Any:
        if not is_variable(v):
            return None
        meta = v.get_metadata() if hasattr(v, "get_metadata") else {}
        names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
        return tuple(names) if names is not None else None

    return jax.tree.map(axes, tree, is_leaf=is_variable)


def map_named(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """``fn(path, leaf)`` over the tree, an nnx variable seen as its value under the variable's path (kept wrapped)."""
    def visit(path: tuple, x: Any) -> Any:
        name = path_str(path)
        if is_variable(x):
            return jax.tree.map(lambda a: fn(name, a), x)
        return fn(name, x)

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=is_variable)
