"""A plan and a weight source in, the model's stages out: every parameter read, quantized and placed where the
DeviceMap says (device memory, pinned host memory, or the disk tier's files), with what the engine needs to run each
stage (its shardings, dtype, memory kind, disk reader). This is the loading loop; :func:`jaxmap.api.load` plans and
then calls it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxmap.config import ModelConfig
from jaxmap.config.dtypes import parse_dtype
from jaxmap.config.hardware import Hardware
from jaxmap.loading.safetensors_source import SafetensorsSource
from jaxmap.materialize import params as stage_params
from jaxmap.materialize.disk_tier import DiskQuantization, check_writable, default_offload_folder, open_disk_layers
from jaxmap.materialize.experts_apart import holder_name, load_apart, pop_apart_specs
from jaxmap.materialize.isq import Quantizer, type_function
from jaxmap.materialize.params import count_params, stage_param_specs
from jaxmap.materialize.placement import live_devices_by_name, make_mesh, stage_placements
from jaxmap.planning.device_map import DeviceMap
from jaxmap.progress import Progress
from jaxmap.quant import native
from jaxmap.quant.qtensor import split_of


@dataclasses.dataclass
class Stage:
    """A contiguous range of layers and where they live.

    ``params`` holds ``layers`` (a list of per-layer dicts, in order) and, on the first stage, ``embed_tokens``; on
    the last, ``final_norm`` and ``lm_head`` (or ``embed_tokens`` again when embeddings are tied).
    ``activation_sharding`` places the hidden state entering the stage (a device or a ``NamedSharding``);
    ``cache_sharding`` places its KV cache buffers.
    """

    start: int
    end: int
    params: dict
    activation_sharding: Any
    cache_sharding: Any
    is_first: bool
    is_last: bool
    mode: str = "unrolled"  # set by the engine: "unrolled", "per_layer" or "scan"
    scan: Any = None  # set by the engine for a scan stage: its segments and stacked weights (engine/scan_stage.py)
    dtype: Any = None  # compute dtype of this stage (CPU stages run float32); None: the engine's
    # Wait for each program before dispatching the next. XLA:CPU runs a multi-device program's collectives on a
    # shared thread pool: with several such programs in flight (one per layer) its rendezvous can deadlock
    # (seen with jax 0.10.2 on 8 virtual devices, tp=8, per-layer mode). Set for multi-device CPU stages only.
    sync: bool = False
    # Where the layer weights live. "host": ``params["layers"]`` are in pinned host memory and each step moves
    # them in one layer at a time, the next layer's transfer inside the current layer's program (double
    # buffering). "disk": ``disk`` reads each layer from a memory map at every step, the next read issued while
    # the current layer computes. Both run per layer: one program per layer bounds device memory to about two
    # layers, where an unrolled program may schedule every transfer early and keep all layers resident.
    memory_kind: str = "device"
    disk: Any = None  # jaxmap.materialize.disk_tier.DiskLayers for disk stages
    layer_shardings: dict | None = None  # device shardings of one layer's parameters (streamed stages)
    # Layers whose routed experts live apart (DeviceMap.experts): layer -> ApartExperts
    # (jaxmap.materialize.experts_apart); their ``params["layers"]`` entries hold no expert stacks.
    apart: dict = dataclasses.field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def streamed(self) -> bool:
        return self.memory_kind in ("host", "disk")


def materialize_model(source, device_map: DeviceMap, hardware: Hardware, dtype: np.dtype, importance,
                      offload_folder: str | Path | None, progress: bool = True) -> list[Stage]:
    """Read, quantize and place every weight of ``source`` as ``device_map`` says, one tensor at a time; returns
    the stages in order. Each weight gets the final ISQ type the plan stores for it (``Stage.tensor_isq``,
    ``Placement.tensor_isq``; see :mod:`jaxmap.materialize.isq`), its fit weighted by ``importance``;
    ``offload_folder`` takes disk-tier layers that cannot be read in place."""
    config = source.config
    quantizer = Quantizer(source, type_function(device_map, config), importance)
    disk_isq = any(types for s in device_map.stages if s.memory_kind == "disk" for types in s.tensor_isq or [])
    if any(s.memory_kind == "disk" for s in device_map.stages) and (
            disk_isq or not isinstance(source, SafetensorsSource)):
        check_writable(Path(offload_folder) if offload_folder is not None else default_offload_folder())
    placements = stage_placements(device_map, hardware)
    stage_specs = [stage_param_specs(config, p.start, p.end if p.memory_kind != "disk" else p.start,
                                                 p.is_first, p.is_last) for p in placements]
    bar = Progress(sum(count_params(s) for s in stage_specs), "loading weights", enabled=progress)
    apart_specs = [pop_apart_specs(device_map, s, p.start) for p, s in zip(placements, stage_specs, strict=True)]
    live, host_name = live_devices_by_name(), hardware.host.name
    stages = []
    for placement, specs, apart in zip(placements, stage_specs, apart_specs, strict=True):
        stage_dtype = _stage_dtype(device_map, placement, dtype)
        kind = placement.memory_kind
        host_kind = "pinned_host" if kind == "host" else None

        def place_for(spec, p=placement, host_kind=host_kind):
            kind = host_kind if spec.layer is not None else None
            return p.param_sharding(spec, config, kind)

        params = stage_params.materialize_stage(source, specs, stage_dtype, place_for, bar, quantizer)
        if kind == "device" and placement.mesh.devices.size == 1 and placement.platform == "cpu":
            params = native.mark(params)  # decode products in jaxmap's CPU kernel (jaxmap/quant/native)
        streamed = kind in ("host", "disk") and placement.end > placement.start
        layer_shardings = _device_shardings(params, placement, config) if streamed else None
        disk = None
        if kind == "disk" and streamed:
            disk = open_disk_layers(source, config, range(placement.start, placement.end), stage_dtype,
                                    offload_folder, _disk_quantization(quantizer, placement, config, importance))
        held = {}
        for layer, specs_of in apart.items():  # routed experts apart from their layer, in the stage's dtype
            e = device_map.experts_of(layer)
            name = holder_name(e, host_name)
            mesh = make_mesh([name], live) if name is not None else placement.mesh
            held[layer] = load_apart(source, e, specs_of, live.get(name), mesh, stage_dtype,
                                     lambda sp, place, d=stage_dtype: stage_params.materialize_stage(
                                         source, sp, d, place, bar, quantizer), quantizer,
                                     Path(offload_folder) if offload_folder is not None else None)
        stages.append(Stage(placement.start, placement.end, params, placement.activation_sharding(),
                            placement.cache_sharding(config), placement.is_first, placement.is_last,
                            dtype=stage_dtype,
                            sync=placement.mesh.devices.size > 1 and placement.platform == "cpu",
                            memory_kind=kind, disk=disk, layer_shardings=layer_shardings, apart=held))
    bar.close()
    quantizer.report(np.dtype(dtype).itemsize)
    return stages


def _device_shardings(params: dict, placement, config: ModelConfig) -> dict:
    """Device-memory shardings for one streamed layer: those of its host copy (quantized leaves included), in
    device memory; for disk layers (nothing placed yet) the plain parameter shardings."""
    if params["layers"]:
        return jax.tree.map(lambda a: a.sharding.with_memory_kind("device"), params["layers"][0])
    specs = stage_param_specs(config, placement.start, placement.start + 1, False, False)["layers"][0]
    return {k: placement.param_sharding(v, config) for k, v in specs.items()}


def _disk_quantization(quantizer, placement, config: ModelConfig, importance) -> DiskQuantization:
    """How the disk tier stores this stage's weights: each one's ISQ type (the plan's, checked against the stage's
    device sharding), and
    the host QTensor the quantizer makes of it (recorded in the ISQ report like any other; a reused folder's
    tensors are recorded as they are read back)."""

    def decide(spec):
        return quantizer.decide(spec, placement.param_sharding(spec, config))

    def quantize(spec):
        qtype, keep = decide(spec)
        return quantizer.host(spec, placement.param_sharding(spec, config), qtype, keep)

    def describe(spec):  # what the stored bytes depend on: the type and the input split (per-shard scales)
        qtype = decide(spec)[0]
        return None if qtype is None else f"{qtype}/{split_of(spec, placement.param_sharding(spec, config))[4]}"

    key = "" if importance is None else importance.digest()
    return DiskQuantization(lambda spec: decide(spec)[0], quantize, key, describe, quantizer.stored)


def _stage_dtype(device_map: DeviceMap, placement, default: np.dtype) -> np.dtype:
    """The plan's dtype for the stage holding these layers (CPU stages beside accelerators run float32)."""
    for s in device_map.stages:
        if s.start <= placement.start < s.end:
            return parse_dtype(s.dtype)
    return default
