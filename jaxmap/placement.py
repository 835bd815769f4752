"""From a DeviceMap (pure data) to live placements: one ``Mesh`` per stage, a ``NamedSharding`` per parameter.

This is the only place where plan names (``cpu[3]``, ``cuda[0]``) meet jax devices. Each stage gets its own
sub-mesh with one axis, ``tp``, built with ``mesh_utils.create_device_mesh`` over the device ids the planner chose
(so a TPU tensor-parallel group follows the interconnect). Parameters are sharded by their logical axes through the
one rules table; the KV cache is split on kv heads where they divide, replicated where tp is a multiple of them.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxmap.config import ModelConfig
from jaxmap.device_map import DeviceMap
from jaxmap.errors import UserError
from jaxmap.hardware import Hardware
from jaxmap.param_specs import ParamSpec
from jaxmap.sharding_rules import RULES, logical_to_spec

TP = "tp"


@dataclasses.dataclass
class StagePlacement:
    """Where one engine stage lives: its layers, its mesh and whether it holds the embeddings / the LM head."""

    start: int
    end: int
    mesh: Mesh
    is_first: bool
    is_last: bool

    @property
    def tp(self) -> int:
        return self.mesh.shape[TP]

    @property
    def platform(self) -> str:
        return self.mesh.devices.flat[0].platform

    def param_sharding(self, spec: ParamSpec, config: ModelConfig) -> NamedSharding:
        axes = logical_to_spec(spec.axes, RULES, spec.shape, {TP: self.tp}, name=spec.hf_name,
                               units={"heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads})
        return NamedSharding(self.mesh, PartitionSpec(*axes))

    def cache_sharding(self, config: ModelConfig) -> NamedSharding:
        """KV buffers [batch, kv_heads, slots, head_dim]: split on kv heads when they divide over tp."""
        split = self.tp > 1 and config.num_key_value_heads % self.tp == 0
        return NamedSharding(self.mesh, PartitionSpec(None, TP if split else None, None, None))

    def activation_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def jax_devices_by_id() -> dict[int, jax.Device]:
    devices = list(jax.devices())
    if devices and devices[0].platform != "cpu":
        try:
            devices += jax.devices("cpu")
        except RuntimeError:
            pass
    return {d.id: d for d in devices}


def make_mesh(device_ids: list[int], by_id: dict[int, jax.Device]) -> Mesh:
    missing = [i for i in device_ids if i not in by_id]
    if missing:
        raise UserError(f"the plan names device id {missing[0]}, which this machine does not have "
                        f"(it has ids {sorted(by_id)}); make the plan on this machine")
    devices = [by_id[i] for i in device_ids]
    try:
        grid = mesh_utils.create_device_mesh((len(devices),), devices=devices)
    except (ValueError, AssertionError, NotImplementedError):
        grid = np.array(devices)
    return Mesh(grid, (TP,), axis_types=(AxisType.Auto,))


def stage_placements(device_map: DeviceMap, hardware: Hardware) -> list[StagePlacement]:
    """The engine's stages for a plan; embeddings or LM head placed away from their stage become 0-layer stages."""
    by_id = jax_devices_by_id()

    def ids(names: list[str]) -> list[int]:
        found = [hardware.find(n) for n in names]
        if any(d is None for d in found):
            raise UserError(f"the plan names {names}, not all of which exist here ({', '.join(hardware.names())})")
        return [d.id for d in found]

    stages = device_map.stages
    out: list[StagePlacement] = []
    embed_devices = device_map.embed.devices
    if embed_devices and embed_devices != stages[0].devices:
        out.append(StagePlacement(0, 0, make_mesh(ids(embed_devices), by_id), True, False))
    for s in stages:
        out.append(StagePlacement(s.start, s.end, make_mesh(list(s.device_ids), by_id), not out, False))
    head_devices = device_map.lm_head.devices
    if head_devices and head_devices != stages[-1].devices:
        end = device_map.num_layers
        out.append(StagePlacement(end, end, make_mesh(ids(head_devices), by_id), False, True))
    else:
        out[-1].is_last = True
    return out
