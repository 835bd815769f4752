"""Routed experts held apart from their layer (issue 17, ``DeviceMap.experts``): read and placed here, run by
:mod:`jaxmap.engine.remote_experts`.

- ``cpu`` (``--cpu-moe``, ``--n-cpu-moe``, ``-ot REGEX=cpu``) and ``device`` (``-ot REGEX=cuda[1]``): the stacks are
  arrays committed to that device (host memory for the CPU device), in their stored or quantized type (bfloat16 stays
  bfloat16, a QTensor stack stays quantized), computed there.
- ``host``: the stacks are arrays of the CPU device too (host memory), never computed there: each step moves the
  routed experts' slices (decode) or the whole stack (prefill) to the layer's devices.
- ``disk``: nothing is held at load; each step reads the routed experts (or all of them) through a memory map:
  from a Hugging Face folder's own per-expert safetensors (float experts), else from an offload folder file written
  once with the layer's stacks as placed (a GGUF's or ISQ's quantized blocks stay quantized there).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxmap.errors import UserError
from jaxmap.families import ParamSpec
from jaxmap.loading.safetensors_source import SAFETENSORS_DTYPES, SafetensorsSource, as_numpy_dtype, parse_header
from jaxmap.materialize.disk_tier import _identity, check_writable, default_offload_folder, write_safetensors
from jaxmap.materialize.params import read_param
from jaxmap.planning.device_map import DeviceMap, ExpertPlacement

log = logging.getLogger(__name__)

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
        if not out[start + j]:  # a saved plan edited by hand
            raise UserError(f"the plan places the routed experts of layer {start + j} apart, but that layer has "
                            "no routed experts")
    return out


def load_apart(source, e: ExpertPlacement, specs: dict[str, ParamSpec], device: jax.Device | None, mesh,
               dtype: np.dtype, load_stage: Callable, quantizer, folder: Path | None = None) -> ApartExperts:
    """Read and place one layer's apart experts (``load_stage(specs, place_for)``: the stage loader, quantizing
    as the plan says); a disk layer gets its reader instead (``folder``: the offload folder, where one is needed)."""
    if e.memory_kind == "disk":
        return ApartExperts(e.layer, "disk", read=_disk_reader(source, e, specs, dtype, quantizer, mesh, folder),
                            placement=e)
    sharding = NamedSharding(mesh, PartitionSpec())
    params = load_stage({"layers": [specs]}, lambda spec: sharding)
    return ApartExperts(e.layer, e.memory_kind, device, params["layers"][0], placement=e)


def _disk_reader(source, e: ExpertPlacement, specs: dict[str, ParamSpec], dtype: np.dtype, quantizer, mesh,
                 folder: Path | None):
    """``read(ids)`` for one layer's disk experts: a Hugging Face folder's own per-expert tensors when they are
    floats, else an offload folder file holding the layer's stacks as placed (quantized stacks as QTensor leaves,
    written once; a reused file is jaxmap's own cache, named by the source, dtype and types)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    types = {k: quantizer.decide(s, sharding) if quantizer is not None else (None, False) for k, s in specs.items()}
    want = as_numpy_dtype(dtype)
    parts = None
    if isinstance(source, SafetensorsSource) and all(t is None for t, _ in types.values()):
        try:
            parts = {k: source.expert_parts(s.hf_name) for k, s in specs.items()}
        except UserError:  # fused stacks (gpt-oss's gate_up_proj), biases: the offload folder's copy below
            parts = None
    if parts is not None:

        def read(ids: list[int] | None) -> dict:
            out = {}
            for k, names in parts.items():
                chosen = names if ids is None else [names[i] for i in ids]
                out[k] = np.stack([np.asarray(source.view(n)).T for n in chosen]).astype(want, copy=False)
            return out

        return read
    from jaxmap.loading.orbax_checkpoint import qtensor_from, qtensor_leaves

    variant = {k: t for k, (t, _) in types.items() if t is not None} or None
    folder = folder if folder is not None else default_offload_folder()
    check_writable(folder)
    path = folder / _identity(source, source.config, dtype, variant) / f"experts-{e.layer:04d}.safetensors"
    if not path.is_file():
        tensors, metadata = {}, {}
        for k, s in specs.items():
            qtype, keep = types[k]
            if qtype is None:
                tensors[k] = np.ascontiguousarray(read_param(source, s, want))
                continue
            leaves, layout = qtensor_leaves(quantizer.host(s, sharding, qtype, keep))
            layout["leaves"] = sorted(leaves)
            metadata[k] = json.dumps(layout)
            tensors.update({f"{k}:{leaf}": np.ascontiguousarray(v) for leaf, v in leaves.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            write_safetensors(tensors, tmp, metadata)
            tmp.replace(path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot write the offload folder {path.parent}: {exc.strerror or exc}") from None
        log.info("disk tier: layer %d's routed experts written to %s", e.layer, path)
    entries, metadata = parse_header(path)
    buf = np.memmap(path, dtype=np.uint8, mode="r")

    def view(name: str) -> np.ndarray:
        entry = entries[name]
        return buf[entry.start:entry.start + entry.nbytes].view(SAFETENSORS_DTYPES[entry.dtype_name]).reshape(
            entry.shape)

    stacks = {}
    for k in specs:
        if k in metadata:
            layout = json.loads(metadata[k])
            stacks[k] = qtensor_from({leaf: view(f"{k}:{leaf}") for leaf in layout["leaves"]}, layout)
        else:
            stacks[k] = view(k)

    def read_file(ids: list[int] | None) -> dict:
        pick = (lambda a: np.array(a)) if ids is None else (lambda a: np.ascontiguousarray(a[np.asarray(ids)]))
        return {k: jax.tree.map(pick, w) for k, w in stacks.items()}

    return read_file
