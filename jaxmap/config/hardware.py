"""What the hardware is: :class:`Device` and :class:`Hardware`, read live from jax or from a ``meshes/`` preset.

Pure data so that a plan can be made for hardware you do not have (``python -m jaxmap.plan --mesh 8xh100``); only
:meth:`Hardware.from_jax` imports jax. Devices are named ``platform[ordinal]`` (``cuda[1]``, ``cpu[3]``, ``tpu[5]``),
the names the topology YAML and ``-n`` use; ``id`` is jax's device id within that platform's client, which the
engine uses to find the device again.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import yaml

from jaxmap.errors import UserError

PLATFORMS = ("cpu", "cuda", "rocm", "tpu", "metal")
_JAX_PLATFORM = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "rocm": "rocm", "tpu": "tpu", "metal": "metal",
                 "mps": "metal"}


def jax_platform_name(platform: str) -> str:
    """jaxmap's name for a jax platform: ``gpu`` -> ``cuda``, ``mps`` -> ``metal``; others unchanged."""
    return _JAX_PLATFORM.get(platform.lower(), platform.lower())


def live_jax_devices() -> list[tuple[str, int, Any]]:
    """(platform, ordinal, jax device) for jax's default backend, then the host CPU devices.

    The one enumeration behind every device name: jax numbers each platform from 0, so names (``cuda[0]``,
    ``cpu[0]``) and not jax ids identify a device across platforms.
    """
    import jax

    try:
        found = list(jax.devices())
    except (RuntimeError, AssertionError) as exc:
        error = backend_error(exc)
        if error is None:
            raise
        raise error from None
    if found and found[0].platform != "cpu":
        try:
            found += jax.devices("cpu")
        except RuntimeError:
            pass
    counts: dict[str, int] = {}
    out = []
    for dev in found:
        platform = jax_platform_name(dev.platform)
        ordinal = counts.get(platform, 0)
        counts[platform] = ordinal + 1
        out.append((platform, ordinal, dev))
    return out


# What to install for a jax platform that would not start (the extras in pyproject.toml).
_PLUGIN_FIX = {"cuda": 'install the plugin (pip install -e ".[cuda]")',
               "gpu": 'install the plugin (pip install -e ".[cuda]")',
               "tpu": 'install the plugin (pip install -e ".[tpu]")',
               "mps": 'install the plugin (pip install -e ".[metal]", Apple silicon only)',
               "rocm": "install jax's ROCm plugin (see jax's installation guide)"}
_EXTRA_PLATFORMS = ("mps", "METAL")  # plugin platforms jax itself does not list until their plugin is installed
_INIT_FAILED = re.compile(r"^Unable to initialize backend '([^']*)': (.*)$", re.S)
_FAILED_QUIETLY = re.compile(r"^Backend '([^']*)' failed to initialize: (.*)\. Available backends are .*$", re.S)
_UNKNOWN = re.compile(r"^Unknown backend (\S+)\. Available backends are (.*)$", re.S)
_JAX_HINTS = (" (set JAX_PLATFORMS='' to automatically choose an available backend)",
              " (you may need to uninstall the failing plugin package, or set JAX_PLATFORMS=cpu to skip this backend.)")


def backend_error(exc: BaseException) -> UserError | None:
    """The one-line :class:`UserError` for jax failing to start a backend, or None when ``exc`` is something else.

    Recognised precisely, from jax's own ``xla_bridge``: its ``RuntimeError("Unable to initialize backend 'X': ...")``
    (a plugin missing or failing, or a name jax does not know), ``"Backend 'X' failed to initialize"`` and ``"Unknown
    backend X"`` (a platform ``JAX_PLATFORMS`` leaves out), and the bare ``AssertionError`` its ``backends()`` raises
    when ``JAX_PLATFORMS=cuda`` finds no NVIDIA GPU (jax skips cuda silently, then has no backend at all).
    """
    if isinstance(exc, UserError):
        return exc
    env = os.environ.get("JAX_PLATFORMS", "").strip()
    if isinstance(exc, AssertionError):
        if not _raised_in_xla_bridge(exc):
            return None
        wanted = [p.strip() for p in env.split(",") if p.strip()] or ["cuda"]
        reason = "no NVIDIA GPU is visible"
        if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
            reason += f" with CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}"
        return _start_error(env, wanted[0], reason)
    if not isinstance(exc, RuntimeError) or not exc.args or not isinstance(exc.args[0], str):
        return None
    message = exc.args[0]
    for hint in _JAX_HINTS:
        message = message.removesuffix(hint)
    found = _INIT_FAILED.match(message) or _FAILED_QUIETLY.match(message)
    if found:
        platform, reason = found.group(1), found.group(2)
        if "is not in the list of known backends" in reason and not _known_platform(platform):
            return _unknown_error(env, platform)
        return _start_error(env, platform, reason)
    found = _UNKNOWN.match(message)
    listed = [p.strip() for p in env.split(",") if p.strip()]
    if found and listed and found.group(1) not in listed:  # jaxmap asked for a platform JAX_PLATFORMS left out
        platform = found.group(1)
        return UserError(f"JAX_PLATFORMS={env} leaves out the {platform} backend that this command also uses; "
                         f"add it (JAX_PLATFORMS={env},{platform}) or unset JAX_PLATFORMS")
    return None


def _raised_in_xla_bridge(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` is jax's backend set-up (``jax/_src/xla_bridge.py``)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return Path(code.co_filename).name == "xla_bridge.py" and code.co_name in ("backends", "_get_backend_uncached")


def _known_platform(platform: str) -> bool:
    if platform in _EXTRA_PLATFORMS:
        return True
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.is_known_platform(platform))
    except Exception:  # noqa: BLE001 - private API moved: judge by jaxmap's own names
        return platform in PLATFORMS or platform in ("gpu", "oneapi")


def _short(reason: str, limit: int = 240) -> str:
    text = " ".join(reason.split()).rstrip(".")
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def _start_error(env: str, platform: str, reason: str) -> UserError:
    fix = _PLUGIN_FIX.get(platform, f"install jax's {platform} plugin")
    what = f"the {platform} backend"
    if platform in ("cuda", "rocm") and "gpu" in [p.strip() for p in env.split(",")]:
        fix, what, reason = _PLUGIN_FIX["gpu"], "a GPU backend", f"{platform}: {reason}"  # jax's alias for both
    if env:
        return UserError(f"JAX_PLATFORMS={env} but jax could not start {what} ({_short(reason)}); "
                         f"{fix} or unset JAX_PLATFORMS to use the CPU")
    return UserError(f"jax could not start the {platform} backend ({_short(reason)}); repair or uninstall that "
                     f"plugin, or set JAX_PLATFORMS=cpu to use the CPU")


def _unknown_error(env: str, platform: str) -> UserError:
    where = f"JAX_PLATFORMS={env}" if env else f"the jax platform {platform!r}"
    if platform.lower() == "metal":
        return UserError(f"{where}: jax calls Apple GPUs 'mps' (jaxmap names them metal[N]); set JAX_PLATFORMS=mps "
                         f'with the plugin installed (pip install -e ".[metal]") or unset JAX_PLATFORMS to use the CPU')
    return UserError(f"{where} names no jax backend ({platform!r}); use cpu, cuda, rocm, tpu or mps, or unset "
                     f"JAX_PLATFORMS to use the CPU")


def _coords(dev: Any) -> tuple[int, ...] | None:
    coords = getattr(dev, "coords", None)
    return tuple(int(c) for c in coords) if coords is not None else None


MESHES_DIR = Path(__file__).resolve().parents[2] / "meshes"
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Device:
    """One device: ``ordinal`` counts within its platform (what ``-n`` and ``cuda[N]`` mean)."""

    platform: str
    ordinal: int
    id: int
    process_index: int = 0
    memory_bytes: int | None = None
    coords: tuple[int, ...] | None = None
    used_bytes: int | None = None  # already in use when read live (another model, jax's own buffers)

    @property
    def name(self) -> str:
        return f"{self.platform}[{self.ordinal}]"


@dataclasses.dataclass(frozen=True)
class Hardware:
    """The devices a plan may use, plus host memory (the future host-offload tier)."""

    devices: tuple[Device, ...]
    host_memory_bytes: int | None = None
    unified_memory: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            raise UserError(f"hardware {self.name!r} lists a device twice: {', '.join(names)}")
        if not self.devices:
            raise UserError(f"hardware {self.name!r} has no devices")

    @property
    def default_platform(self) -> str:
        """The accelerator platform when there is one, else ``cpu`` (what a bare ``-n`` ordinal means)."""
        return next((d.platform for d in self.devices if d.platform != "cpu"), "cpu")

    def on(self, platform: str) -> list[Device]:
        return sorted((d for d in self.devices if d.platform == platform), key=lambda d: d.ordinal)

    @property
    def accelerators(self) -> list[Device]:
        """The devices automatic placement spreads over (the CPU devices on CPU-only hardware)."""
        return self.on(self.default_platform)

    @property
    def host(self) -> Device:
        """The CPU device that takes ``-n``'s remainder and a topology's ``device: cpu``."""
        cpus = self.on("cpu")
        if cpus:
            return cpus[0]
        return Device("cpu", 0, 0, memory_bytes=self.host_memory_bytes)

    def find(self, name: str) -> Device | None:
        if name in ("cpu", self.host.name):
            return self.host
        return next((d for d in self.devices if d.name == name), None)

    def names(self) -> list[str]:
        return [d.name for d in self.devices]

    def lacks(self, name: str, devices: list[str] | None = None) -> str:
        """The end of an error naming a device that is not here: what this hardware has instead."""
        where = ("this machine" if not self.name or self.name.startswith("live:")
                 else f"the hardware preset {self.name}")
        have = ", ".join(devices if devices is not None else self.names())
        return f"{name}, but {where} has only {have}"

    # ---- constructors --------------------------------------------------------------------------------------------
    @classmethod
    def from_jax(cls) -> Hardware:
        """The live devices: jax's default backend plus its CPU devices (the host tier and ``-n``'s remainder)."""
        found = live_jax_devices()
        devices = []
        for platform, ordinal, dev in found:
            limit, used = _memory_stats(dev)
            devices.append(Device(platform, ordinal, int(dev.id), int(getattr(dev, "process_index", 0)), limit,
                                  _coords(dev), used))
        found = [dev for _, _, dev in found]
        kind = getattr(found[0], "device_kind", found[0].platform)
        return cls(tuple(devices), _host_memory(), any(d.platform == "metal" for d in devices),
                   f"live: {len(found)} x {kind}")

    @classmethod
    def from_preset(cls, name_or_path: str | Path) -> Hardware:
        """A ``meshes/`` preset by name (``2x24gb``) or a path to a preset YAML file."""
        path = Path(name_or_path)
        if not path.is_file():
            path = MESHES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(list_mesh_presets()) or "none"
            raise UserError(f"unknown mesh preset {str(name_or_path)!r}; known presets: {known}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise UserError(f"{path} is not valid YAML{where}") from None
        return cls.from_dict(raw, default_name=path.stem, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, default_name: str = "", source: str = "hardware") -> Hardware:
        """Build from the preset format documented at the top of every ``meshes/*.yaml``."""
        if not isinstance(raw, dict):
            raise UserError(f"{source} must hold a mapping with a 'devices' list")
        unknown = set(raw) - {"name", "host_memory_gib", "unified_memory", "devices"}
        if unknown:
            raise UserError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
        groups = raw.get("devices")
        if not isinstance(groups, list) or not groups:
            raise UserError(f"{source}: 'devices' must be a non-empty list of device groups")
        devices: list[Device] = []
        counts: dict[str, int] = {}
        for group in groups:
            devices += _device_group(group, counts, source)
        host = raw.get("host_memory_gib")
        return cls(tuple(devices), _gib(host, source), bool(raw.get("unified_memory", False)),
                   str(raw.get("name") or default_name))


MAX_PRESET_DEVICES = 65536  # a device group larger than any machine: a typo, refused before a long loop


def _device_group(group: Any, counts: dict[str, int], source: str) -> list[Device]:
    if not isinstance(group, dict):
        raise UserError(f"{source}: each device group must be a mapping, got {group!r}")
    unknown = set(group) - {"platform", "count", "memory_gib", "process", "coords"}
    if unknown:
        raise UserError(f"{source}: unknown device group key(s) {', '.join(sorted(unknown))}")
    platform = group.get("platform")
    if platform not in PLATFORMS:
        raise UserError(f"{source}: platform must be one of {', '.join(PLATFORMS)}, got {platform!r}")
    count = group.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or not 0 < count <= MAX_PRESET_DEVICES:
        raise UserError(f"{source}: count must be a positive whole number, at most {MAX_PRESET_DEVICES}, got {count!r}")
    coords = group.get("coords")
    if coords is not None and (not isinstance(coords, list) or len(coords) != count):
        raise UserError(f"{source}: coords must list one coordinate per device ({count})")
    out = []
    for i in range(count):
        ordinal = counts.get(platform, 0)
        counts[platform] = ordinal + 1
        c = tuple(int(x) for x in coords[i]) if coords is not None else None
        out.append(Device(platform, ordinal, ordinal, int(group.get("process", 0)),
                          _gib(group.get("memory_gib"), source), c))
    return out


def _gib(value: Any, source: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or value <= 0:
        raise UserError(f"{source}: memory sizes are positive numbers of GiB, got {value!r}")
    return int(value * GIB)


def _memory_stats(dev: Any) -> tuple[int | None, int | None]:
    """(allocator limit, bytes in use) where the backend reports them; on GPU the limit is what jax preallocated
    (75% of the card by default), which is what a plan may use."""
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # backends without memory stats (CPU, some plugins) raise or return None
        return None, None
    limit, used = stats.get("bytes_limit"), stats.get("bytes_in_use")
    return (int(limit) if limit else None), (int(used) if used is not None else None)


def _host_memory() -> int | None:
    """Host memory available now (MemAvailable: free plus reclaimable page cache), else the physical total."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def list_mesh_presets() -> list[str]:
    return sorted(p.stem for p in MESHES_DIR.glob("*.yaml")) if MESHES_DIR.is_dir() else []
