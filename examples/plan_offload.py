"""Plan and run a model that does not fit one device: fill the devices, put the rest in host memory.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python examples/plan_offload.py

CPU devices report no memory size, so the example pretends each holds 1 MiB. ``jaxmap.plan_for`` cuts a stack of
layers into per-layer subtrees and assigns them in order; the layers that fit nowhere go to host memory
(``pinned_host``) and are brought back inside ``jit`` with ``jaxmap.fetch`` when they are used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxmap

D, LAYERS = 256, 12  # 12 layers of 256 x 256 float32: 256 KiB each, 3 MiB in all


def make_params(seed: int = 0) -> dict:
    keys = jax.random.split(jax.random.key(seed), LAYERS)
    return {"layers": [{"w": jax.random.normal(k, (D, D)) / np.sqrt(D)} for k in keys]}


def forward(params: dict, x):
    for layer in params["layers"]:
        layer = jaxmap.fetch(layer)  # a no-op for layers in device memory
        x = jnp.tanh(x @ layer["w"])
    return x


def run(capacity_bytes: int = 1 << 20) -> dict:
    params = make_params()
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    plan = jaxmap.plan_for(shapes, devices=jax.devices()[:2], capacity_bytes=capacity_bytes, depth=2)
    devices = {f"cpu[{i}]": d for i, d in enumerate(jax.devices()[:2])}
    placed = {"layers": []}
    for i, layer in enumerate(params["layers"]):
        where = plan.assignment[f"layers/{i}"]
        if where == "host":  # the last device's host memory, same sharding
            layer = jaxmap.offload(jax.device_put(layer, jax.devices()[0]))
        else:
            layer = jax.device_put(layer, devices[where])
        placed["layers"].append(layer)
    x = jnp.ones((2, D))
    # one jitted layer, called on each layer where it lives (jaxmap's engine runs stages like this, per device group)
    step = jax.jit(lambda layer, h: forward({"layers": [layer]}, h))
    out = x
    for layer in placed["layers"]:
        home = layer["w"].sharding.with_memory_kind("device")  # where this layer computes
        out = step(layer, jax.device_put(out, home))
    np.testing.assert_allclose(np.asarray(out), np.asarray(forward(params, x)), rtol=1e-5, atol=1e-5)
    kinds = jaxmap.library.memory_kinds(placed)
    return {"plan": plan, "kinds": kinds}


if __name__ == "__main__":
    result = run()
    print(result["plan"].render())
    for path, where in result["plan"].assignment.items():
        print(f"  {path}: {where} ({result['kinds'][path + '/w']})")
