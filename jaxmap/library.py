"""Device mapping for any JAX model: shard a pytree, plan its memory, offload parts of it to host memory.

The engine's machinery made reusable for code that is not a llama:

- :func:`shard` places a pytree of arrays on a mesh, by regex rules over '/'-joined pytree paths or by a logical
  axis table (logical name -> mesh axis) applied to a parallel tree of logical-axis tuples (or to flax ``nnx.Param``
  ``sharding`` metadata).
- :func:`plan_for` decides, for a pytree of shapes, which subtrees go on which device: fill the devices in order,
  then host memory; it returns bytes per device and the assignment, as data.
- :func:`offload` / :func:`fetch` move subtrees between device memory and host memory (``pinned_host``) with the
  sharding kept, and :func:`fetch` works inside ``jit`` (XLA copies the bytes back to the device when needed).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmap.errors import UserError
from jaxmap.multihost import put

Rules = Sequence[tuple[str, PartitionSpec | tuple | None]] | Mapping[str, str | tuple[str, ...] | None]


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


def _is_axes(x: Any) -> bool:
    return x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))


def spec_from_logical(axes: Sequence[str | None] | None, table: Mapping[str, Any], mesh: Mesh,
                      shape: Sequence[int] | None = None, name: str = "leaf") -> PartitionSpec:
    """A ``PartitionSpec`` from logical axis names; a mesh axis is used once; an axis that does not divide stays
    whole."""
    if axes is None:
        return PartitionSpec()
    used: set[str] = set()
    out: list[Any] = []
    for i, axis in enumerate(axes):
        target = table.get(axis) if axis is not None else None
        if axis is not None and axis not in table:
            raise UserError(f"{name}: logical axis {axis!r} is not in the rules table ({', '.join(table)})")
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t in mesh.shape and t not in used)
        size = int(np.prod([mesh.shape[t] for t in targets])) if targets else 1
        if targets and (shape is None or shape[i] % size == 0):
            used.update(targets)
            out.append(targets[0] if len(targets) == 1 else targets)
        else:
            out.append(None)
    return PartitionSpec(*out)


def shardings_for(params: Any, rules: Rules, mesh: Mesh, logical_axes: Any = None) -> Any:
    """The ``NamedSharding`` tree :func:`shard` would use (for ``jit`` ``in_shardings``/``out_shardings``)."""
    if isinstance(rules, Mapping):  # logical-axis table
        if logical_axes is None:
            logical_axes = _nnx_axes(params)
        if logical_axes is None:
            raise UserError("a logical-axis rules table needs logical_axes= (a tree of axis-name tuples parallel to "
                            "params) or flax nnx.Param leaves with sharding metadata")
        leaves, treedef = jax.tree_util.tree_flatten_with_path(_plain(params))
        axes_leaves = treedef.flatten_up_to(logical_axes) if not _is_axes(logical_axes) else [logical_axes] * len(
            leaves)
        out = [NamedSharding(mesh, spec_from_logical(a, rules, mesh, np.shape(x), path_str(p)))
               for (p, x), a in zip(leaves, axes_leaves, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, out)
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def pick(path, x):
        name = path_str(path)
        for pattern, spec in compiled:
            if pattern.search(name):
                spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec(*(spec or ()))
                _check_divides(name, np.shape(x), spec, mesh)
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, PartitionSpec())  # no rule: replicated

    return jax.tree_util.tree_map_with_path(pick, _plain(params))


def _check_divides(name: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> None:
    if len(spec) > len(shape):
        raise UserError(f"{name}: PartitionSpec {spec} has more entries than the array has dimensions {tuple(shape)}")
    for dim, entry in zip(shape, spec, strict=False):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        for a in axes:
            if a not in mesh.shape:
                raise UserError(f"{name}: PartitionSpec {spec} names mesh axis {a!r}; the mesh has "
                                f"{', '.join(mesh.axis_names)}")
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if dim % size:
            raise UserError(f"{name}: dimension {dim} does not divide over {entry} ({size}) in {spec}")


def _nnx_state(params: Any) -> Any:
    """The nnx.State of a module or state (None for other trees, or when flax is missing)."""
    try:
        from flax import nnx
    except ImportError:
        return None
    if isinstance(params, nnx.Module):
        params = nnx.state(params)
    return params if isinstance(params, nnx.State) else None


def _plain(params: Any) -> Any:
    """nnx.State / nnx.Param leaves as plain arrays (other trees unchanged)."""
    state = _nnx_state(params)
    if state is not None:
        from flax import nnx

        return jax.tree.map(lambda v: v[...] if isinstance(v, nnx.Variable) else v, state,
                            is_leaf=lambda v: isinstance(v, nnx.Variable))
    return params


def _nnx_axes(params: Any) -> Any:
    """Logical axes from nnx variables' ``sharding_names`` (flax 0.12) / ``sharding`` metadata, or None."""
    params = _nnx_state(params)
    if params is None:
        return None
    from flax import nnx

    def axes(v):
        meta = v.get_metadata() if hasattr(v, "get_metadata") else {}
        names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
        return tuple(names) if names is not None else None

    return jax.tree.map(axes, params, is_leaf=lambda v: isinstance(v, nnx.Variable))


def shard(params: Any, rules: Rules, mesh: Mesh, logical_axes: Any = None) -> Any:
    """Place every array of ``params`` on ``mesh``.

    ``rules``: a list of ``(regex, PartitionSpec)`` matched (first hit wins, ``re.search``) against each leaf's
    '/'-joined path (``layers/0/kernel``), unmatched leaves replicated; or a logical-axis table ``{"mlp": "tp",
    "embed": None}`` used with ``logical_axes`` (a tree of axis-name tuples parallel to ``params``) or with the
    ``sharding`` metadata of flax ``nnx.Param`` leaves (an ``nnx.Module`` or ``nnx.State`` is accepted and its
    plain array state returned). Multi-process meshes work: each process supplies the shards of its devices.
    """
    shardings = shardings_for(params, rules, mesh, logical_axes)
    return jax.tree.map(put, _plain(params), shardings)


# ---- memory plans ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class MemoryPlan:
    """Which subtree goes where, and the bytes each place holds."""

    assignment: dict[str, str]  # subtree path -> device name or "host"
    bytes_per_device: dict[str, int]
    capacity: dict[str, int]
    host_bytes: int = 0

    def placement_of(self, path: str) -> str:
        return self.assignment[path]

    def render(self) -> str:
        lines = ["device     bytes        capacity"]
        for name, used in self.bytes_per_device.items():
            lines.append(f"{name:<10} {used:>12,d} {self.capacity.get(name, 0):>12,d}")
        lines.append(f"{'host':<10} {self.host_bytes:>12,d}")
        return "\n".join(lines)


def _nbytes(x: Any) -> int:
    return int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize


def _subtrees(tree: Any, depth: int) -> list[tuple[str, Any]]:
    """(path, subtree) pairs ``depth`` levels down (lists and dicts are walked; leaves stop early)."""
    if depth == 0 or not isinstance(tree, (dict, list, tuple)) or _is_leafish(tree):
        return [("", tree)]
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    out = []
    for key, sub in items:
        for path, leaf in _subtrees(sub, depth - 1):
            out.append((f"{key}/{path}" if path else str(key), leaf))
    return out


def _is_leafish(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def plan_for(param_shapes: Any, hardware: Any = None, *, capacity_bytes: int | Mapping[str, int] | None = None,
             reserve_fraction: float = 0.1, depth: int = 1, devices: Sequence[Any] | None = None) -> MemoryPlan:
    """A memory plan for an arbitrary pytree of ``ShapeDtypeStruct``s or arrays.

    The tree is cut into subtrees ``depth`` levels down (``depth=2`` splits ``{"layers": [...]}`` per layer); each
    subtree goes, in order, to the first device with room for it (device capacity minus ``reserve_fraction`` for
    activations), and to ``host`` when no device has room. ``hardware`` is a :class:`jaxmap.hardware.Hardware`
    (default: the live devices) or ``devices`` a list of jax devices; ``capacity_bytes`` overrides the capacity of
    every device (an int) or of named ones (a dict), which is how a plan for a smaller device is tried on CPU.
    """
    from jaxmap.hardware import Hardware

    if devices is not None:
        from jaxmap.hardware import jax_platform_name

        names = [f"{jax_platform_name(d.platform)}[{i}]" for i, d in enumerate(devices)]
        caps = {n: None for n in names}
    else:
        hw = hardware or Hardware.from_jax()
        names = [d.name for d in hw.accelerators]
        caps = {d.name: d.memory_bytes for d in hw.accelerators}
    if isinstance(capacity_bytes, int):
        caps = {n: capacity_bytes for n in names}
    elif isinstance(capacity_bytes, Mapping):
        caps.update(capacity_bytes)
    missing = [n for n, c in caps.items() if c is None]
    if missing:
        raise UserError(f"no memory size known for {', '.join(missing)} (CPU devices report none); pass "
                        "capacity_bytes=")
    usable = {n: int(caps[n] * (1 - reserve_fraction)) for n in names}
    used = dict.fromkeys(names, 0)
    assignment: dict[str, str] = {}
    host = 0
    current = 0
    for path, sub in _subtrees(param_shapes, depth):
        size = sum(_nbytes(x) for x in jax.tree.leaves(sub))
        while current < len(names) and used[names[current]] + size > usable[names[current]]:
            current += 1  # fill in order: a pipeline keeps consecutive subtrees together
        if current < len(names):
            used[names[current]] += size
            assignment[path] = names[current]
        else:
            host += size
            assignment[path] = "host"
    return MemoryPlan(assignment, used, {n: caps[n] for n in names}, host)


# ---- host offload ---------------------------------------------------------------------------------------------------
def _with_memory_kind(sharding: Any, kind: str) -> Any:
    return sharding.with_memory_kind(kind)


def offload(tree: Any, select: Callable[[str], bool] | str | None = None, memory_kind: str = "pinned_host") -> Any:
    """Move the leaves whose path matches ``select`` (a regex or a predicate; None: all) to host memory.

    The sharding is kept (same mesh, same ``PartitionSpec``), only its memory kind changes; pass the result to a
    jitted function and call :func:`fetch` on it there to compute with it on the devices.
    """
    match = _matcher(select)

    def move(path, x):
        if not isinstance(x, jax.Array) or not match(path_str(path)):
            return x
        return jax.device_put(x, _with_memory_kind(x.sharding, memory_kind))

    return jax.tree_util.tree_map_with_path(move, tree)


def fetch(tree: Any, select: Callable[[str], bool] | str | None = None) -> Any:
    """Bring offloaded leaves back to device memory; inside ``jit`` this is a device-memory copy XLA schedules."""
    match = _matcher(select)

    def move(path, x):
        if not match(path_str(path)):
            return x
        if isinstance(x, jax.core.Tracer):  # inside jit: the abstract value knows its memory space
            space = getattr(x.aval, "memory_space", None)
            return x if space in (None, jax.memory.Space.Device) else jax.device_put(x, jax.memory.Space.Device)
        sharding = getattr(x, "sharding", None)
        if sharding is None or getattr(sharding, "memory_kind", "device") in (None, "device"):
            return x
        return jax.device_put(x, _with_memory_kind(sharding, "device"))

    return jax.tree_util.tree_map_with_path(move, tree)


def _matcher(select: Callable[[str], bool] | str | None) -> Callable[[str], bool]:
    if select is None:
        return lambda _: True
    if isinstance(select, str):
        pattern = re.compile(select)
        return lambda name: bool(pattern.search(name))
    return select


def memory_kinds(tree: Any) -> dict[str, str]:
    """Path -> memory kind of every array leaf (for checks and logs)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(x, jax.Array):
            out[path_str(path)] = x.sharding.memory_kind or "device"
    return out
