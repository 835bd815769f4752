"""``python -m jaxmap.doctor``: what this machine offers for device mapping, and what it means.

Reports the platforms and plugin versions, every device with its memory in use and limit (where jax knows it), the
memory kinds each device offers, process index and count, which collectives are available, the environment variables
that change what jax sees, and plain-language consequences ("one device: no tensor parallelism").
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from collections.abc import Sequence

from jaxmap.cli.common import guarded
from jaxmap.config.hardware import jax_platform_name
from jaxmap.errors import ArgumentParser

ENV_VARS = ("CUDA_VISIBLE_DEVICES", "XLA_FLAGS", "JAX_PLATFORMS", "XLA_PYTHON_CLIENT_MEM_FRACTION",
            "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "TPU_VISIBLE_CHIPS")
PLUGINS = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu", "jax-mps", "flax", "orbax-checkpoint")


def platform_name(device) -> str:
    """jaxmap's name for a device's platform: cuda, rocm, tpu, metal or cpu."""
    return jax_platform_name(device.platform)


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.2f} GiB"


def collect() -> dict:
    """Everything doctor knows, as plain data (also what ``--json`` prints)."""
    import jax

    versions = {}
    for name in PLUGINS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    devices = []
    for d in jax.devices():
        stats = None
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
            stats = None
        try:
            kinds = sorted(m.kind for m in d.addressable_memories())
        except Exception:  # noqa: BLE001
            kinds = []
        devices.append({
            "id": d.id, "name": f"{platform_name(d)}[{_ordinal(d)}]", "kind": getattr(d, "device_kind", ""),
            "platform": platform_name(d), "process_index": d.process_index,
            "bytes_in_use": (stats or {}).get("bytes_in_use"), "bytes_limit": (stats or {}).get("bytes_limit"),
            "memory_kinds": kinds,
            "default_memory_kind": _default_kind(d),
        })
    return {
        "versions": versions,
        "backend": jax.default_backend(),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": devices,
        "local_device_count": jax.local_device_count(),
        "collectives": _collectives(jax),
        "native_cpu_kernel": _native_kernel(),
        "environment": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "advice": advice(devices, jax.process_count()),
    }


def _ordinal(device) -> int:
    import jax

    same = [d for d in jax.devices() if d.platform == device.platform]
    return [d.id for d in same].index(device.id)


def _default_kind(device) -> str | None:
    try:
        return device.default_memory().kind
    except Exception:  # noqa: BLE001
        return None


def _collectives(jax) -> str:
    backend = jax.default_backend()
    if backend in ("gpu", "cuda"):
        return "NCCL (within a process and across processes with jax.distributed)"
    if backend == "tpu":
        return "ICI within a slice, DCN across slices"
    if backend == "cpu":
        impl = getattr(jax.config, "jax_cpu_collectives_implementation", None)
        return f"in-process; across processes: {impl or 'none (set jax_cpu_collectives_implementation=gloo)'}"
    return "unknown"


def advice(devices: list[dict], process_count: int) -> list[str]:
    """What the device list means for mapping, in sentences."""
    out = []
    accel = [d for d in devices if d["platform"] != "cpu"]
    platform = accel[0]["platform"] if accel else "cpu"
    n = len(accel) or len(devices)
    if platform == "metal":
        out.append("Apple GPU: one device sharing unified memory with the CPU; device mapping has no host tier here.")
    elif n == 1:
        out.append("one device: no tensor parallelism; the whole model goes on it (offload when it does not fit).")
    else:
        out.append(f"{n} {platform} devices: tensor parallel over all of them by default when the model's heads "
                   "divide; otherwise a pipeline of stages.")
    if not accel:
        out.append("no accelerator found: layers run on the CPU in float32. For several virtual CPU devices set "
                   "XLA_FLAGS=--xla_force_host_platform_device_count=N before starting.")
    if platform == "cuda":
        out.append("jax preallocates 75% of GPU memory at start: plans use the allocator's bytes_limit. Set "
                   "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 to give it more, XLA_PYTHON_CLIENT_PREALLOCATE=false to "
                   "allocate on demand.")
        out.append("pinned host memory for offloaded layers is capped at 64 GB by default; raise it with "
                   "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB.")
        out.append("CUDA_VISIBLE_DEVICES hides GPUs from jaxmap (e.g. a GPU another process is using).")
    if process_count > 1:
        out.append(f"{process_count} processes: stages and tensor-parallel groups may span processes.")
    return out


def _native_kernel() -> str:
    """Whether quantized decode products and decode attention on CPU run in jaxmap's native kernels (built now if
    need be)."""
    from jaxmap.quant import native

    return native.status()


def render(report: dict) -> str:
    lines = ["jaxmap doctor", ""]
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    lines.append(f"default backend: {report['backend']}; process {report['process_index']} of "
                 f"{report['process_count']}; collectives: {report['collectives']}")
    lines.append(f"native CPU kernels (quantized decode products, decode attention): {report['native_cpu_kernel']}")
    lines.append("")
    lines.append(f"{'name':<10} {'id':>3} {'kind':<22} {'proc':>4} {'in use':>12} {'limit':>12}  memory kinds")
    for d in report["devices"]:
        kinds = ", ".join(k + ("*" if k == d["default_memory_kind"] else "") for k in d["memory_kinds"])
        lines.append(f"{d['name']:<10} {d['id']:>3} {d['kind'][:22]:<22} {d['process_index']:>4} "
                     f"{_gib(d['bytes_in_use']):>12} {_gib(d['bytes_limit']):>12}  {kinds}")
    lines.append("(* default memory kind)")
    lines.append("")
    env = report["environment"]
    lines.append("environment: " + (", ".join(f"{k}={v}" for k, v in env.items()) if env else "none of "
                                    + ", ".join(ENV_VARS[:3]) + " set"))
    lines.append("")
    lines.extend("- " + a for a in report["advice"])
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from jaxmap.engine.multihost import start_from_args
    from jaxmap.errors import UserError

    if args.model is None:
        given = [flag for flag, value in (("--dtype", args.dtype), ("--max-seq-len", args.max_seq_len),
                                          ("--max-memory", args.max_memory), ("--isq", args.isq),
                                          ("--max-batch-size", args.max_batch_size != 1 or None),
                                          ("--prefill-chunk", args.prefill_chunk),
                                          ("--no-disk", not args.allow_disk or None)) if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} describe{'s' if len(given) == 1 else ''} a model's fit: add "
                            f"--model (-m alone for the default model), or drop {'it' if len(given) == 1 else 'them'}")
    start_from_args(args)  # with --coordinator (or a cluster's environment) the report covers every process
    report = collect()
    verdict = _verdict(args) if args.model is not None else None
    if verdict is not None:
        report["verdict"] = {"status": verdict.status, "lines": verdict.lines,
                             "xla_temp_bytes": verdict.xla_temp_bytes,
                             "planned_activation_bytes": verdict.planned_activation_bytes}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
        if verdict is not None:
            print("")
            print(f"model {args.model}:")
            print(verdict.render())
    return 0


def _verdict(args: argparse.Namespace):
    from jaxmap.cli.common import model_facts
    from jaxmap.cli.verdict import judge
    from jaxmap.config.dtypes import default_dtype
    from jaxmap.config.hardware import Hardware
    from jaxmap.planning.wishes import make_wish

    config, stored = model_facts(None if args.model == "default" else args.model,
                                 native=args.dtype is None and args.isq is None)
    hardware = Hardware.from_jax()
    dtype = args.dtype or default_dtype(hardware.default_platform).name
    seq = args.max_seq_len or min(config.max_position_embeddings, 4096)
    from jaxmap.cli.common import expert_wish

    wish = make_wish(max_memory=args.max_memory, allow_disk=args.allow_disk,
                     isq=args.isq or ("native" if stored else None), **expert_wish(args))
    return judge(config, hardware, wish, dtype, seq, args.max_batch_size, check_xla=args.xla_check, stored=stored,
                 prefill_chunk=args.prefill_chunk)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m jaxmap.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--model", "-m", nargs="?", const="default", default=None,
                        help="also judge whether this model (preset, folder, .gguf; bare --model: the default) "
                             "fits this machine: fits, fits with offload, or does not fit")
    parser.add_argument("--dtype", help="compute dtype to plan for (default: float32 on CPU, bfloat16 elsewhere)")
    parser.add_argument("--max-seq-len", type=int, help="sequence length to plan for (default: min(context, 4096))")
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--prefill-chunk", type=int, help="prompt tokens per prefill step to plan for (default 2048)")
    parser.add_argument("--max-memory", help='caps, e.g. "0:20GiB,host:64GiB"')
    parser.add_argument("--no-disk", dest="allow_disk", action="store_false", help="forbid the disk tier")
    parser.add_argument("--isq", help="plan with this in-situ quantization type")
    parser.add_argument("--no-xla-check", dest="xla_check", action="store_false",
                        help="skip compiling one layer for XLA's memory_analysis")
    from jaxmap.cli.common import add_distributed_arguments, add_expert_arguments

    add_expert_arguments(parser)

    add_distributed_arguments(parser)
    return guarded(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
