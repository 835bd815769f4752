"""The one table from logical axes (named by the model in ``llama.py``) to mesh axes, and its strict application.

Column-parallel q/k/v/gate/up split their output axis (``heads``, ``kv_heads``, ``mlp``) over ``tp``; row-parallel
o/down split their input axis, which carries the same logical names, so the same rules cover them and XLA inserts
the all-reduce after them. Routed expert stacks ``[E, in, out]`` split ``experts`` over ``ep``
(:mod:`jaxmap.planning.expert_parallel`; size 1 without ep). Embedding and LM head are vocabulary-parallel
(``vocab`` -> ``tp``); ``embed`` (the
hidden size) is never split, so norms are replicated. Pure tuples come out: the engine turns them into
``jax.sharding.PartitionSpec``; the planner uses them to count bytes per device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

RULES: dict[str, str | None] = {
    "vocab": "tp",
    "embed": None,
    "heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "mlp": "tp",  # an expert's intermediate dimension too: tensor parallelism inside experts
    "experts": "ep",  # routed experts over the expert view of a stage's devices (planning/expert_parallel.py)
    "layers": None,
}

# Axes that may fall back to replication when they do not divide (the plan shows it); any other uneven axis is an
# error. kv heads replicate only when the tp size is a multiple of their count (each device then holds all of them).
REPLICABLE = ("vocab", "kv_heads")


class ShardingError(ValueError):
    """A rules-table mismatch: a bug in the model's axis names or the planner's mesh, never user input."""


def logical_to_spec(
    axes: Sequence[str],
    rules: Mapping[str, str | None],
    shape: Sequence[int],
    mesh_axis_sizes: Mapping[str, int],
    *,
    name: str = "parameter",
    units: Mapping[str, int] | None = None,
    notes: list[str] | None = None,
) -> tuple[str | None, ...]:
    """The mesh axis (or ``None``) per dimension of one parameter.

    ``units`` gives the count a folded axis must divide by (``heads`` -> 9 heads, not 9 * head_dim elements), so a
    split never lands inside a head. Replications are appended to ``notes``.
    """
    if len(axes) != len(shape):
        raise ShardingError(f"{name}: {len(axes)} logical axes {tuple(axes)} for a {len(shape)}-d shape {tuple(shape)}")
    spec: list[str | None] = []
    used: set[str] = set()
    for axis, dim in zip(axes, shape, strict=True):
        if axis not in rules:
            raise ShardingError(f"{name}: logical axis {axis!r} has no sharding rule")
        mesh_axis = rules[axis]
        if mesh_axis is None:
            spec.append(None)
            continue
        if mesh_axis not in mesh_axis_sizes:
            raise ShardingError(f"{name}: rule {axis!r} -> {mesh_axis!r} names a mesh axis the mesh lacks "
                                f"({', '.join(mesh_axis_sizes) or 'none'})")
        if mesh_axis in used:
            raise ShardingError(f"{name}: mesh axis {mesh_axis!r} is used twice")
        size = mesh_axis_sizes[mesh_axis]
        count = (units or {}).get(axis, dim)
        if size == 1:
            spec.append(None)
        elif count % size == 0 and dim % size == 0:
            spec.append(mesh_axis)
            used.add(mesh_axis)
        elif axis in REPLICABLE and (axis != "kv_heads" or size % count == 0):
            spec.append(None)
            if notes is not None:
                notes.append(f"{name}: {axis} ({count}) does not divide over {mesh_axis}={size}; replicated")
        else:
            raise ShardingError(f"{name}: {axis} ({count}) does not divide over {mesh_axis}={size}")
    return tuple(spec)


def shard_fraction(spec: Sequence[str | None], mesh_axis_sizes: Mapping[str, int]) -> int:
    """How many ways a parameter with ``spec`` is split (its bytes per device are size / this)."""
    out = 1
    for axis in spec:
        if axis is not None:
            out *= mesh_axis_sizes[axis]
    return out


# ---- user tables: the library API (jaxmap.shard / shardings_for) on the same strict application ---------------------
# A user's table maps a logical axis to a mesh axis, a tuple of mesh axes (one dimension split over several) or None.
# It is applied as strictly as the model's: an unknown logical axis, a mesh axis the mesh lacks or a dimension that
# does not divide is an error, and nothing replicates silently (no REPLICABLE fallback, no units: a user's arrays
# carry no head structure). One difference is deliberate: a mesh axis already used by an earlier dimension leaves a
# later dimension whole (flax's logical rules), since a user table may map two logical axes to one mesh axis.
def mesh_axes_of(entry: object, where: str) -> tuple[str, ...]:
    """One spec entry as the mesh axes it splits over: None -> (), 'tp' -> ('tp',), ('dp', 'tp') as is."""
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    if isinstance(entry, (tuple, list)) and all(isinstance(a, str) for a in entry):
        return tuple(entry)
    raise ShardingError(f"{where}: {entry!r} is not a mesh axis name, a tuple of them, or None")


def check_mesh_axes(axes: Sequence[str], mesh_axis_sizes: Mapping[str, int], where: str) -> None:
    """Every one of ``axes`` is an axis of the mesh."""
    for axis in axes:
        if axis not in mesh_axis_sizes:
            raise ShardingError(f"{where} names mesh axis {axis!r}; the mesh has "
                                f"{', '.join(map(str, mesh_axis_sizes))}")


def _table_targets(logical: str, target: object, mesh_axis_sizes: Mapping[str, int]) -> tuple[str, ...]:
    """A table entry's mesh axes, checked: None, a mesh axis of the mesh or a tuple of them."""
    where = f"rules table entry {logical!r}: {target!r}"
    if target is None:
        return ()
    targets = (target,) if isinstance(target, str) else target
    if not isinstance(targets, (tuple, list)) or not all(isinstance(t, str) for t in targets):
        raise ShardingError(f"{where} must be a mesh axis name, a tuple of them, or None (keep the dimension whole)")
    check_mesh_axes(tuple(targets), mesh_axis_sizes, where)
    return tuple(targets)


def check_rules_table(table: Mapping[str, object], mesh_axis_sizes: Mapping[str, int]) -> None:
    """Every target of a user's table is None, a mesh axis or a tuple of mesh axes of this mesh (checked up front,
    so that a bad entry is named even when no array uses it)."""
    for logical, target in table.items():
        _table_targets(logical, target, mesh_axis_sizes)


def _check_divides(name: str, i: int, dim: int, axes: tuple[str, ...], mesh_axis_sizes: Mapping[str, int],
                   detail: str) -> None:
    size = shard_fraction(axes, mesh_axis_sizes)
    if dim % size:
        raise ShardingError(f"{name}: dimension {i} ({dim}) does not divide over mesh axis {'x'.join(axes)} of size "
                            f"{size}{detail}")


def spec_for_axes(
    axes: Sequence[str | None] | None,
    table: Mapping[str, object],
    shape: Sequence[int],
    mesh_axis_sizes: Mapping[str, int],
    *,
    name: str = "leaf",
) -> tuple[str | tuple[str, ...] | None, ...]:
    """The mesh axes per dimension of one array from a user's table: ``None``, a mesh axis or a tuple of them.

    ``axes`` may be shorter than ``shape`` (the trailing dimensions stay whole) and ``None`` (all whole).
    """
    if axes is None:
        return ()
    if isinstance(axes, list):
        axes = tuple(axes)
    if not (isinstance(axes, tuple) and all(a is None or isinstance(a, str) for a in axes)):
        raise ShardingError(f"{name}: logical axes must be a tuple with one axis name (or None) per dimension, such "
                            f"as ('embed', 'mlp'), got {axes!r}; to split one dimension over several mesh axes map "
                            "its logical name to a tuple of mesh axes in the rules table")
    if len(axes) > len(shape):
        raise ShardingError(f"{name}: {len(axes)} logical axes {axes} for a {len(shape)}-D array of shape "
                            f"{tuple(shape)}")
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for i, axis in enumerate(axes):
        if axis is not None and axis not in table:
            raise ShardingError(f"{name}: logical axis {axis!r} is not in the rules table ({', '.join(table)})")
        targets = () if axis is None else _table_targets(axis, table[axis], mesh_axis_sizes)
        targets = tuple(t for t in targets if t not in used)
        _check_divides(name, i, shape[i], targets, mesh_axis_sizes,
                       f" (logical axis {axis!r}); map {axis!r} to None in the rules table to keep it whole, or use "
                       "a mesh axis whose size divides it")
        used.update(targets)
        out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return tuple(out)


def check_spec_axes(spec: Sequence[object], mesh_axis_sizes: Mapping[str, int], where: str,
                    entry_axes: Callable[[object, str], tuple[str, ...]] = mesh_axes_of) -> None:
    """A spec written by hand (``PartitionSpec`` entries): mesh axes of this mesh, each splitting one dimension.

    ``entry_axes`` reads one entry (the library's refuses jax's ``P.UNCONSTRAINED`` first, with its own advice).
    """
    seen: set[str] = set()
    for entry in spec:
        axes = entry_axes(entry, where)
        check_mesh_axes(axes, mesh_axis_sizes, f"{where}: PartitionSpec {spec}")
        for axis in axes:
            if axis in seen:
                raise ShardingError(f"{where}: PartitionSpec {spec} uses mesh axis {axis!r} twice; a mesh axis "
                                    "splits one dimension at most")
            seen.add(axis)


def check_spec_fits(spec: Sequence[object], shape: Sequence[int], mesh_axis_sizes: Mapping[str, int], *,
                    name: str) -> None:
    """A checked spec against one array: no more entries than dimensions, every split dimension divisible."""
    if len(spec) > len(shape):
        raise ShardingError(f"{name}: PartitionSpec {spec} has more entries than the array has dimensions "
                            f"{tuple(shape)}")
    for i, (dim, entry) in enumerate(zip(shape, spec, strict=False)):
        _check_divides(name, i, dim, mesh_axes_of(entry, name), mesh_axis_sizes, f" in {spec}")
