"""Routed experts held apart from their layer (issue 17, ``DeviceMap.experts``): read and placed here, run by
:mod:`jaxmap.engine.remote_experts`.

- ``cpu`` (``--cpu-moe``, ``--n-cpu-moe``, ``-ot REGEX=cpu``) and ``device`` (``-ot REGEX=cuda[1]``): the stacks are
  arrays committed to that device (host memory for the CPU device), in their stored or quantized type (bfloat16 stays
  bfloat16, a QTensor stack stays quantized), computed there.
- ``host``: the stacks are arrays of the CPU device too (host memory), never computed there: each step moves the
  routed experts' slices (decode) or the whole stack (prefill) to the layer's devices.
- ``disk``: nothing is read at load; each step reads the routed experts (or all of them) from the model's own
  safetensors files through their memory map, a stack of per-expert tensors reading only the chosen ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxmap.config import ModelConfig
from jaxmap.errors import UserError
from jaxmap.families import ParamSpec
from jaxmap.loading.safetensors_source import SafetensorsSource, as_numpy_dtype
from jaxmap.planning.device_map import DeviceMap, ExpertPlacement

STACKS = ("experts_gate", "experts_up", "experts_down")


@dataclasses.dataclass
class ApartExperts:
    """One MoE layer's routed experts apart from the layer: ``kind`` as the plan's ``memory_kind``; ``stacks`` the
    three expert stacks (``cpu``, ``device``, ``host``: committed to ``device``); ``read(ids)`` (``disk``) the
    stacks of experts ``ids`` (all of them for None) as host arrays ``[len(ids), in, out]`` in the compute dtype."""

    layer: int
    kind: str
    device: Any = None  # the jax device holding (cpu/device/host) the stacks
    stacks: dict | None = None
    read: Callable[[list[int] | None], dict[str, np.ndarray]] | None = None
    placement: ExpertPlacement | None = None

    @property
    def computed_apart(self) -> bool:
        """Computed where they are held (the CPU device, another accelerator) rather than moved to the layer."""
        return self.kind in ("cpu", "device")


def holder_name(e: ExpertPlacement, host_name: str) -> str | None:
    """The device holding the stacks: the plan's device for ``cpu``/``device``, the host CPU for ``host``."""
    if e.memory_kind in ("cpu", "device"):
        name = e.devices[0]
        return host_name if name == "cpu" else name
    return host_name if e.memory_kind == "host" else None


def pop_apart_specs(device_map: DeviceMap, specs: dict, start: int) -> dict[int, dict[str, ParamSpec]]:
    """Take the routed expert specs of layers whose experts live apart out of a stage's specs (in place):
    ``{layer: {name: spec}}``; the stage then loads the rest of those layers as usual."""
    out = {}
    for j, layer_specs in enumerate(specs["layers"]):
        e = device_map.experts_of(start + j)
        if e is None:
            continue
        out[start + j] = {k: layer_specs.pop(k) for k in list(layer_specs) if layer_specs[k].role == "expert"}
    return out


def load_apart(source, e: ExpertPlacement, specs: dict[str, ParamSpec], device: jax.Device | None, mesh,
               dtype: np.dtype, load_stage: Callable, quantizer) -> ApartExperts:
    """Read and place one layer's apart experts (``load_stage(specs, place_for)``: the stage loader, quantizing
    as the plan says); a disk layer gets its reader instead."""
    if e.memory_kind == "disk":
        return ApartExperts(e.layer, "disk", read=_disk_reader(source, e, specs, dtype, quantizer, mesh),
                            placement=e)
    sharding = NamedSharding(mesh, PartitionSpec())
    params = load_stage({"layers": [specs]}, lambda spec: sharding)
    return ApartExperts(e.layer, e.memory_kind, device, params["layers"][0], placement=e)


def _disk_reader(source, e: ExpertPlacement, specs: dict[str, ParamSpec], dtype: np.dtype, quantizer, mesh):
    where = f"layer {e.layer}'s routed experts on disk"
    if not isinstance(source, SafetensorsSource):
        raise UserError(f"{where}: read from a Hugging Face folder's safetensors only (this model comes from "
                        f"{source.path}); place them in host memory (-ot REGEX=host) or on the CPU (--cpu-moe)")
    sharding = NamedSharding(mesh, PartitionSpec())
    if quantizer is not None and any(quantizer.decide(s, sharding)[0] is not None for s in specs.values()):
        raise UserError(f"{where}: quantized experts on disk are not built (the folder stores them as floats); "
                        "place them in host memory (-ot REGEX=host) or on the CPU (--cpu-moe) to quantize them")
    parts = {k: source.expert_parts(s.hf_name) for k, s in specs.items()}
    want = as_numpy_dtype(dtype)

    def read(ids: list[int] | None) -> dict[str, np.ndarray]:
        out = {}
        for k, names in parts.items():
            chosen = names if ids is None else [names[i] for i in ids]
            out[k] = np.stack([np.asarray(source.view(n)).T for n in chosen]).astype(want, copy=False)
        return out

    return read


def expert_bytes_of(stacks: dict) -> int:
    return sum(int(leaf.nbytes) for w in stacks.values() for leaf in jax.tree.leaves(w))


def check_config(config: ModelConfig, device_map: DeviceMap) -> None:
    """Every apart entry names an MoE layer (a saved plan edited by hand may not)."""
    for e in device_map.experts:
        if not config.is_moe_layer(e.layer):
            raise UserError(f"the plan places the routed experts of layer {e.layer} apart, but that layer of "
                            f"{config.name or 'the model'} has no routed experts")
