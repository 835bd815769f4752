"""``plan_for`` / ``MemoryPlan``: which subtrees of an arbitrary pytree go on which device, and which to host memory.

Shared with the model planner: the devices and their names and capacities (:mod:`jaxmap.config.hardware`, so a plan
names ``cpu[2]`` as ``jaxmap plan`` does), the per-device :class:`~jaxmap.planning.fit.Budget` (capacity less what
is kept free; here the reserve is ``reserve_fraction`` of the capacity, the caller's figure, rather than the model's
:func:`~jaxmap.planning.memory.headroom`, which assumes a real accelerator's workspaces) and the host tier's name.
The placement stays its own: the model's fill splits layers of known sizes in proportion to free memory and streams
the tail from the last device, while this one walks user subtrees in order with a cursor that never goes back and
sends only what fits nowhere to host.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxmap.errors import UserError
from jaxmap.library.paths import SCALARS, path_str, plain
from jaxmap.planning.fit import HOST, Budget


@dataclasses.dataclass
class MemoryPlan:
    """Which subtree goes where, and the bytes each place holds."""

    assignment: dict[str, str]  # subtree path -> device name or "host"
    bytes_per_device: dict[str, int]
    capacity: dict[str, int]
    host_bytes: int = 0

    def placement_of(self, path: str) -> str:
        return self.assignment[path]

    def render(self) -> str:
        lines = ["device     bytes        capacity"]
        for name, used in self.bytes_per_device.items():
            lines.append(f"{name:<10} {used:>12,d} {self.capacity.get(name, 0):>12,d}")
        lines.append(f"{'host':<10} {self.host_bytes:>12,d}")
        return "\n".join(lines)


# ---- bytes ----------------------------------------------------------------------------------------------------------
def _nbytes(name: str, x: Any) -> int:
    """Bytes of one leaf; Python scalars count as jax would store them (float32, int32 without x64)."""
    if isinstance(x, SCALARS):
        return jax.dtypes.canonicalize_dtype(np.result_type(x)).itemsize
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise UserError(f"{name}: a {type(x).__name__} leaf is not an array; plan_for takes a tree of arrays or "
                        "jax.ShapeDtypeStructs")
    return int(np.prod(x.shape)) * x.dtype.itemsize  # dtype.itemsize: PRNG key dtypes have one, np.dtype() does not


def _tree_bytes(path: str, tree: Any) -> int:
    return sum(_nbytes("/".join(filter(None, (path, path_str(p)))), x)
               for p, x in jax.tree_util.tree_flatten_with_path(tree)[0])


def _is_leafish(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _subtrees(tree: Any, depth: int) -> list[tuple[str, Any]]:
    """(path, subtree) pairs ``depth`` levels down (mappings, lists and tuples are walked; leaves stop early)."""
    if depth == 0 or not isinstance(tree, (Mapping, list, tuple)) or _is_leafish(tree):
        return [("", tree)]
    items = tree.items() if isinstance(tree, Mapping) else enumerate(tree)
    out = []
    for key, sub in items:
        for path, leaf in _subtrees(sub, depth - 1):
            out.append((f"{key}/{path}" if path else str(key), leaf))
    return out


def _refuse_duplicate_paths(paths: list[str]) -> None:
    twice = [p for p, n in collections.Counter(paths).items() if n > 1]
    if twice:
        raise UserError(f"two subtrees have the path {twice[0]!r} (a key contains '/'); rename the key so that "
                        "paths are unique")


# ---- arguments, devices and budgets ---------------------------------------------------------------------------------
def _is_real(value: Any) -> bool:
    """A finite real number, numpy scalars included; bools are not numbers here (``True`` is no capacity)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def _capacity(value: Any, what: str) -> int:
    if not _is_real(value) or value <= 0:
        raise UserError(f"{what} must be a positive number of bytes, got {value!r}")
    return int(value)


def _check_plan_args(reserve_fraction: Any, depth: Any) -> None:
    if not _is_real(reserve_fraction) or not 0 <= reserve_fraction < 1:
        raise UserError(f"reserve_fraction must be a number in [0, 1) (the share of each device kept for "
                        f"activations), got {reserve_fraction!r}")
    if not isinstance(depth, numbers.Integral) or isinstance(depth, (bool, np.bool_)) or depth < 0:
        raise UserError(f"depth must be an integer >= 0 (levels of the tree to cut into subtrees), got {depth!r}")


def _plan_devices(hardware: Any, devices: Sequence[Any] | None) -> tuple[list[str], dict[str, int | None]]:
    """Device names as the engine writes them (``cpu[2]`` for jax's third CPU device) and their known capacity."""
    from jaxmap.config.hardware import Hardware, jax_platform_name, live_jax_devices

    if devices is None:
        hw = hardware or Hardware.from_jax()
        return [d.name for d in hw.accelerators], {d.name: d.memory_bytes for d in hw.accelerators}
    devices = list(devices)
    if not devices or not all(hasattr(d, "platform") and hasattr(d, "id") for d in devices):
        raise UserError("devices= must be a non-empty list of jax devices, e.g. jax.devices()[:2]")
    known = {dev: f"{platform}[{ordinal}]" for platform, ordinal, dev in live_jax_devices()}
    names = [known.get(d) or f"{jax_platform_name(d.platform)}[{d.id}]" for d in devices]
    if len(set(names)) != len(names):
        raise UserError(f"devices= lists a device twice ({', '.join(names)})")
    return names, dict.fromkeys(names)


def _capacities(names: list[str], caps: dict[str, int | None], capacity_bytes: Any) -> dict[str, int]:
    if isinstance(capacity_bytes, Mapping):
        unknown = [n for n in capacity_bytes if n not in caps]
        if unknown:
            raise UserError(f"capacity_bytes names {', '.join(map(str, unknown))}, not among the devices "
                            f"({', '.join(names)})")
        caps = {**caps, **{n: _capacity(v, f"capacity_bytes[{n!r}]") for n, v in capacity_bytes.items()}}
    elif capacity_bytes is not None:
        caps = dict.fromkeys(names, _capacity(capacity_bytes, "capacity_bytes"))
    missing = [n for n in names if caps[n] is None]
    if missing:
        raise UserError(f"no memory size known for {', '.join(missing)} (CPU devices report none); pass "
                        "capacity_bytes=")
    return caps


def _budgets(names: list[str], caps: dict[str, int], reserve_fraction: float) -> dict[str, Budget]:
    """A Budget per device: its capacity less ``reserve_fraction`` of it (kept for activations)."""
    out = {}
    for n in names:
        usable = int(caps[n] * (1 - reserve_fraction))
        out[n] = Budget(caps[n], caps[n] - usable, f"reserve_fraction {reserve_fraction:g}")
    return out


# ---- placement ------------------------------------------------------------------------------------------------------
def _place(sizes: list[tuple[str, int]], names: list[str], budgets: dict[str, Budget]) -> tuple[dict, dict, int]:
    """Subtrees in order onto the devices in order, each on the current device or a later one with room.

    The cursor never goes back, so each device holds a consecutive run (pipeline stages); a subtree that fits on
    no device from the cursor on goes to host and leaves the cursor where it was, so later subtrees still go to the
    devices.
    """
    usable = {n: budgets[n].usable for n in names}
    used = dict.fromkeys(names, 0)
    assignment: dict[str, str] = {}
    host = cursor = 0
    for path, size in sizes:
        target = next((i for i in range(cursor, len(names)) if used[names[i]] + size <= usable[names[i]]), None)
        if target is None:
            host += size
            assignment[path] = HOST
        else:
            cursor = target
            used[names[target]] += size
            assignment[path] = names[target]
    return assignment, used, host


def plan_for(param_shapes: Any, hardware: Any = None, *, capacity_bytes: float | Mapping[str, float] | None = None,
             reserve_fraction: float = 0.1, depth: int = 1, devices: Sequence[Any] | None = None) -> MemoryPlan:
    """A memory plan for an arbitrary pytree of ``ShapeDtypeStruct``s or arrays (an nnx Module or State too).

    The tree is cut into subtrees ``depth`` levels down (``depth=2`` splits ``{"layers": [...]}`` per layer, 0 keeps
    it whole). The subtrees are placed in order: each goes to the current device if it has room (its capacity minus
    ``reserve_fraction`` for activations), else to the next device with room, and the cursor never goes back, so each
    device holds consecutive subtrees as pipeline stages need; a subtree that fits on no remaining device goes to
    ``host`` and later subtrees still go to the devices. ``hardware`` is a :class:`jaxmap.config.hardware.Hardware`
    (default: the live devices) or ``devices`` a list of jax devices (named as the engine names them, ``cpu[2]``);
    ``capacity_bytes`` overrides the capacity of every device (a positive number) or of named ones (a dict), which is
    how a plan for a smaller device is tried on CPU.
    """
    _check_plan_args(reserve_fraction, depth)
    names, caps = _plan_devices(hardware, devices)
    caps = _capacities(names, caps, capacity_bytes)
    subtrees = _subtrees(plain(param_shapes), int(depth))
    _refuse_duplicate_paths([p for p, _ in subtrees])
    sizes = [(path, _tree_bytes(path, sub)) for path, sub in subtrees]
    assignment, used, host = _place(sizes, names, _budgets(names, caps, reserve_fraction))
    return MemoryPlan(assignment, used, {n: caps[n] for n in names}, host)
