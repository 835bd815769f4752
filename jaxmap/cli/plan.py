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

from jaxmap.cli.common import DEFAULT_MODEL, add_expert_arguments, add_mapping_arguments, expert_wish, read_model_facts
from jaxmap.config.hardware import Hardware
from jaxmap.errors import ArgumentParser, UserError
from jaxmap.planning.device_map import DeviceMap
from jaxmap.planning.isq_types import resolve_native
from jaxmap.planning.planner import plan
from jaxmap.planning.wishes import make_wish


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m jaxmap.plan", description="Print the device map jaxmap would use.")
    p.add_argument("-m", "--model", help=f"preset name, config.json folder or .gguf (default {DEFAULT_MODEL})")
    p.add_argument("--mesh", help="hardware preset name (meshes/*.yaml) or path; default: the live devices")
    add_mapping_arguments(p)
    add_expert_arguments(p)
    p.add_argument("--dtype", default=None, help="compute dtype (float32, bfloat16, float16; default float32, and a "
                                                 "GGUF keeps its quantized types as generate does)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="sequence length the KV cache is planned for (default: min(model context, 4096), as generate)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens per prefill step the activations are planned for (default 2048, as generate)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--svg", help="write an SVG picture of the layers coloured by device")
    return p


def make_plan(args: argparse.Namespace) -> DeviceMap:
    facts = read_model_facts(args.model, native=args.dtype is None and args.isq is None)
    config, stored = facts.config, facts.stored
    if args.plan:
        saved = DeviceMap.from_yaml(Path(args.plan) if Path(args.plan).is_file() else _missing(args.plan), config)
        if facts.types:
            resolve_native(saved, config, facts.types)  # a plan made without the checkpoint's types
        return saved
    hardware = Hardware.from_preset(args.mesh) if args.mesh else Hardware.from_jax()
    wish = make_wish(tp=args.tp, pp=args.pp, devices=args.devices or None, device_layers=args.device_layers,
                     topology=Path(args.topology) if args.topology else None,
                     isq=args.isq or ("native" if stored else None), max_memory=args.max_memory, auto=args.auto,
                     allow_disk=args.allow_disk, **expert_wish(args))
    seq = args.max_seq_len if args.max_seq_len is not None else min(config.max_position_embeddings, 4096)
    return plan(config, hardware, wish, args.dtype or "float32", seq, args.max_batch_size, stored_bytes=stored,
                native_types=facts.types, prefill_chunk=args.prefill_chunk)


def _missing(path: str) -> Path:
    raise UserError(f"cannot read plan {path}: no such file")


_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
            "#bab0ac")


_EXPERT_MARK = {"cpu": "#000", "host": "#555", "disk": "#c00", "device": "#fff"}
_EXPERT_LABEL = {"cpu": "in host memory, computed on the CPU", "host": "in host memory, streamed",
                 "disk": "on disk, streamed", "device": "on another device"}


def render_svg(device_map: DeviceMap) -> str:
    """Layers as cells coloured by device group (stripes for host/disk memory kinds), with a legend."""
    groups: list[str] = []
    for s in device_map.stages:
        label = ",".join(s.devices)
        if label not in groups:
            groups.append(label)
    cell, pad, cols = 22, 10, 16
    rows = (device_map.num_layers + cols - 1) // cols
    height = pad * 3 + rows * cell + 20 * (len(groups) + 2 + len({e.memory_kind for e in device_map.experts}))
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
            experts = device_map.experts_of(layer)
            if experts is not None:  # routed experts apart: a corner mark, its title says where
                where = f"experts {experts.memory_kind} on {','.join(experts.devices)}"
                out.append(f'<path d="M{x + cell - 10},{y} h8 v8 z" fill="{_EXPERT_MARK[experts.memory_kind]}">'
                           f"<title>{html.escape(f'layer {layer}: {where}')}</title></path>")
            out.append(f'<text x="{x + 3}" y="{y + 14}" fill="#fff" font-size="9">{layer}</text>')
    y = pad * 3 + rows * cell
    for i, label in enumerate(groups):
        out.append(f'<rect x="{pad}" y="{y + i * 20}" width="14" height="14" fill="{_PALETTE[i % len(_PALETTE)]}"/>')
        out.append(f'<text x="{pad + 20}" y="{y + i * 20 + 11}">{html.escape(label)}</text>')
    y += len(groups) * 20
    out.append(f'<rect x="{pad}" y="{y}" width="14" height="14" fill="url(#host)" stroke="#000"/>')
    out.append(f'<text x="{pad + 20}" y="{y + 11}">striped: host or disk memory; plain: device memory</text>')
    kinds = sorted({e.memory_kind for e in device_map.experts})
    for kind in kinds:
        y += 20
        out.append(f'<path d="M{pad},{y} h14 v14 z" fill="{_EXPERT_MARK[kind]}"/>')
        out.append(f'<text x="{pad + 20}" y="{y + 11}">corner: routed experts apart, {html.escape(_EXPERT_LABEL[kind])}'
                   "</text>")
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
