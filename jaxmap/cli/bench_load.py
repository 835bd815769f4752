"""``python -m jaxmap.bench_load``: time and peak RSS of loading one model from each format, each in a fresh process.

    python -m jaxmap.bench_load --hf /tmp/smol-hf --ckpt /tmp/smol-ckpt     # creates both from the default GGUF

Formats: the GGUF (jaxmap's reader, dequantizing Q4_1), a Hugging Face folder of float32 safetensors (jaxmap's
reader), the same folder read by orbax's safetensors layout (``orbax.checkpoint.experimental.v1`` with
``checkpoint_layout='safetensors'``, straight into shardings; weights only, Hugging Face layout, no transposes),
and a jaxmap orbax checkpoint (``python -m jaxmap.convert``). Every load places the weights on one device in
float32; the time is wall time from the start of the load call to weights placed (process start and imports
excluded), peak RSS is the child's ``ru_maxrss``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxmap.errors import ArgumentParser

CHILD = r"""
import json, resource, sys, time
kind, path = sys.argv[1], sys.argv[2]
import jax, numpy as np
import jaxmap
from jaxmap.api import resolve_source
jax.devices()
t0 = time.perf_counter()
if kind == "orbax-safetensors":
    import orbax.checkpoint.experimental.v1 as ocp
    from jaxmap.loading import open_source
    src = open_source(path)  # only for names and shapes
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {n: jax.ShapeDtypeStruct(src.shape(n), np.float32, sharding=sharding) for n in src.names()}
    ctx = ocp.Context(checkpoint_layout="safetensors")
    with ctx:
        tree = ocp.load(path, abstract)
    jax.block_until_ready(tree)
    n = len(tree)
else:
    model = jaxmap.load(path if path != "-" else None, devices="0", dtype="float32", progress=False,
                        max_seq_len=256)
    jax.block_until_ready([s.params for s in model.engine.stages])
    n = sum(len(s.params["layers"]) for s in model.engine.stages)
seconds = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"kind": kind, "seconds": seconds, "peak_rss_mib": rss, "n": n}))
"""


def make_hf_folder(out: Path, model: str | None = None) -> Path:
    """A Hugging Face folder of float32 safetensors written from any source (the default GGUF by default)."""
    import numpy as np
    from safetensors.numpy import save_file

    from jaxmap.api import resolve_source
    from jaxmap.families import config_to_hf, outer_param_specs
    from jaxmap.materialize.checkpoint_writer import _write_json, _write_tokenizer

    source = resolve_source(model)
    try:
        out.mkdir(parents=True)
        untied = source.config.with_changes(tie_word_embeddings=False)
        tied_head = {s.hf_name for s in outer_param_specs(untied).values()
                     if s.role == "head" and source.config.tie_word_embeddings}
        tensors = {name: np.ascontiguousarray(source.read(name, np.float32)) for name in source.names()
                   if name not in tied_head}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        _write_json(out / "config.json", config_to_hf(source.config))
        _write_tokenizer(source, out)
    finally:
        source.close()
    return out


def measure(kind: str, path: str, timeout: float = 600) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, path], capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        return {"kind": kind, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m jaxmap.bench_load", description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None, help="the GGUF (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--hf", required=True, help="float32 safetensors folder (created when absent)")
    parser.add_argument("--ckpt", required=True, help="jaxmap orbax checkpoint (created when absent)")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    from jaxmap.loading import default_model_path

    gguf = args.model or str(default_model_path())
    hf, ckpt = Path(args.hf), Path(args.ckpt)
    if not hf.exists():
        make_hf_folder(hf, gguf)
    if not ckpt.exists():
        from jaxmap.api import resolve_source
        from jaxmap.materialize.checkpoint_writer import convert

        source = resolve_source(gguf)
        convert(source, ckpt, "float32", progress=False)  # float32 (a GGUF would keep its types)
        source.close()
    cases = [("jaxmap-gguf", gguf), ("jaxmap-safetensors", str(hf)), ("orbax-safetensors", str(hf)),
             ("jaxmap-orbax-checkpoint", str(ckpt))]
    print(f"{'format':<26} {'seconds':>8} {'peak RSS MiB':>13}")
    for _ in range(args.repeat):
        for kind, path in cases:
            r = measure(kind, path)
            if "error" in r:
                print(f"{kind:<26} error: {r['error']}")
            else:
                print(f"{kind:<26} {r['seconds']:>8.2f} {r['peak_rss_mib']:>13.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
