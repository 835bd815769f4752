"""The one table from logical axes (named by the model in ``llama.py``) to mesh axes, and its strict application.

Column-parallel q/k/v/gate/up split their output axis (``heads``, ``kv_heads``, ``mlp``) over ``tp``; row-parallel
o/down split their input axis, which carries the same logical names, so the same rules cover them and XLA inserts
the all-reduce after them. Embedding and LM head are vocabulary-parallel (``vocab`` -> ``tp``); ``embed`` (the
hidden size) is never split, so norms are replicated. Pure tuples come out: the engine turns them into
``jax.sharding.PartitionSpec``; the planner uses them to count bytes per device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

RULES: dict[str, str | None] = {
    "vocab": "tp",
    "embed": None,
    "heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "mlp": "tp",
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
