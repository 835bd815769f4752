"""Several processes, one model: ``jax.distributed`` set-up and moving values between processes' devices.

Every process runs the same program (multi-controller JAX): the planner sees the global device list, stages and
tensor-parallel groups may span processes, and each process supplies only the shards of its own devices.

Moving the hidden state from a stage on one process to a stage on another is the one thing ``jax.device_put``
cannot do everywhere: XLA:CPU (jax 0.10.2) has no cross-host transfers (``device_put`` raises unless
``jax_cross_host_transfer_socket_address`` is set, and with it set the receiving process hung in our tests).
:func:`put` therefore moves such values with a collective instead: one jitted gather over a mesh that joins the
source and destination devices (gloo on CPU, NCCL on GPUs, ICI/DCN on TPUs). Within a process, or on a backend that
supports cross-host transfers, it is plain ``jax.device_put``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from typing import Any

from jaxmap.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60
WATCHDOG_MARGIN_S = 5
ENV = {
    "coordinator": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
    "timeout": "JAXMAP_DISTRIBUTED_TIMEOUT",
}
# Cluster environments jax.distributed.initialize detects by itself (no flags needed there).
CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
               "JOBSET_NAME")


@dataclasses.dataclass(frozen=True)
class DistributedArgs:
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = DEFAULT_TIMEOUT_S
    auto: bool = False  # a cluster environment jax detects by itself

    @property
    def wanted(self) -> bool:
        return self.coordinator is not None or self.num_processes is not None or self.auto


def resolve(coordinator=None, num_processes=None, process_id=None, timeout_s=None,
            environ: dict | None = None) -> DistributedArgs:
    """Flags first, then the environment; checks what can be checked before jax starts."""
    env = os.environ if environ is None else environ

    def as_int(value, what):
        if value is None or value == "":
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"{what} must be an integer, got {value!r}") from None

    coordinator = coordinator or env.get(ENV["coordinator"]) or None
    num_processes = as_int(num_processes if num_processes is not None else env.get(ENV["num_processes"]),
                           "--num-processes")
    process_id = as_int(process_id if process_id is not None else env.get(ENV["process_id"]), "--process-id")
    timeout = as_int(timeout_s if timeout_s is not None else env.get(ENV["timeout"]), "--distributed-timeout")
    timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    if timeout < 1:
        raise UserError(f"--distributed-timeout must be at least 1 second, got {timeout}")
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
        if num_processes is None or process_id is None:
            raise UserError("--coordinator needs --num-processes and --process-id (or JAX_NUM_PROCESSES and "
                            "JAX_PROCESS_ID) outside SLURM, Open MPI, Kubernetes and Cloud TPU")
    if num_processes is not None:
        if num_processes < 1:
            raise UserError(f"--num-processes must be at least 1, got {num_processes}")
        if process_id is not None and not 0 <= process_id < num_processes:
            raise UserError(f"--process-id must be in 0..{num_processes - 1}, got {process_id}")
    auto = coordinator is None and any(k in env for k in CLUSTER_ENV) and num_processes != 1
    return DistributedArgs(coordinator, num_processes, process_id, timeout, auto)


def initialize(args: DistributedArgs) -> bool:
    """Join the job (``jax.distributed.initialize``) when asked; True when this is a multi-process run.

    Must run before jax creates its backends (any ``jax.devices()``, any array). A coordinator that never answers,
    or processes that never all arrive, end after ``timeout_s`` in a one-line :class:`UserError`.
    """
    if not args.wanted or args.num_processes == 1:
        return False
    import jax

    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if _backends_started():
        raise UserError("jax.distributed must start before jax is used; call jaxmap.engine.multihost.initialize first")
    _configure_cpu_collectives()
    # jax's client aborts the whole process (a C++ fatal error, not an exception) when the coordinator does not
    # answer in time; a watchdog that fires a little earlier turns that into the usual one-line error and status 2.
    kwargs: dict[str, Any] = {"initialization_timeout": args.timeout_s + WATCHDOG_MARGIN_S}
    if args.coordinator is not None:
        kwargs.update(coordinator_address=args.coordinator, num_processes=args.num_processes,
                      process_id=args.process_id)
    where = args.coordinator or "the cluster's coordinator"
    message = (f"error: could not join the jax.distributed job at {where} within {args.timeout_s} s (process "
               f"{args.process_id} of {args.num_processes}); check that every process was started, that process 0 "
               "listens on that address and port, and that all got the same --num-processes")
    watchdog = threading.Timer(args.timeout_s, _give_up, (message,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{message[len('error: '):]}: {first[:300]}") from None
    finally:
        watchdog.cancel()
    if args.num_processes is not None and jax.process_count() != args.num_processes:
        raise UserError(f"--num-processes {args.num_processes} but the job has {jax.process_count()} processes")
    log.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def _give_up(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)
    os._exit(UserError.exit_code)


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge._backends)
    except Exception:  # private API moved: assume not started, jax itself will complain
        return False


def _configure_cpu_collectives() -> None:
    """CPU devices of different processes talk through gloo (the default, 'none', has no cross-process collectives)."""
    import jax

    try:
        if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:
        pass


def start_from_args(args) -> bool:
    """For command lines: join the job the flags or environment describe; other processes than 0 go quiet.

    Returns True when this process is not process 0 (its text output should be dropped).
    """
    import sys

    dist = resolve(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                   getattr(args, "process_id", None), getattr(args, "distributed_timeout", None))
    if not initialize(dist) or is_primary():
        return False
    logging.getLogger("jaxmap").setLevel(logging.WARNING)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    return True


def is_primary() -> bool:
    """Process 0 (or the only process): the one that prints text."""
    import jax

    return jax.process_index() == 0


# ---- moving values ------------------------------------------------------------------------------------------------
def put(x: Any, sharding: Any) -> Any:
    """``jax.device_put(x, sharding)`` that also works when ``x`` and ``sharding`` live on different processes."""
    import jax

    if x is None or jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if not isinstance(x, jax.Array):  # host data: every process holds the same value
        return jax.device_put(x, sharding)
    if not x.committed:  # made by this process from host data (jnp.asarray, jax.random.key): the same everywhere
        return jax.device_put(x, sharding) if sharding.is_fully_addressable else _from_local(x, sharding)
    # committed: decide from the global device sets, so every process takes the same branch
    src, dst = x.sharding.device_set, sharding.device_set
    processes = {d.process_index for d in src} | {d.process_index for d in dst}
    if src == dst or len(processes) == 1 or getattr(_backend(), "supports_cross_host_transfers", False):
        return jax.device_put(x, sharding)
    return _hop(x, sharding)


def to_local(x: Any) -> Any:
    """A value computed on any process's devices as a process-local array (every process gets the same value)."""
    import jax

    if x is None or jax.process_count() == 1 or not isinstance(x, jax.Array):
        return x
    everywhere = jax.sharding.NamedSharding(jax.sharding.Mesh(_sorted(jax.devices()), ("all",)),
                                            jax.sharding.PartitionSpec())
    import numpy as np

    return jax.numpy.asarray(np.asarray(_hop(x, everywhere).addressable_shards[0].data))  # uncommitted, local


def _backend():
    import jax

    return jax.extend.backend.get_backend() if hasattr(jax, "extend") else None


def _sorted(devices):
    import numpy as np

    return np.array(sorted(devices, key=lambda d: (d.process_index, d.id)))


def _from_local(x, sharding):
    """A process-local value (the same on every process) placed on devices of other processes: via the host."""
    import jax
    import numpy as np

    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
        return jax.random.wrap_key_data(data, impl=impl)
    return jax.device_put(np.asarray(x), sharding)


def _hop(x, sharding):
    """Gather ``x`` onto the devices of ``sharding`` with one collective over a mesh joining both device sets."""
    import jax
    import numpy as np

    P = jax.sharding.PartitionSpec
    src_devices = _sorted(x.sharding.device_set)
    # 1. replicate within the source devices (a tensor-parallel stage may leave its output split)
    if not x.sharding.is_fully_replicated:
        x = _jit_identity(jax.sharding.NamedSharding(jax.sharding.Mesh(src_devices, ("src",)), P()))(x)
    src_set = set(src_devices.tolist())
    joined = list(src_devices) + sorted((d for d in sharding.device_set if d not in src_set),
                                        key=lambda d: (d.process_index, d.id))
    mesh = jax.sharding.Mesh(np.array(joined), ("hop",))
    stacked_sharding = jax.sharding.NamedSharding(mesh, P("hop"))
    local = {s.device: s.data for s in x.addressable_shards}
    pieces = []
    for d in joined:
        if d.process_index != jax.process_index():
            continue
        if d in local:
            pieces.append(local[d][None])
        else:
            pieces.append(jax.device_put(np.zeros((1, *x.shape), x.dtype), d))
    stacked = jax.make_array_from_single_device_arrays((len(joined), *x.shape), stacked_sharding, pieces,
                                                     dtype=x.dtype)
    everywhere = _first_row(jax.sharding.NamedSharding(mesh, P()))(stacked)
    dst_devices = sharding.device_set
    replicated_dst = jax.sharding.NamedSharding(jax.sharding.Mesh(_sorted(dst_devices), ("dst",)), P())
    arrays = [s.data for s in everywhere.addressable_shards if s.device in dst_devices]
    out = jax.make_array_from_single_device_arrays(x.shape, replicated_dst, arrays, dtype=x.dtype)
    return out if sharding.is_fully_replicated and out.sharding.is_equivalent_to(sharding, x.ndim) \
        else jax.device_put(out, sharding)


@functools.lru_cache(maxsize=256)
def _jit_identity(sharding):
    import jax

    return jax.jit(lambda a: a, out_shardings=sharding)


@functools.lru_cache(maxsize=256)
def _first_row(sharding):
    import jax

    return jax.jit(lambda a: a[0], out_shardings=sharding)
