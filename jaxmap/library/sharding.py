"""``shard`` / ``shardings_for``: a pytree on a mesh, by regex rules over leaf paths or by a logical-axis table.

The specs come from the model's rules machinery (:mod:`jaxmap.planning.rules`): a logical-axis table is applied by
:func:`~jaxmap.planning.rules.spec_for_axes` and a regex rule's ``PartitionSpec`` is checked by
:func:`~jaxmap.planning.rules.check_spec_axes` / :func:`~jaxmap.planning.rules.check_spec_fits`, the same
unknown-axis, mesh-axis and divisibility checks; their ``ShardingError`` reaches the caller as a :class:`UserError`
with the same message. What stays here is jax and pytree work: matching a logical-axes tree to params by path, regex
matching, ``NamedSharding``s, and the placement itself.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmap.engine.multihost import put
from jaxmap.errors import UserError
from jaxmap.library.paths import SCALARS, nnx_axes, path_str, plain
from jaxmap.planning.rules import (
    ShardingError,
    check_rules_table,
    check_spec_axes,
    check_spec_fits,
    mesh_axes_of,
    spec_for_axes,
)

Rules = Sequence[tuple[str, PartitionSpec | tuple | None]] | Mapping[str, str | tuple[str, ...] | None]


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """The rules machinery's errors are the caller's mistakes here (its table, its rules): a UserError each."""
    try:
        yield
    except ShardingError as exc:
        raise UserError(str(exc)) from None


def _leaf_shape(name: str, x: Any) -> tuple[int, ...]:
    """The shape of an array-like leaf; anything else is refused by path rather than failing inside jax."""
    if isinstance(x, SCALARS):
        return ()
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise UserError(f"{name}: a {type(x).__name__} leaf is not an array; shard and shardings_for take trees of "
                        "arrays (or jax.ShapeDtypeStructs for shardings_for): keep other values out of the tree")
    return tuple(x.shape)


# ---- logical axes ---------------------------------------------------------------------------------------------------
def spec_from_logical(axes: Any, table: Mapping[str, Any], mesh: Mesh, shape: Sequence[int],
                      name: str = "leaf") -> PartitionSpec:
    """A ``PartitionSpec`` from logical axis names (:func:`jaxmap.planning.rules.spec_for_axes` on this mesh).

    A mesh axis splits at most one dimension (a later logical axis mapped to an axis already used stays whole, as in
    flax's logical rules); a dimension that does not divide over its mesh axes is an error, not a silent replica:
    replicating a weight the table says to split would cost memory the caller did not plan for.
    """
    with _user_errors():
        return PartitionSpec(*spec_for_axes(axes, table, shape, dict(mesh.shape), name=name))


def _is_axes(x: Any) -> bool:
    """A logical-axes tree's leaf: a tuple of axis names (or None), or None for a whole replicated subtree."""
    return x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))


def _child(node: Any, key: Any) -> Any:
    """One step down a tree by a jax key-path entry (dict key, sequence index or attribute)."""
    if hasattr(key, "name"):
        return getattr(node, key.name)
    return node[key.key if hasattr(key, "key") else key.idx]


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
        logical_axes = nnx_axes(params)
    if logical_axes is None:
        raise UserError("a logical-axis rules table needs logical_axes= (a tree of axis-name tuples parallel to "
                        "params) or flax nnx.Param leaves with sharding metadata")
    if _is_axes(logical_axes):  # one tuple for every array
        return [logical_axes] * len(flat)
    out = [_axes_at(logical_axes, path, name) for (path, _), name in zip(flat, names, strict=True)]
    _refuse_extra_axes(logical_axes, names)
    return out


# ---- regex rules ----------------------------------------------------------------------------------------------------
def _entry_axes(entry: Any, where: str) -> tuple[str, ...]:
    """One PartitionSpec entry's mesh axes; jax's ``P.UNCONSTRAINED`` is refused with its own advice."""
    if entry is PartitionSpec.UNCONSTRAINED:
        raise UserError(f"{where}: P.UNCONSTRAINED is for with_sharding_constraint inside jit; a placed array needs "
                        "a mesh axis name, a tuple of them, or None (whole) for each dimension")
    return mesh_axes_of(entry, where)


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
    check_spec_axes(spec, dict(mesh.shape), where, entry_axes=_entry_axes)
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
            check_spec_fits(spec, shape, dict(mesh.shape), name=name)
            return spec
    return PartitionSpec()


# ---- the public functions -------------------------------------------------------------------------------------------
def shardings_for(params: Any, rules: Rules, mesh: Mesh, logical_axes: Any = None) -> Any:
    """The ``NamedSharding`` tree :func:`shard` would use, for ``jit`` ``in_shardings``/``out_shardings``.

    Works on abstract trees too (``jax.eval_shape``, ``nnx.eval_shape``): that is how a jitted init creates the
    parameters already sharded instead of materializing them on one device first.
    """
    if not isinstance(mesh, Mesh):
        raise UserError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(plain(params))
    names = [path_str(p) for p, _ in flat]
    shapes = [_leaf_shape(n, x) for n, (_, x) in zip(names, flat, strict=True)]
    sizes = dict(mesh.shape)
    with _user_errors():
        if isinstance(rules, Mapping):  # logical-axis table
            check_rules_table(rules, sizes)
            axes = _logical_axes_list(params, flat, names, logical_axes)
            specs = [PartitionSpec(*spec_for_axes(a, rules, s, sizes, name=n))
                     for a, s, n in zip(axes, shapes, names, strict=True)]
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
    tree = plain(params)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    names, leaves = [path_str(p) for p, _ in flat], [x for _, x in flat]
    _refuse_abstract(names, leaves)
    shardings = shardings_for(params, rules, mesh, logical_axes)
    _refuse_local_to_multiprocess(names, leaves, jax.tree.leaves(shardings))
    return jax.tree.map(put, tree, shardings)
