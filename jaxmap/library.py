"""Device mapping for any JAX model: shard a pytree, plan its memory, offload parts of it to host memory.

The engine's machinery made reusable for code that is not a llama:

- :func:`shard` places a pytree of arrays on a mesh, by regex rules over '/'-joined pytree paths or by a logical
  axis table (logical name -> mesh axis) applied to a parallel tree of logical-axis tuples (or to flax ``nnx.Param``
  ``sharding`` metadata); :func:`shardings_for` gives the same placement as ``NamedSharding``s, also for abstract
  trees (``jax.eval_shape`` / ``nnx.eval_shape``).
- :func:`plan_for` decides, for a pytree of shapes, which subtrees go on which device: consecutive runs on the
  devices in order, host memory for what fits on none; it returns bytes per device and the assignment, as data.
- :func:`offload` / :func:`fetch` move subtrees between device memory and host memory (``pinned_host``) with the
  sharding kept, and :func:`fetch` works inside ``jit`` (XLA copies the bytes back to the device when needed).

Every function names leaves by the same paths: an nnx Module or State is seen as its variables' values
(``lin/kernel``, never ``lin/kernel/value``), so a regex written for :func:`shard` selects the same leaves in
:func:`offload`, :func:`fetch`, :func:`plan_for` and :func:`memory_kinds`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmap.engine.multihost import put
from jaxmap.errors import UserError

log = logging.getLogger(__name__)

Rules = Sequence[tuple[str, PartitionSpec | tuple | None]] | Mapping[str, str | tuple[str, ...] | None]
Select = Callable[[str], bool] | str | None
_SCALARS = (bool, int, float, complex)


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


def _is_variable(x: Any) -> bool:
    nnx = _nnx()
    return nnx is not None and isinstance(x, nnx.Variable)


def _nnx_state(params: Any) -> Any:
    """The nnx.State of a module or state (None for other trees, or when flax is missing)."""
    nnx = _nnx()
    if nnx is None:
        return None
    if isinstance(params, nnx.Module):
        params = nnx.state(params)
    return params if isinstance(params, nnx.State) else None


def _value(v: Any) -> Any:
    """A variable's value without reading it (``v[...]`` fails on the ShapeDtypeStructs of an abstract model)."""
    return v.get_value() if hasattr(v, "get_value") else v.value


def _plain(params: Any) -> Any:
    """Modules as their nnx.State, and nnx variables as their values, so that every function sees the same paths."""
    state = _nnx_state(params)
    tree = params if state is None else state
    return jax.tree.map(lambda v: _value(v) if _is_variable(v) else v, tree, is_leaf=_is_variable)


def _nnx_axes(params: Any) -> Any:
    """Logical axes from nnx variables' ``out_sharding`` / ``sharding_names`` / ``sharding`` metadata, or None."""
    state = _nnx_state(params)
    tree = params if state is None else state
    if not any(_is_variable(v) for v in jax.tree.leaves(tree, is_leaf=_is_variable)):
        return None

    def axes(v: Any) -> Any:
        if not _is_variable(v):
            return None
        meta = v.get_metadata() if hasattr(v, "get_metadata") else {}
        names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
        return tuple(names) if names is not None else None

    return jax.tree.map(axes, tree, is_leaf=_is_variable)


# ---- shardings ------------------------------------------------------------------------------------------------------
def _is_axes(x: Any) -> bool:
    return x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))


def _leaf_shape(name: str, x: Any) -> tuple[int, ...]:
    """The shape of an array-like leaf; anything else is refused by path rather than failing inside jax."""
    if isinstance(x, _SCALARS):
        return ()
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise UserError(f"{name}: a {type(x).__name__} leaf is not an array; shard and shardings_for take trees of "
                        "arrays (or jax.ShapeDtypeStructs for shardings_for): keep other values out of the tree")
    return tuple(x.shape)


def _mesh_axes(axes: tuple[str, ...], mesh: Mesh, where: str) -> None:
    for axis in axes:
        if axis not in mesh.shape:
            raise UserError(f"{where} names mesh axis {axis!r}; the mesh has {', '.join(map(str, mesh.axis_names))}")


def _check_table(table: Mapping[str, Any], mesh: Mesh) -> None:
    """Every target of a logical-axis table is None, a mesh axis or a tuple of mesh axes of this mesh."""
    for logical, target in table.items():
        where = f"rules table entry {logical!r}: {target!r}"
        if target is None:
            continue
        targets = (target,) if isinstance(target, str) else target
        if not isinstance(targets, (tuple, list)) or not all(isinstance(t, str) for t in targets):
            raise UserError(f"{where} must be a mesh axis name, a tuple of them, or None (keep the dimension whole)")
        _mesh_axes(tuple(targets), mesh, where)


def spec_from_logical(axes: Any, table: Mapping[str, Any], mesh: Mesh, shape: Sequence[int],
                      name: str = "leaf") -> PartitionSpec:
    """A ``PartitionSpec`` from logical axis names.

    A mesh axis splits at most one dimension (a later logical axis mapped to an axis already used stays whole, as in
    flax's logical rules); a dimension that does not divide over its mesh axes is an error, not a silent replica:
    replicating a weight the table says to split would cost memory the caller did not plan for.
    """
    if axes is None:
        return PartitionSpec()
    if isinstance(axes, list):
        axes = tuple(axes)
    if not _is_axes(axes):
        raise UserError(f"{name}: logical axes must be a tuple with one axis name (or None) per dimension, such as "
                        f"('embed', 'mlp'), got {axes!r}; to split one dimension over several mesh axes map its "
                        "logical name to a tuple of mesh axes in the rules table")
    if len(axes) > len(shape):
        raise UserError(f"{name}: {len(axes)} logical axes {axes} for a {len(shape)}-D array of shape {tuple(shape)}")
    used: set[str] = set()
    out: list[Any] = []
    for i, axis in enumerate(axes):
        if axis is not None and axis not in table:
            raise UserError(f"{name}: logical axis {axis!r} is not in the rules table ({', '.join(table)})")
        target = table.get(axis) if axis is not None else None
        targets = tuple(t for t in ((target,) if isinstance(target, str) else tuple(target or ())) if t not in used)
        size = int(np.prod([mesh.shape[t] for t in targets])) if targets else 1
        if shape[i] % size:
            raise UserError(f"{name}: dimension {i} ({shape[i]}) does not divide over mesh axis "
                            f"{'x'.join(targets)} of size {size} (logical axis {axis!r}); map {axis!r} to None in "
                            "the rules table to keep it whole, or use a mesh axis whose size divides it")
        used.update(targets)
        out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*out)


def _axes_at(tree: Any, path: tuple, name: str) -> Any:
    """The entry of a logical-axes tree at one params leaf's key path (None above it: the whole subtree replicated)."""
    node = tree
    for depth, key in enumerate(path):
        if node is None:
            return None
        if _is_axes(node):
            raise UserError(f"logical_axes gives {path_str(path[:depth]) or 'the tree'} one tuple {node!r} but params "
                            f"has arrays below it ({name}); give each array its own tuple")
        try:
            node = _child(node, key)
        except (KeyError, IndexError, TypeError, AttributeError):
            raise UserError(f"logical_axes has no entry for {name}, which params has; give every array a tuple of "
                            "logical axis names (or None to replicate it)") from None
    return node


def _child(node: Any, key: Any) -> Any:
    """One step down a tree by a jax key-path entry (dict key, sequence index or attribute)."""
    if hasattr(key, "name"):
        return getattr(node, key.name)
    return node[key.key if hasattr(key, "key") else key.idx]


def _refuse_extra_axes(tree: Any, names: list[str]) -> None:
    """Entries of logical_axes for arrays params does not have are a typo or a stale tree: say which."""
    below, above = set(names), set()
    for n in names:
        parts = n.split("/")
        above.update("/".join(parts[:i]) for i in range(len(parts)))
    for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_axes)[0]:
        name = path_str(path)
        parts = name.split("/")
        if name not in above and not any("/".join(parts[:i]) in below for i in range(1, len(parts) + 1)):
            raise UserError(f"logical_axes has an entry for {name}, which params does not have; remove it or fix "
                            "its path")


def _logical_axes_list(params: Any, flat: list, names: list[str], logical_axes: Any) -> list[Any]:
    """One logical-axes entry per params leaf, in flattening order, matched by path."""
    if logical_axes is None:
        logical_axes = _nnx_axes(params)
    if logical_axes is None:
        raise UserError("a logical-axis rules table needs logical_axes= (a tree of axis-name tuples parallel to "
                        "params) or flax nnx.Param leaves with sharding metadata")
    if _is_axes(logical_axes):  # one tuple for every array
        return [logical_axes] * len(flat)
    out = [_axes_at(logical_axes, path, name) for (path, _), name in zip(flat, names, strict=True)]
    _refuse_extra_axes(logical_axes, names)
    return out


def _entry_axes(entry: Any, where: str) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    if isinstance(entry, (tuple, list)) and all(isinstance(a, str) for a in entry):
        return tuple(entry)
    if entry is PartitionSpec.UNCONSTRAINED:
        raise UserError(f"{where}: P.UNCONSTRAINED is for with_sharding_constraint inside jit; a placed array needs "
                        "a mesh axis name, a tuple of them, or None (whole) for each dimension")
    raise UserError(f"{where}: {entry!r} is not a mesh axis name, a tuple of them, or None")


def _as_spec(spec: Any, where: str, mesh: Mesh) -> PartitionSpec:
    """A rule's spec as a checked PartitionSpec: mesh axes that exist, each used once."""
    if isinstance(spec, str):
        raise UserError(f"{where}: the spec {spec!r} is a bare string; write PartitionSpec({spec!r}) to split the "
                        f"first dimension or PartitionSpec(None, {spec!r}) to split the second")
    if spec is None:
        spec = PartitionSpec()
    elif not isinstance(spec, PartitionSpec):
        if not isinstance(spec, (tuple, list)):
            raise UserError(f"{where}: {spec!r} is not a PartitionSpec, a tuple of mesh axis names, or None")
        spec = PartitionSpec(*spec)
    seen: set[str] = set()
    for entry in spec:
        axes = _entry_axes(entry, where)
        _mesh_axes(axes, mesh, f"{where}: PartitionSpec {spec}")
        for axis in axes:
            if axis in seen:
                raise UserError(f"{where}: PartitionSpec {spec} uses mesh axis {axis!r} twice; a mesh axis splits "
                                "one dimension at most")
            seen.add(axis)
    return spec


def _compile_rules(rules: Any, mesh: Mesh) -> list[tuple[re.Pattern, PartitionSpec]]:
    """Regex rules checked up front, so that a bad rule is named even when it matches no leaf."""
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
        raise UserError("rules must be a list of (regex, PartitionSpec) pairs or a dict from logical axis to mesh "
                        f"axis, got {type(rules).__name__}")
    out = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise UserError(f"rule {i} ({rule!r}) is not a (regex, PartitionSpec) pair such as "
                            "(r'layers/\\d+/up$', PartitionSpec(None, 'tp'))")
        try:
            pattern = re.compile(rule[0])
        except re.error as exc:
            raise UserError(f"rule {i}: {rule[0]!r} is not a valid regular expression ({exc})") from None
        out.append((pattern, _as_spec(rule[1], f"rule {i} ({rule[0]!r})", mesh)))
    return out


def _regex_spec(compiled: list[tuple[re.Pattern, PartitionSpec]], name: str, shape: tuple[int, ...],
                mesh: Mesh) -> PartitionSpec:
    """The first matching rule's spec (replicated when none matches), checked against the leaf's shape."""
    for pattern, spec in compiled:
        if pattern.search(name):
            _check_divides(name, shape, spec, mesh)
            return spec
    return PartitionSpec()


def _check_divides(name: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> None:
    if len(spec) > len(shape):
        raise UserError(f"{name}: PartitionSpec {spec} has more entries than the array has dimensions {tuple(shape)}")
    for i, (dim, entry) in enumerate(zip(shape, spec, strict=False)):
        axes = _entry_axes(entry, name)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if dim % size:
            raise UserError(f"{name}: dimension {i} ({dim}) does not divide over mesh axis {'x'.join(axes)} of size "
                            f"{size} in {spec}")


def shardings_for(params: Any, rules: Rules, mesh: Mesh, logical_axes: Any = None) -> Any:
    """The ``NamedSharding`` tree :func:`shard` would use, for ``jit`` ``in_shardings``/``out_shardings``.

    Works on abstract trees too (``jax.eval_shape``, ``nnx.eval_shape``): that is how a jitted init creates the
    parameters already sharded instead of materializing them on one device first.
    """
    if not isinstance(mesh, Mesh):
        raise UserError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    plain = _plain(params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(plain)
    names = [path_str(p) for p, _ in flat]
    shapes = [_leaf_shape(n, x) for n, (_, x) in zip(names, flat, strict=True)]
    if isinstance(rules, Mapping):  # logical-axis table
        _check_table(rules, mesh)
        axes = _logical_axes_list(params, flat, names, logical_axes)
        specs = [spec_from_logical(a, rules, mesh, s, n) for a, s, n in zip(axes, shapes, names, strict=True)]
    else:
        compiled = _compile_rules(rules, mesh)
        specs = [_regex_spec(compiled, n, s, mesh) for n, s in zip(names, shapes, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, [NamedSharding(mesh, s) for s in specs])


def _refuse_abstract(names: list[str], leaves: list[Any]) -> None:
    for name, x in zip(names, leaves, strict=True):
        if isinstance(x, jax.ShapeDtypeStruct):
            raise UserError(f"{name} is a ShapeDtypeStruct (an abstract array from eval_shape) with no data to place; "
                            "use jaxmap.shardings_for(...) for its shardings, e.g. as out_shardings of a jitted init")


def _refuse_local_to_multiprocess(names: list[str], leaves: list[Any], shardings: list[NamedSharding]) -> None:
    """Refuse, before any collective, a committed array on one process's devices bound for other processes' devices.

    Each process may hold a different such array (one committed to its own devices), and then the collective that
    would move it never matches up across processes: it hangs. The test reads only global device sets, so every
    process that sees the same global array decides the same way.
    """
    if jax.process_count() == 1:
        return
    for name, x, sharding in zip(names, leaves, shardings, strict=True):
        if not isinstance(x, jax.Array) or not x.committed:
            continue
        src = {d.process_index for d in x.sharding.device_set}
        if len(src) == 1 and {d.process_index for d in sharding.device_set} - src:
            raise UserError(f"{name}: an array committed to process {src.pop()}'s devices cannot be resharded onto a "
                            "mesh with other processes' devices; pass host (numpy) data or uncommitted arrays, the "
                            "same on every process")


def shard(params: Any, rules: Rules, mesh: Mesh, logical_axes: Any = None) -> Any:
    """Place every array of ``params`` on ``mesh``.

    ``rules``: a list of ``(regex, PartitionSpec)`` matched (first hit wins, ``re.search``) against each leaf's
    '/'-joined path (``layers/0/kernel``), unmatched leaves replicated; or a logical-axis table ``{"mlp": "tp",
    "embed": None}`` used with ``logical_axes`` (a tree of axis-name tuples parallel to ``params``, matched by path)
    or with the ``sharding`` metadata of flax ``nnx.Param`` leaves (an ``nnx.Module`` or ``nnx.State`` is accepted and
    its plain array state returned). In both forms a dimension that does not divide over its mesh axes is a
    :class:`UserError` naming the leaf, not a silent replica. Multi-process meshes work from host (numpy) or
    uncommitted data, the same on every process: each process supplies the shards of its devices.
    """
    plain = _plain(params)
    flat = jax.tree_util.tree_flatten_with_path(plain)[0]
    names, leaves = [path_str(p) for p, _ in flat], [x for _, x in flat]
    _refuse_abstract(names, leaves)
    shardings = shardings_for(params, rules, mesh, logical_axes)
    _refuse_local_to_multiprocess(names, leaves, jax.tree.leaves(shardings))
    return jax.tree.map(put, plain, shardings)


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


def _nbytes(name: str, x: Any) -> int:
    """Bytes of one leaf; Python scalars count as jax would store them (float32, int32 without x64)."""
    if isinstance(x, _SCALARS):
        return jax.dtypes.canonicalize_dtype(np.result_type(x)).itemsize
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise UserError(f"{name}: a {type(x).__name__} leaf is not an array; plan_for takes a tree of arrays or "
                        "jax.ShapeDtypeStructs")
    return int(np.prod(x.shape)) * x.dtype.itemsize  # dtype.itemsize: PRNG key dtypes have one, np.dtype() does not


def _tree_bytes(path: str, tree: Any) -> int:
    return sum(_nbytes("/".join(filter(None, (path, path_str(p)))), x)
               for p, x in jax.tree_util.tree_flatten_with_path(tree)[0])


def _subtrees(tree: Any, depth: int) -> list[tuple[str, Any]]:
    """(path, subtree) pairs ``depth`` levels down (mappings, lists and tuples are walked; leaves stop early)."""
    if depth == 0 or not isinstance(tree, (Mapping, list, tuple)) or _is_leafish(tree):
        return [("", tree)]
    items = tree.items() if isinstance(tree, Mapping) else enumerate(tree)
    out = []
    for key, sub in items:
        for path, leaf in _subtrees(sub, depth - 1):
            out.append((f"{key}/{path}" if path else str(key), leaf))
    return out


def _is_leafish(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _is_real(value: Any) -> bool:
    """A finite real number, numpy scalars included; bools are not numbers here (``True`` is no capacity)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def _capacity(value: Any, what: str) -> int:
    if not _is_real(value) or value <= 0:
        raise UserError(f"{what} must be a positive number of bytes, got {value!r}")
    return int(value)


def _check_plan_args(reserve_fraction: Any, depth: Any) -> None:
    if not _is_real(reserve_fraction) or not 0 <= reserve_fraction < 1:
        raise UserError(f"reserve_fraction must be a number in [0, 1) (the share of each device kept for "
                        f"activations), got {reserve_fraction!r}")
    if not isinstance(depth, numbers.Integral) or isinstance(depth, (bool, np.bool_)) or depth < 0:
        raise UserError(f"depth must be an integer >= 0 (levels of the tree to cut into subtrees), got {depth!r}")


def _refuse_duplicate_paths(paths: list[str]) -> None:
    twice = [p for p, n in collections.Counter(paths).items() if n > 1]
    if twice:
        raise UserError(f"two subtrees have the path {twice[0]!r} (a key contains '/'); rename the key so that "
                        "paths are unique")


def _plan_devices(hardware: Any, devices: Sequence[Any] | None) -> tuple[list[str], dict[str, int | None]]:
    """Device names as the engine writes them (``cpu[2]`` for jax's third CPU device) and their known capacity."""
    from jaxmap.config.hardware import Hardware, jax_platform_name, live_jax_devices

    if devices is None:
        hw = hardware or Hardware.from_jax()
        return [d.name for d in hw.accelerators], {d.name: d.memory_bytes for d in hw.accelerators}
    devices = list(devices)
    if not devices or not all(hasattr(d, "platform") and hasattr(d, "id") for d in devices):
        raise UserError("devices= must be a non-empty list of jax devices, e.g. jax.devices()[:2]")
    known = {dev: f"{platform}[{ordinal}]" for platform, ordinal, dev in live_jax_devices()}
    names = [known.get(d) or f"{jax_platform_name(d.platform)}[{d.id}]" for d in devices]
    if len(set(names)) != len(names):
        raise UserError(f"devices= lists a device twice ({', '.join(names)})")
    return names, dict.fromkeys(names)


def _capacities(names: list[str], caps: dict[str, int | None], capacity_bytes: Any) -> dict[str, int]:
    if isinstance(capacity_bytes, Mapping):
        unknown = [n for n in capacity_bytes if n not in caps]
        if unknown:
            raise UserError(f"capacity_bytes names {', '.join(map(str, unknown))}, not among the devices "
                            f"({', '.join(names)})")
        caps = {**caps, **{n: _capacity(v, f"capacity_bytes[{n!r}]") for n, v in capacity_bytes.items()}}
    elif capacity_bytes is not None:
        caps = dict.fromkeys(names, _capacity(capacity_bytes, "capacity_bytes"))
    missing = [n for n in names if caps[n] is None]
    if missing:
        raise UserError(f"no memory size known for {', '.join(missing)} (CPU devices report none); pass "
                        "capacity_bytes=")
    return caps


def _place(sizes: list[tuple[str, int]], names: list[str], usable: dict[str, int]) -> tuple[dict, dict, int]:
    """Subtrees in order onto the devices in order, each on the current device or a later one with room.

    The cursor never goes back, so each device holds a consecutive run (pipeline stages); a subtree that fits on
    no device from the cursor on goes to host and leaves the cursor where it was, so later subtrees still go to the
    devices.
    """
    used = dict.fromkeys(names, 0)
    assignment: dict[str, str] = {}
    host = cursor = 0
    for path, size in sizes:
        target = next((i for i in range(cursor, len(names)) if used[names[i]] + size <= usable[names[i]]), None)
        if target is None:
            host += size
            assignment[path] = "host"
        else:
            cursor = target
            used[names[target]] += size
            assignment[path] = names[target]
    return assignment, used, host


def plan_for(param_shapes: Any, hardware: Any = None, *, capacity_bytes: float | Mapping[str, float] | None = None,
             reserve_fraction: float = 0.1, depth: int = 1, devices: Sequence[Any] | None = None) -> MemoryPlan:
    """A memory plan for an arbitrary pytree of ``ShapeDtypeStruct``s or arrays (an nnx Module or State too).

    The tree is cut into subtrees ``depth`` levels down (``depth=2`` splits ``{"layers": [...]}`` per layer, 0 keeps
    it whole). The subtrees are placed in order: each goes to the current device if it has room (its capacity minus
    ``reserve_fraction`` for activations), else to the next device with room, and the cursor never goes back, so each
    device holds consecutive subtrees as pipeline stages need; a subtree that fits on no remaining device goes to
    ``host`` and later subtrees still go to the devices. ``hardware`` is a :class:`jaxmap.config.hardware.Hardware`
    (default: the live devices) or ``devices`` a list of jax devices (named as the engine names them, ``cpu[2]``);
    ``capacity_bytes`` overrides the capacity of every device (a positive number) or of named ones (a dict), which is
    how a plan for a smaller device is tried on CPU.
    """
    _check_plan_args(reserve_fraction, depth)
    names, caps = _plan_devices(hardware, devices)
    caps = _capacities(names, caps, capacity_bytes)
    subtrees = _subtrees(_plain(param_shapes), int(depth))
    _refuse_duplicate_paths([p for p, _ in subtrees])
    sizes = [(path, _tree_bytes(path, sub)) for path, sub in subtrees]
    usable = {n: int(caps[n] * (1 - reserve_fraction)) for n in names}
    assignment, used, host = _place(sizes, names, usable)
    return MemoryPlan(assignment, used, {n: caps[n] for n in names}, host)


# ---- host offload ---------------------------------------------------------------------------------------------------
def _map_named(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """``fn(path, leaf)`` over the tree, an nnx variable seen as its value under the variable's path (kept wrapped)."""
    def visit(path: tuple, x: Any) -> Any:
        name = path_str(path)
        if _is_variable(x):
            return jax.tree.map(lambda a: fn(name, a), x)
        return fn(name, x)

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=_is_variable)


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
    match = _matcher(select)
    matched: list[str] = []
    seen: list[str] = []

    def move(name: str, x: Any) -> Any:
        seen.append(name)
        if not match(name):
            return x
        matched.append(name)
        if not isinstance(x, jax.Array):
            return x
        _check_memory_kind(x, memory_kind)
        return jax.device_put(x, x.sharding.with_memory_kind(memory_kind))

    out = _map_named(move, tree)
    _warn_unmatched("offload", select, matched, seen)
    return out


def fetch(tree: Any, select: Select = None) -> Any:
    """Bring offloaded leaves back to device memory; inside ``jit`` this is a device-memory copy XLA schedules."""
    match = _matcher(select)
    matched: list[str] = []
    seen: list[str] = []

    def move(name: str, x: Any) -> Any:
        seen.append(name)
        if not match(name):
            return x
        matched.append(name)
        if isinstance(x, jax.core.Tracer):  # inside jit: the abstract value knows its memory space
            space = getattr(x.aval, "memory_space", None)
            return x if space in (None, jax.memory.Space.Device) else jax.device_put(x, jax.memory.Space.Device)
        sharding = getattr(x, "sharding", None)
        if sharding is None or getattr(sharding, "memory_kind", "device") in (None, "device"):
            return x
        return jax.device_put(x, sharding.with_memory_kind("device"))

    out = _map_named(move, tree)
    _warn_unmatched("fetch", select, matched, seen)
    return out


def memory_kinds(tree: Any) -> dict[str, str]:
    """Path -> memory kind of every array leaf (for checks and logs), by the paths :func:`offload` matches."""
    out: dict[str, str] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]:
        x = _value(x) if _is_variable(x) else x
        if isinstance(x, jax.Array):
            out[path_str(path)] = x.sharding.memory_kind or "device"
    return out
