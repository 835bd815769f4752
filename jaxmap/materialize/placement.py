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
from jaxmap.config.hardware import Hardware, live_jax_devices
from jaxmap.errors import UserError
from jaxmap.families import ParamSpec
from jaxmap.planning.device_map import DeviceMap
from jaxmap.planning.expert_parallel import axis_sizes
from jaxmap.planning.rules import RULES, logical_to_spec

TP = "tp"
EP = "ep"


@dataclasses.dataclass
class StagePlacement:
    """Where one engine stage lives: its layers, its mesh and whether it holds the embeddings / the LM head."""

    start: int
    end: int
    mesh: Mesh
    is_first: bool
    is_last: bool
    memory_kind: str = "device"  # where the stage's layer weights live: device, host (pinned_host) or disk
    ep: int = 1  # routed experts split over ep groups of the mesh's devices (jaxmap.planning.expert_parallel)

    @property
    def tp(self) -> int:
        return self.mesh.shape[TP]

    @property
    def platform(self) -> str:
        return self.mesh.devices.flat[0].platform

    def param_sharding(self, spec: ParamSpec, config: ModelConfig, memory_kind: str | None = None) -> NamedSharding:
        """The parameter's sharding; ``memory_kind="pinned_host"`` for host-tier layers (moved in per step). Routed
        expert stacks of an ep stage are placed on :func:`expert_mesh`, the same devices as ``ep x tp/ep``."""
        sizes = axis_sizes(spec.role, self.tp, self.ep)
        axes = logical_to_spec(spec.axes, RULES, spec.shape, sizes, name=spec.hf_name,
                               units={"heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads})
        mesh = expert_mesh(self.mesh, self.ep) if sizes["ep"] > 1 else self.mesh
        return NamedSharding(mesh, PartitionSpec(*axes), memory_kind=memory_kind)

    def cache_sharding(self, config: ModelConfig) -> NamedSharding:
        """KV buffers [batch, kv_heads, slots, head_dim]: split on kv heads when they divide over tp."""
        split = self.tp > 1 and config.num_key_value_heads % self.tp == 0
        return NamedSharding(self.mesh, PartitionSpec(None, TP if split else None, None, None))

    def activation_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def expert_mesh(mesh: Mesh, ep: int) -> Mesh:
    """A stage's devices, in the same order, as ``(ep, tp / ep)``: the experts' view of the stage (vLLM's expert
    parallelism), axes ``ep`` and ``tp``. jit takes arrays of both meshes in one program (the same device list), and
    the MoE MLP finds ``ep`` on its stacks' mesh (jaxmap.engine.moe_parallel)."""
    devices = np.asarray(mesh.devices).reshape(ep, -1)
    return Mesh(devices, (EP, TP), axis_types=(AxisType.Auto, AxisType.Auto))


def live_devices_by_name() -> dict[str, jax.Device]:
    """jax devices by jaxmap name (``cuda[0]``, ``cpu[3]``), enumerated exactly as ``Hardware.from_jax`` names them.

    Names, not ids: jax numbers each platform's devices from 0, so a GPU and the host CPU both have id 0.
    """
    return {f"{platform}[{ordinal}]": dev for platform, ordinal, dev in live_jax_devices()}


def make_mesh(names: list[str], live: dict[str, jax.Device]) -> Mesh:
    missing = [n for n in names if n not in live]
    if missing:
        raise UserError(f"the plan names device {missing[0]}, which this machine does not have (it has "
                        f"{', '.join(live)}); make the plan on this machine")
    devices = [live[n] for n in names]
    try:
        grid = mesh_utils.create_device_mesh((len(devices),), devices=devices)
    except (ValueError, AssertionError, NotImplementedError):
        grid = np.array(devices)
    return Mesh(grid, (TP,), axis_types=(AxisType.Auto,))


def stage_placements(device_map: DeviceMap, hardware: Hardware) -> list[StagePlacement]:
    """The engine's stages for a plan; embeddings or LM head placed away from their stage become 0-layer stages."""
    for e in device_map.experts:  # experts apart run beside resident layers (jaxmap.engine.remote_experts)
        stage = next((s for s in device_map.stages if s.start <= e.layer < s.end), None)
        if stage is not None and stage.memory_kind != "device":
            raise UserError(f"the plan keeps layer {e.layer} in {stage.memory_kind} memory and its routed experts "
                            f"apart ({e.memory_kind}); experts apart run beside resident layers only (a streamed "
                            "layer brings its experts with it): drop the expert placement for that layer")
    live = live_devices_by_name()

    def names(devices: list[str]) -> list[str]:  # "cpu" (the host) -> its full name
        return [hardware.find(n).name if hardware.find(n) is not None else n for n in devices]

    stages = device_map.stages
    out: list[StagePlacement] = []
    embed_devices = device_map.embed.devices
    if embed_devices and embed_devices != stages[0].devices:
        out.append(StagePlacement(0, 0, make_mesh(names(embed_devices), live), True, False))
    for s in stages:
        out.append(StagePlacement(s.start, s.end, make_mesh(names(s.devices), live), not out, False, s.memory_kind,
                                  s.ep))
    head_devices = device_map.lm_head.devices
    if head_devices and head_devices != stages[-1].devices:
        end = device_map.num_layers
        out.append(StagePlacement(end, end, make_mesh(names(head_devices), live), False, True))
    else:
        out[-1].is_last = True
    return out
