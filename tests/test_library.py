"""The library API on user-defined models: shard, plan_for, offload/fetch, and the examples built on them."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxmap
from jaxmap.errors import UserError
from jaxmap.library import memory_kinds

ROOT = Path(__file__).resolve().parent.parent


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mesh(n: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:n]), ("tp",))


def test_nnx_mlp_example():
    result = example("shard_nnx_mlp").run(4)
    assert result["shard_shape"] == (64, 64) and result["specs"]["up"] == PartitionSpec(None, "tp")


def test_plan_offload_example():
    result = example("plan_offload").run(1 << 20)
    plan = result["plan"]
    assert [plan.assignment[f"layers/{i}"] for i in (0, 3, 6, 11)] == ["cpu[0]", "cpu[1]", "host", "host"]
    assert plan.bytes_per_device == {"cpu[0]": 3 * 256 * 256 * 4, "cpu[1]": 3 * 256 * 256 * 4}
    assert plan.host_bytes == 6 * 256 * 256 * 4
    assert result["kinds"]["layers/6/w"] == "pinned_host" and result["kinds"]["layers/0/w"] == "device"


def test_logical_axes_tree_and_regex_rules():
    params = {"embed": jnp.ones((64, 16)), "blocks": [{"w": jnp.ones((16, 32)), "b": jnp.ones((32,))}]}
    axes = {"embed": ("vocab", "embed"), "blocks": [{"w": ("embed", "mlp"), "b": ("mlp",)}]}
    placed = jaxmap.shard(params, {"vocab": "tp", "embed": None, "mlp": "tp"}, mesh(4), logical_axes=axes)
    assert placed["embed"].sharding.spec == PartitionSpec("tp", None)
    assert placed["blocks"][0]["b"].addressable_shards[0].data.shape == (8,)
    by_regex = jaxmap.shard(params, [(r"blocks/\d+/w", PartitionSpec(None, "tp"))], mesh(4))
    assert by_regex["blocks"][0]["w"].sharding.spec == PartitionSpec(None, "tp")
    assert by_regex["embed"].sharding.is_fully_replicated  # no rule: replicated
    uneven = {"w": jnp.ones((16, 30))}
    with pytest.raises(UserError, match="does not divide"):
        jaxmap.shard(uneven, [("w", PartitionSpec(None, "tp"))], mesh(4))
    with pytest.raises(UserError, match="not in the rules table"):
        jaxmap.shard(params, {"embed": None}, mesh(4), logical_axes=axes)


def test_plan_for_needs_a_capacity_on_cpu_and_counts_bytes():
    shapes = {"a": jax.ShapeDtypeStruct((1024,), jnp.float32), "b": jax.ShapeDtypeStruct((1024,), jnp.bfloat16)}
    with pytest.raises(UserError, match="capacity_bytes"):
        jaxmap.plan_for(shapes, devices=jax.devices()[:1])
    plan = jaxmap.plan_for(shapes, devices=jax.devices()[:1], capacity_bytes=4096, reserve_fraction=0)
    assert plan.assignment == {"a": "cpu[0]", "b": "host"} and plan.host_bytes == 2048


def test_offload_and_fetch_inside_jit():
    params = jaxmap.shard({"w": jnp.arange(32.0).reshape(4, 8), "v": jnp.ones(8)},
                          [("w", PartitionSpec(None, "tp"))], mesh(2))
    off = jaxmap.offload(params, "w")
    assert memory_kinds(off) == {"v": "device", "w": "pinned_host"}
    assert off["w"].sharding.spec == PartitionSpec(None, "tp")
    out = jax.jit(lambda p: jaxmap.fetch(p)["w"] @ p["v"])(off)
    np.testing.assert_allclose(np.asarray(out), np.arange(32.0).reshape(4, 8).sum(1))
    assert memory_kinds(jaxmap.fetch(off)) == {"v": "device", "w": "device"}


# ---- logical-axis tables ---------------------------------------------------------------------------------------------
def test_a_table_naming_a_mesh_axis_the_mesh_lacks_is_an_error():
    with pytest.raises(UserError, match="'mlp': 'dp' names mesh axis 'dp'; the mesh has tp"):
        jaxmap.shard({"a": jnp.ones((8, 8))}, {"embed": None, "mlp": "dp"}, mesh(4),
                     logical_axes={"a": ("embed", "mlp")})
    with pytest.raises(UserError, match="must be a mesh axis name"):
        jaxmap.shardings_for({"a": jnp.ones((8, 8))}, {"embed": 3}, mesh(4), logical_axes={"a": ("embed", None)})


@pytest.mark.parametrize("rules, axes", [([("w", PartitionSpec(None, "tp"))], None),
                                         ({"a": None, "m": "tp"}, {"w": ("a", "m")})], ids=["regex", "logical"])
def test_a_dimension_that_does_not_divide_is_an_error_in_both_forms(rules, axes):
    with pytest.raises(UserError, match=r"w: dimension 1 \(30\) does not divide over mesh axis tp of size 4"):
        jaxmap.shard({"w": jnp.ones((16, 30))}, rules, mesh(4), logical_axes=axes)


def test_a_mesh_axis_splits_one_dimension_of_a_logical_spec():
    spec = jaxmap.shardings_for({"w": jnp.ones((8, 8))}, {"embed": "tp", "mlp": "tp"}, mesh(4),
                                logical_axes={"w": ("embed", "mlp")})["w"].spec
    assert spec == PartitionSpec("tp", None)


@pytest.mark.parametrize("params, axes, message", [
    ({"a": jnp.ones(8)}, {"a": ("embed", "mlp")}, r"a: 2 logical axes \('embed', 'mlp'\) for a 1-D array"),
    ({"a": jnp.ones(8), "b": jnp.ones(4)}, {"a": ("embed",)}, "logical_axes has no entry for b"),
    ({"a": jnp.ones(8)}, {"a": ("embed",), "c": ("embed",)}, "logical_axes has an entry for c, which params does not"),
    ({"l": [jnp.ones(8)]}, {"l": [("embed",), ("embed",)]}, "logical_axes has an entry for l/1"),
    ({"a": jnp.ones(8)}, {"a": (("embed",),)}, "one axis name \\(or None\\) per dimension"),
    ({"a": jnp.ones(8)}, {"a": "embed"}, "must be a tuple"),
    ({"a": {"w": jnp.ones(8)}}, {"a": ("embed",)}, "gives a one tuple .* \\(a/w\\); give each array its own tuple"),
], ids=["rank", "missing", "extra", "extra-list-item", "nested", "bare-string", "tuple-over-a-subtree"])
def test_logical_axes_that_do_not_fit_params_are_named(params, axes, message):
    with pytest.raises(UserError, match=message):
        jaxmap.shard(params, {"embed": "tp", "mlp": None}, mesh(4), logical_axes=axes)


def test_logical_axes_are_matched_by_path_and_none_replicates_a_subtree():
    params = {"a": jnp.ones((8, 4)), "b": {"x": jnp.ones(8), "y": jnp.ones(8)}}
    got = jaxmap.shardings_for(params, {"embed": "tp"}, mesh(4), logical_axes={"b": None, "a": ["embed", None]})
    assert got["a"].spec == PartitionSpec("tp", None) and got["b"]["x"].spec == PartitionSpec()


# ---- abstract models ------------------------------------------------------------------------------------------------
class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        meta = {"eager_sharding": False}
        self.lin = nnx.Linear(8, 16, rngs=rngs, kernel_metadata={"out_sharding": ("embed", "mlp"), **meta},
                              bias_metadata={"out_sharding": ("mlp",), **meta})


def test_shardings_for_an_abstract_nnx_model_feeds_a_jitted_init():
    table, m = {"embed": None, "mlp": "tp"}, mesh(4)
    shardings = jaxmap.shardings_for(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))), table, m)
    assert shardings["lin"]["kernel"].spec == PartitionSpec(None, "tp")
    state = jax.jit(lambda: nnx.state(Tiny(nnx.Rngs(0))), out_shardings=shardings)()
    assert state["lin"]["kernel"][...].sharding.spec == PartitionSpec(None, "tp")
    abstract = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32)}
    assert jaxmap.shardings_for(abstract, [("w", PartitionSpec("tp"))], m)["w"] == NamedSharding(m, PartitionSpec("tp"))
    with pytest.raises(UserError, match="w is a ShapeDtypeStruct .* use jaxmap.shardings_for"):
        jaxmap.shard(abstract, [("w", PartitionSpec("tp"))], m)


# ---- one naming of paths --------------------------------------------------------------------------------------------
def test_shard_offload_fetch_and_plan_see_the_same_nnx_paths(caplog):
    model = Tiny(nnx.Rngs(0))
    placed = jaxmap.shard(model, {"embed": None, "mlp": "tp"}, mesh(4))
    paths = {"lin/bias", "lin/kernel"}
    assert set(memory_kinds(placed)) == paths == set(memory_kinds(nnx.state(model))) == set(memory_kinds(model))
    for tree in (placed, nnx.state(model), model):
        assert memory_kinds(jaxmap.offload(tree, r"lin/kernel$"))["lin/kernel"] == "pinned_host"
    assert memory_kinds(jaxmap.fetch(jaxmap.offload(model, "kernel$"), "kernel$"))["lin/kernel"] == "device"
    assert set(jaxmap.plan_for(model, devices=jax.devices()[:1], capacity_bytes=1e6, depth=2).assignment) == paths
    with caplog.at_level(logging.WARNING, logger="jaxmap.library"):
        assert memory_kinds(jaxmap.offload(placed, "kernel/value$")) == dict.fromkeys(sorted(paths), "device")
        jaxmap.fetch(placed, "nothing")
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "jaxmap.offload: select 'kernel/value$' matches no leaf, nothing moved",
        "jaxmap.fetch: select 'nothing' matches no leaf, nothing moved"]
    assert "lin/bias" in caplog.records[0].getMessage()


def test_offload_mistakes_and_numpy_leaves():
    placed = jaxmap.shard({"a": jnp.ones((8, 8))}, [], mesh(4))
    with pytest.raises(UserError, match="memory_kind 'hbm' is not a memory of cpu devices; they have device, pinned"):
        jaxmap.offload(placed, memory_kind="hbm")
    with pytest.raises(UserError, match="not a valid regular expression"):
        jaxmap.offload(placed, "(")
    with pytest.raises(UserError, match="select must be"):
        jaxmap.fetch(placed, 3)
    host = np.ones(3)
    assert jaxmap.offload({"n": host})["n"] is host  # documented: numpy leaves are left as they are


# ---- plan_for -------------------------------------------------------------------------------------------------------
def sds(nbytes: int):
    return jax.ShapeDtypeStruct((nbytes,), jnp.uint8)


def test_plan_for_names_devices_as_the_engine_does():
    plan = jaxmap.plan_for({"a": sds(3000), "b": sds(3000)}, devices=jax.devices()[2:4], capacity_bytes=4096,
                           reserve_fraction=0)
    assert plan.assignment == {"a": "cpu[2]", "b": "cpu[3]"}
    plan = jaxmap.plan_for({"a": sds(10)}, devices=jax.devices()[2:4], capacity_bytes={"cpu[2]": 100, "cpu[3]": 50})
    assert plan.capacity == {"cpu[2]": 100, "cpu[3]": 50}


@pytest.mark.parametrize("capacity", [5000.0, np.int64(5000), np.float32(5000.5), 5000])
def test_plan_for_takes_any_positive_real_capacity(capacity):
    plan = jaxmap.plan_for({"a": sds(4000)}, devices=jax.devices()[:1], capacity_bytes=capacity, reserve_fraction=0)
    assert plan.assignment == {"a": "cpu[0]"} and plan.capacity == {"cpu[0]": 5000}


@pytest.mark.parametrize("kwargs, message", [
    ({"capacity_bytes": True}, "capacity_bytes must be a positive number of bytes, got True"),
    ({"capacity_bytes": "5000"}, "capacity_bytes must be a positive number"),
    ({"capacity_bytes": 0}, "capacity_bytes must be a positive number"),
    ({"capacity_bytes": float("nan")}, "capacity_bytes must be a positive number"),
    ({"capacity_bytes": {"cpu[0]": -1}}, r"capacity_bytes\['cpu\[0\]'\] must be a positive number"),
    ({"capacity_bytes": {"cpu[7]": 100}}, r"capacity_bytes names cpu\[7\], not among the devices \(cpu\[0\]\)"),
    ({"capacity_bytes": 100, "reserve_fraction": 1}, r"reserve_fraction must be a number in \[0, 1\)"),
    ({"capacity_bytes": 100, "reserve_fraction": -0.1}, "reserve_fraction must be"),
    ({"capacity_bytes": 100, "depth": -1}, "depth must be an integer >= 0"),
    ({"capacity_bytes": 100, "depth": 1.5}, "depth must be an integer >= 0"),
])
def test_plan_for_refuses_bad_arguments(kwargs, message):
    with pytest.raises(UserError, match=message):
        jaxmap.plan_for({"a": sds(10)}, devices=jax.devices()[:1], **kwargs)


def test_plan_for_walks_nnx_modules_and_states_like_dicts():
    model = Tiny(nnx.Rngs(0))
    for tree in (model, nnx.state(model), nnx.eval_shape(lambda: Tiny(nnx.Rngs(0)))):
        plan = jaxmap.plan_for(tree, devices=jax.devices()[:2], capacity_bytes=520, reserve_fraction=0, depth=2)
        assert plan.assignment == {"lin/bias": "cpu[0]", "lin/kernel": "cpu[1]"}  # 64 B, then 512 B
        assert jaxmap.plan_for(tree, devices=jax.devices()[:1], capacity_bytes=1e6).assignment == {"lin": "cpu[0]"}


def test_plan_for_keeps_consecutive_runs_and_sends_only_misfits_to_host():
    devices = jax.devices()[:2]
    tree = {"a": sds(1000), "huge": sds(10_000), "b": sds(1000), "c": sds(3000), "d": sds(500), "e": sds(3000)}
    plan = jaxmap.plan_for(tree, devices=devices, capacity_bytes=4096, reserve_fraction=0)
    # huge fits nowhere: host, and b still goes to cpu[0]; c moves on to cpu[1] and d stays there, never back
    assert plan.assignment == {"a": "cpu[0]", "huge": "host", "b": "cpu[0]", "c": "cpu[1]", "d": "cpu[1]",
                               "e": "host"}
    assert plan.bytes_per_device == {"cpu[0]": 2000, "cpu[1]": 3500} and plan.host_bytes == 13_000


def test_plan_for_odd_leaves():
    devices = jax.devices()[:1]
    with pytest.raises(UserError, match="two subtrees have the path 'a/b'"):
        jaxmap.plan_for({"a/b": np.ones(2), "a": {"b": np.ones(3)}}, devices=devices, capacity_bytes=1e6, depth=2)
    plan = jaxmap.plan_for({"f": 1.0, "k": jax.random.key(0), "ks": jax.random.split(jax.random.key(0), 3)},
                           devices=devices, capacity_bytes=1e6, reserve_fraction=0)
    assert plan.bytes_per_device == {"cpu[0]": 4 + 8 + 24}
    with pytest.raises(UserError, match="s: a str leaf is not an array"):
        jaxmap.plan_for({"s": "x"}, devices=devices, capacity_bytes=1e6)


# ---- regex rules ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rules, message", [
    ([("a", "tp")], r"rule 0 \('a'\): the spec 'tp' is a bare string; write PartitionSpec\('tp'\)"),
    ([("(", PartitionSpec("tp"))], r"rule 0: '\(' is not a valid regular expression"),
    ([("a",)], r"rule 0 \(\('a',\)\) is not a \(regex, PartitionSpec\) pair"),
    (["a"], "is not a \\(regex, PartitionSpec\\) pair"),
    ("a", "rules must be a list"),
    ([("a", PartitionSpec("tp", "tp"))], "uses mesh axis 'tp' twice"),
    ([("a", PartitionSpec(PartitionSpec.UNCONSTRAINED))], "P.UNCONSTRAINED is for with_sharding_constraint"),
    ([("zzz", PartitionSpec("dp"))], "names mesh axis 'dp'; the mesh has tp"),
    ([("a", 3)], "is not a PartitionSpec"),
], ids=["bare-string", "bad-regex", "not-a-pair", "not-a-tuple", "rules-a-string", "axis-twice", "unconstrained",
        "unknown-axis", "not-a-spec"])
def test_regex_rule_mistakes_are_user_errors(rules, message):
    with pytest.raises(UserError, match=message):
        jaxmap.shard({"a": jnp.ones((8, 8))}, rules, mesh(4))


def test_regex_rules_accept_tuples_and_refuse_non_array_leaves():
    got = jaxmap.shardings_for({"a": jnp.ones((8, 8)), "n": 1.0}, [("a", (None, "tp")), ("n", None)], mesh(4))
    assert got["a"].spec == PartitionSpec(None, "tp") and got["n"].spec == PartitionSpec()
    with pytest.raises(UserError, match="s: a str leaf is not an array"):
        jaxmap.shard({"a": jnp.ones((8, 8)), "s": "hello"}, [("a", PartitionSpec("tp"))], mesh(4))


# ---- multi-process --------------------------------------------------------------------------------------------------
CHILD = """
import sys
import numpy as np
from jaxmap.engine import multihost
multihost.initialize(multihost.resolve())
import jax
from jax.sharding import Mesh, PartitionSpec as P
import jaxmap
from jaxmap.errors import UserError
mesh = Mesh(np.array(sorted(jax.devices(), key=lambda d: d.id)), ("tp",))
assert jaxmap.shard({"w": np.ones((4, 4))}, [("w", P("tp"))], mesh)["w"].sharding.spec == P("tp")  # host data: fine
local = jax.device_put(np.ones((4, 4)), jax.local_devices()[0])  # committed, and different on each process
try:
    jaxmap.shard({"w": local}, [("w", P("tp"))], mesh)
except UserError as exc:
    print("refused:", exc, flush=True)
    sys.exit(0)
sys.exit(1)
"""


def test_shard_refuses_process_local_arrays_for_a_two_process_mesh():
    """Without the check process 1 hung and process 0 got a gloo DEADLINE_EXCEEDED; now both refuse at once."""
    from jaxmap.cli.launch import launch

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    status, out, errs = launch([sys.executable, "-c", CHILD], num_processes=2, cpu_devices=2, timeout_s=60,
                               cwd=str(ROOT), env=env)
    assert status == 0, "\n".join(e[-2000:] for e in errs)
    assert "refused: w: an array committed to process 0's devices cannot be resharded" in out


# ---- package --------------------------------------------------------------------------------------------------------
def test_the_library_module_is_reachable_from_the_package():
    code = "import jaxmap; print(jaxmap.library.memory_kinds.__name__, 'shardings_for' in jaxmap.__all__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert proc.stdout.split() == ["memory_kinds", "True"], proc.stderr[-2000:]
