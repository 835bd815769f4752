"""Expert parallelism: the MoE MLP with the routed experts split over the ``ep`` axis of a stage's expert mesh.

The plan (:mod:`jaxmap.planning.expert_parallel`) gives an ep stage's expert stacks the mesh ``(ep, tp / ep)`` over
the stage's own devices (:func:`jaxmap.materialize.placement.expert_mesh`): device group ``g`` holds experts
``[g * E/ep, (g + 1) * E/ep)``, whole or (with ``tp / ep`` > 1) split on their intermediate dimension inside the
group. Attention and the router stay tensor parallel over all the devices, so every device has every token and its
routing. The MLP then runs inside ``jax.shard_map``: each device remaps the routed ids to its local experts, zeroes
the routing weights of the others, computes its local experts' contributions for all tokens (gather, dense or
grouped, as :mod:`jaxmap.engine.moe` picks per shape, now over ``E / ep`` experts), and one ``psum`` over both axes
sums the groups' (and the inner split's) partial outputs: the same single all-reduce tensor parallelism inside
experts needs.

The MoE MLP finds ep at trace time on its stacks' own abstract mesh (``jax.typeof(w).sharding.mesh`` has an ``ep``
axis), so no engine code passes it. Quantized stacks (one QTensor per expert stacked along a leading axis) split on
that axis like float ones; inside the map each device sees a QTensor of its local shape.

:mod:`jaxmap.engine.moe` hands in its path functions (``paths``, ``float_stack``, ``dense_max``) rather than being
imported here, so the two modules do not import each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxmap.config import ModelConfig
from jaxmap.engine.moe_activation import Activation, down_bias, expert_activation
from jaxmap.families import LayerDesign
from jaxmap.quant.qtensor import QTensor

EP, TP = "ep", "tp"
# (out axis, in axis) of each stack's experts as QTensors ([out, in]) and as floats ([E, in, out]): gate/up are
# column-parallel inside an expert (their intermediate output splits over tp), down row-parallel.
_AXES = {"experts_gate": (TP, None), "experts_up": (TP, None), "experts_down": (None, TP)}
# gate and up biases ([E, I]) split as their projections' outputs; the down bias ([E, D]) is added after the sum
_BIAS_DIM = {"experts_gate_bias": 1, "experts_up_bias": 1}


def expert_mesh_of(w):
    """The abstract mesh of an expert stack placed expert-parallel (an ``ep`` axis above 1), else None."""
    leaf = jax.tree.leaves(w)[0]
    try:
        mesh = jax.typeof(leaf).sharding.mesh
    except (AttributeError, TypeError):
        return None
    names = getattr(mesh, "axis_names", ())
    return mesh if EP in names and mesh.shape[EP] > 1 else None


def _dim(w, out_axis, in_axis) -> int:
    """Which dimension of a stack (or of each QTensor leaf) the inner ``tp`` split cuts."""
    if isinstance(w, QTensor):
        return 1 if out_axis else 2
    return 2 if out_axis else 1  # float [E, in, out]


def _by_device(a, ep: int, tp: int, dim: int):
    """``[E, ...]`` (experts over ``ep``, ``dim`` over ``tp``) as ``[ep * tp, E / ep, ...]``: row ``g * tp + s`` is
    what device ``g * tp + s`` of the stage holds (group ``g``'s experts, inner shard ``s``), so a 1-D map over the
    stage's own mesh hands every device its block (a local reinterpretation, no data moves)."""
    e = a.shape[0]
    a = a.reshape(ep, e // ep, *a.shape[1:])
    k = dim + 1
    a = a.reshape(*a.shape[:k], tp, a.shape[k] // tp, *a.shape[k + 1:])
    rest = [i for i in range(a.ndim) if i not in (0, k)]
    a = a.transpose([0, k, *rest])
    return a.reshape(ep * tp, *a.shape[2:])


def _local(w, out_axis, in_axis, tp: int):
    """A device's block of a stack without its leading 1; a QTensor's static shape becomes its local ``[out, in]``."""
    w = jax.tree.map(lambda a: a[0], w)
    if not isinstance(w, QTensor):
        return w
    out, n = w.shape
    return dataclasses.replace(w, shape=(out // (tp if out_axis else 1), n // (tp if in_axis else 1)))


def _grouped_local(x, weights, local, mine, e_local: int, wg, wu, wd, act: Activation):
    """The grouped path over this device's experts: its (token, expert) pairs sorted by local expert, the others
    sorted past the last group (ragged_dot leaves rows outside every group zero) and weighted zero."""
    n, k = local.shape
    keys = jnp.where(mine, local, e_local).reshape(-1)
    order = jnp.argsort(keys, stable=True)
    tokens = order // k
    xs = x[tokens]
    sizes = jnp.bincount(keys, length=e_local + 1)[:e_local].astype(jnp.int32)
    g = jax.lax.ragged_dot(xs, wg, sizes)
    u = jax.lax.ragged_dot(xs, wu, sizes)
    # rows past the last group are zeroed below: any expert's biases will do for them
    out = jax.lax.ragged_dot(act(g, u, jnp.minimum(keys[order], e_local - 1)), wd, sizes)
    keep = mine.reshape(-1)[order][:, None]
    out = jnp.where(keep, out.astype(jnp.float32), 0.0) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((n, x.shape[1]), jnp.float32).at[tokens].add(out)


def moe_mlp_ep(mesh, x: jnp.ndarray, weights: jnp.ndarray, idx: jnp.ndarray, stacks: Mapping, config: ModelConfig,
               path: str | None, *, paths: Mapping[str, Callable], float_stack: Callable, dense_max: int,
               biases: Mapping[str, jnp.ndarray] | None = None, design: LayerDesign | None = None) -> jnp.ndarray:
    """The routed experts' output ``[N, D]`` (float32) for tokens ``x [N, D]`` routed to ``idx`` with ``weights``
    (``[N, k]``, every device has them all), the stacks split over ``mesh``'s ``ep`` axis; ``path`` forces one
    computation as in :func:`jaxmap.engine.moe.moe_mlp`. ``biases`` (by :data:`moe_activation.BIAS_KEYS` key) and
    ``design`` carry gpt-oss's expert biases and clamped activation: the gate and up biases go to the devices
    holding their experts (split as the projections' outputs), the down bias is added once after the sum."""
    ep, tp = mesh.shape[EP], mesh.shape.get(TP, 1)
    stage_mesh = jax.typeof(x).sharding.mesh  # the stage's 1-D mesh: (ep, tp) rows in device order
    e_local = config.num_experts // ep
    # the path for this device's share (E/ep experts, each I/tp wide), by moe.choose_path's rule
    n, k = idx.shape
    name = path or ("gather" if n * k <= e_local else
                    "dense" if n * e_local * (config.moe_intermediate_size // tp) <= dense_max else "grouped")
    keys = ("experts_gate", "experts_up", "experts_down")
    blocks = [jax.tree.map(lambda a, k=k: _by_device(a, ep, tp, _dim(stacks[k], *_AXES[k])), stacks[k])
              for k in keys]
    biases = dict(biases or {})
    inner = {k: _by_device(biases[k], ep, tp, dim) for k, dim in _BIAS_DIM.items() if k in biases}

    def body(x, weights, idx, inner, wg, wu, wd):
        wg, wu, wd = (_local(w, *_AXES[k], tp) for w, k in zip((wg, wu, wd), keys, strict=True))
        act = expert_activation(design, {k: b[0] for k, b in inner.items()})
        local = idx - jax.lax.axis_index(TP) // tp * e_local
        mine = (local >= 0) & (local < e_local)
        w_mine = jnp.where(mine, weights, 0.0)
        if name != "gather":
            wg, wu, wd = (float_stack(w, x.dtype) for w in (wg, wu, wd))
        if name == "grouped":
            out = _grouped_local(x, w_mine, local, mine, e_local, wg, wu, wd, act)
        else:  # another device's experts: expert 0 here, weighted zero
            out = paths[name](x, w_mine, jnp.where(mine, local, 0), wg, wu, wd, act)
        return jax.lax.psum(out, TP)

    specs = tuple(jax.tree.map(lambda _: P(TP), b) for b in blocks)
    inner_specs = {k: P(TP) for k in inner}
    out = jax.shard_map(body, mesh=stage_mesh, in_specs=(P(), P(), P(), inner_specs, *specs), out_specs=P())(
        x, weights, idx, inner, *blocks)
    extra = down_bias(biases, weights, idx)
    return out if extra is None else out + extra
