"""The library API on user-defined models: shard, plan_for, offload/fetch, and the examples built on them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

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
    # a logical axis that does not divide stays whole (like the engine's replicated kv heads)
    assert jaxmap.shard(uneven, {"a": None, "m": "tp"}, mesh(4), logical_axes={"w": ("a", "m")})["w"].sharding \
        .is_fully_replicated


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
