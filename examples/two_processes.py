"""A two-process run on this machine: each process has 4 virtual CPU devices, the model is split over both.

    python examples/two_processes.py            # starts itself twice with JAX_COORDINATOR_ADDRESS etc. set

On a real cluster each host runs the worker part itself: ``python -m jaxmap.generate --coordinator HOST0:1234
--num-processes N --process-id I ...`` (or nothing extra under SLURM / Open MPI / Kubernetes / Cloud TPU).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TINY = str(Path(__file__).resolve().parent.parent / "tests" / "data" / "tiny-llama")
MODEL = os.environ.get("JAXMAP_EXAMPLE_MODEL", TINY)  # any -m: a Hugging Face folder, a GGUF, a jaxmap checkpoint


def worker() -> None:
    from jaxmap.engine import multihost

    multihost.initialize(multihost.resolve())  # reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
    import jaxmap

    model = jaxmap.load(MODEL, pp=2, tp=4, max_seq_len=128, progress=False)  # one stage per process
    result = model.generate("Hello world", max_new_tokens=8, stop_at_eos=False)[0]
    if multihost.is_primary():  # every process computes; process 0 prints
        print(json.dumps({"token_ids": result.token_ids, "stages": [s.devices for s in model.device_map.stages]}))


def main(env: dict | None = None) -> int:
    from jaxmap.cli.launch import launch

    status, out, errs = launch([sys.executable, __file__], num_processes=2, cpu_devices=4, timeout_s=300, env=env)
    rows = [line for line in out.splitlines() if line.startswith("{")]
    if status or not rows:
        print("\n".join(e[-2000:] for e in errs), file=sys.stderr)
        return status or 1
    print(rows[0])
    return 0


if __name__ == "__main__":
    if "JAX_PROCESS_ID" in os.environ:
        worker()
    else:
        sys.exit(main())
