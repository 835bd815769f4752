"""Shard a user-defined flax NNX MLP over a mesh with jaxmap's rules, and run it.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/shard_nnx_mlp.py

Two ways to say where each weight goes: logical axis names on the ``nnx.Param``s plus a table from logical names
to mesh axes, or regexes over the parameter paths. Both give the same placement here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

import jaxmap


class MLP(nnx.Module):
    def __init__(self, d: int, f: int, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        # logical axes as metadata; eager_sharding=False: placement is decided later, by jaxmap.shard
        self.up = nnx.Param(init(rngs.params(), (d, f)), out_sharding=("embed", "mlp"), eager_sharding=False)
        self.down = nnx.Param(init(rngs.params(), (f, d)), out_sharding=("mlp", "embed"), eager_sharding=False)
        self.norm = nnx.Param(jnp.ones((d,)), out_sharding=("embed",), eager_sharding=False)

    def __call__(self, x):
        return x + jax.nn.gelu((x * self.norm[...]) @ self.up[...]) @ self.down[...]


def apply(params: dict, x):
    return x + jax.nn.gelu((x * params["norm"]) @ params["up"]) @ params["down"]


def run(num_devices: int | None = None) -> dict:
    devices = jax.devices()[: num_devices or len(jax.devices())]
    mesh = Mesh(np.array(devices), ("tp",))
    model = MLP(64, 256, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 64))
    expected = model(x)

    # 1. a logical-axis table applied to the nnx.Param metadata
    by_axes = jaxmap.shard(model, {"embed": None, "mlp": "tp"}, mesh)
    # 2. regex rules over '/'-joined paths (first match wins; unmatched leaves are replicated)
    by_regex = jaxmap.shard(nnx.state(model), [(r"up$", PartitionSpec(None, "tp")),
                                               (r"down$", PartitionSpec("tp", None))], mesh)
    out = jax.jit(apply)(by_axes, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
    specs = {k: v.sharding.spec for k, v in by_axes.items()}
    assert all(v.sharding.is_equivalent_to(by_regex[k].sharding, v.ndim) for k, v in by_axes.items())
    return {"specs": specs, "shard_shape": by_axes["up"].addressable_shards[0].data.shape, "devices": len(devices)}


if __name__ == "__main__":
    result = run()
    print(f"{result['devices']} devices; up is split into shards of {result['shard_shape']}")
    for name, spec in result["specs"].items():
        print(f"  {name}: {spec}")
