"""jaxmap's native CPU kernel for quantized products at decode (``qmatvec.cc``), called from jitted programs through
``jax.ffi``.

XLA:CPU runs a quantized matrix-vector product as a fused loop that unpacks and scales every code on its way into the
multiply; for 4-bit GGUF models that loop, not memory, bounds decode. The kernel here unpacks 16 codes per vector
instruction (a 4-bit plane's two rows per byte at once), multiplies them as floats with the (unquantized, float32)
activation, scales each sub-block's partial sum once, prefetches the weight a few rows ahead (a decode streams every
weight from memory once), and splits the output rows over XLA's intra-op thread pool. Results equal the dequantized
product up to float summation order (an int16 activation, tried, cost SmolLM2 up to 1% of a logit where its
activations have outliers; the float form is as fast here).

It has AVX-512 and AVX2 paths, so it is built only on x86-64 CPUs with AVX2, FMA and F16C (elsewhere XLA's products
are the faster ones). It is built on first use with the machine's C++ compiler (``$CXX``, else ``c++``/``g++``/
``clang++``) against the XLA FFI headers jaxlib ships, ``-O3 -march=native``, into ``<jaxmap cache>/native/`` keyed
by the sources, jaxlib's version, the compiler and the CPU (a few seconds, once). Where there is no compiler or the
build fails, quantized products stay XLA's (logged once at INFO; ``python -m jaxmap.doctor`` says why).
``JAXMAP_NATIVE_KERNELS=0`` turns the kernels off.

Which products use it is decided where weights are placed (:func:`mark`): quantized ``[out, in]`` weights of a
stage on one CPU device, for the block types of :func:`supports`. The choice is a static field of the
:class:`~jaxmap.quant.qtensor.QTensor` (``kernel``), so it is part of every program's cache key.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from jaxmap.config.cache import cache_root
from jaxmap.quant.qtensor import QTensor
from jaxmap.quant.types import QTYPES, _planes

log = logging.getLogger(__name__)

TARGET = "jaxmap_qmatvec"
ATTENTION_TARGET = "jaxmap_decode_attention"
TARGETS = (TARGET, ATTENTION_TARGET)  # every custom call jaxmap registers (stored programs may contain them)
KERNEL = "cpu"  # QTensor.kernel value of a weight whose decode products run here
MAX_ROWS = 8  # activation rows sent to the kernel (decode batches); more go to XLA's GEMM (faster from 16 rows)
# With AVX-512, a 4-bit plane's codes (Q4_*, Q5_*, Q4K-Q6K) are unpacked once for up to 8 activation rows: the kernel
# beats XLA's GEMM up to 32 rows there (30 SmolLM2-shaped Q4_1 layers: 16 rows 30.9 vs 38.0 ms, 32 rows 58.1 vs
# 67.4, 64 rows 116 vs 92), so short prefill chunks and larger decode batches use it too.
MAX_ROWS_WIDE = 32
THREADS = 0  # helper threads of a call: 0 = XLA's intra-op pool size (set lower only to measure)
SOURCE = Path(__file__).with_name("qmatvec.cc")
ATTENTION_SOURCE = Path(__file__).with_name("attention.cc")
_WIDTHS = {(4,), (8,), (4, 1), (4, 2), (2,), (2, 1)}  # value plane widths the kernel unpacks


@dataclasses.dataclass
class _State:
    library: Path | None = None
    problem: str | None = None  # why the kernel is not available
    avx512: bool = False  # the build has the AVX-512 paths (several rows per unpacked weight)


_state: _State | None = None


def disabled_by_env() -> bool:
    return os.environ.get("JAXMAP_NATIVE_KERNELS", "1").lower() in ("0", "false", "no", "off")


def available() -> bool:
    """Whether the kernel is built (or was built before) and registered with XLA in this process."""
    return _ensure().library is not None


def status() -> str:
    """One line for ``doctor``: the built library's path, or why quantized products stay XLA's."""
    state = _ensure()
    return f"built ({state.library})" if state.library else f"off: {state.problem}"


def _ensure() -> _State:
    global _state
    if _state is None:
        _state = _State()
        try:
            _state.library, _state.avx512 = _build_and_register()
        except _Unavailable as exc:
            _state.problem = str(exc)
            log.info("native CPU kernel unavailable (%s); quantized products run in XLA", exc)
    return _state


class _Unavailable(Exception):
    pass


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise _Unavailable("no C++ compiler found (set CXX)")


def _cpu_flags() -> str:
    """The CPU's feature flags line from /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return ""


def _cpu_identity() -> str:
    """What -march=native depends on: the machine and its CPU's feature flags (a shared cache folder may be seen
    from several machines)."""
    return f"{platform.machine()}|{platform.processor()}|{_cpu_flags()}"


def _check_cpu() -> None:
    """The kernel has AVX-512 and AVX2 paths only; elsewhere XLA's products are the faster ones."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise _Unavailable(f"needs an x86-64 CPU with AVX2 (this one is {platform.machine() or 'unknown'})")
    flags = set(_cpu_flags().split(":", 1)[-1].split())
    missing = [f for f in ("avx2", "fma", "f16c") if f not in flags]
    if flags and missing:
        raise _Unavailable(f"needs a CPU with AVX2, FMA and F16C (this one lacks {', '.join(missing)})")


def _build_and_register() -> tuple[Path, bool]:
    if disabled_by_env():
        raise _Unavailable("JAXMAP_NATIVE_KERNELS=0")
    _check_cpu()
    import jax
    import jaxlib

    cxx = _compiler()
    include = jax.ffi.include_dir()
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", "-I", include]
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise _Unavailable(f"{cxx} --version failed ({exc})") from None
    sources = [SOURCE, ATTENTION_SOURCE]
    key = hashlib.sha256(b"\0".join([*(f.read_bytes() for f in sources), jaxlib.__version__.encode(), version.encode(),
                                     _cpu_identity().encode(), " ".join(flags).encode()])).hexdigest()[:20]
    folder = cache_root() / "native"
    library = folder / f"qmatvec-{key}.so"
    if not library.exists():
        _compile(cxx, flags, sources, folder, library)
    try:
        lib = ctypes.cdll.LoadLibrary(str(library))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxmapQMatvec), platform="cpu")
        jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.JaxmapDecodeAttention), platform="cpu")
        avx512 = bool(lib.JaxmapQMatvecAvx512())
    except (OSError, AttributeError, ValueError, RuntimeError) as exc:
        raise _Unavailable(f"cannot load {library} ({exc})") from None
    return library, avx512


def _compile(cxx: str, flags: list[str], sources: list[Path], folder: Path, library: Path) -> None:
    """Compile into a temporary file beside ``library`` and rename it over (a concurrent build is harmless)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=library.stem, suffix=".tmp.so")
        os.close(fd)
    except OSError as exc:
        raise _Unavailable(f"cannot write {folder} ({exc.strerror})") from None
    log.info("building jaxmap's native CPU kernel (once per machine and jaxlib version)")
    try:
        done = subprocess.run([cxx, *flags, *map(str, sources), "-o", tmp], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise _Unavailable(f"{Path(cxx).name} failed: {last}")
        os.replace(tmp, library)
    except (OSError, subprocess.SubprocessError) as exc:
        raise _Unavailable(f"{Path(cxx).name} failed ({exc})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---- which weights ---------------------------------------------------------------------------------------------

def supports(w: QTensor) -> bool:
    """Whether the kernel takes this weight: a 2-D block type (simple or K) with float16 scales."""
    q = QTYPES.get(w.qtype)
    if q is None or q.kind not in ("simple", "k") or q.widths not in _WIDTHS or w.sub not in (16, 32):
        return False
    if w.q[0].ndim != 2 or w.shape[1] % 32 or w.d.dtype.name != "float16":
        return False
    mins = w.m if w.m is not None else w.dmin
    return mins is None or mins.dtype.name == "float16"


def max_rows(w: QTensor) -> int:
    """The most activation rows the kernel computes faster than XLA's GEMM, for this weight's type."""
    wide = _ensure().avx512 and QTYPES[w.qtype].widths[0] == 4
    return MAX_ROWS_WIDE if wide else MAX_ROWS


def mark(tree):
    """``tree`` with every supported QTensor set to run its decode products here (when the kernel is available)."""
    import jax

    if not available():
        return tree

    def one(leaf):
        if isinstance(leaf, QTensor) and supports(leaf):
            return dataclasses.replace(leaf, kernel=KERNEL)
        return leaf

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, QTensor))


# ---- the product --------------------------------------------------------------------------------------------------

@functools.cache
def _empty(dtype: str):
    import numpy as np

    return np.zeros((0,), dtype)


@dataclasses.dataclass
class LayerOf:
    """One layer of a scanned stack of weights (``stack``'s arrays ``[layers, ...]``, ``index`` traced), read by the
    kernel in place: sliced inside the scan, a weight would be copied out of its stack before every call (an XLA
    product fuses the slice; a custom call takes whole buffers)."""

    stack: QTensor
    index: object

    def sliced(self) -> QTensor:
        import jax

        return jax.tree.map(lambda a: a[self.index], self.stack)


def _register_layer_of() -> None:
    import jax

    jax.tree_util.register_dataclass(LayerOf, data_fields=["stack", "index"], meta_fields=[])


_register_layer_of()


def is_native(leaf) -> bool:
    return isinstance(leaf, QTensor) and leaf.kernel == KERNEL


def split_stacked(stacked):
    """A scanned segment's stacked parameters as (what the scan slices, the kernel's weights kept whole, a rebuild
    function taking the sliced part and the layer index)."""
    import jax

    leaves, tree = jax.tree.flatten(stacked, is_leaf=lambda x: isinstance(x, QTensor))
    whole = {i: leaf for i, leaf in enumerate(leaves) if is_native(leaf)}
    sliced = [leaf for i, leaf in enumerate(leaves) if i not in whole]

    def rebuild(sliced_leaves, index):
        it = iter(sliced_leaves)
        return jax.tree.unflatten(tree, [LayerOf(whole[i], index) if i in whole else next(it)
                                         for i in range(len(leaves))])

    return sliced, rebuild


def qmatvec(x, w: QTensor, layer=None):
    """``x [..., in] @ W.T`` for up to :func:`max_rows` rows of ``x``, in ``x``'s dtype (computed in float32).
    ``layer``: the index of the weight in ``w``'s stacked arrays (``w`` one layer when None)."""
    import math

    import jax
    import jax.numpy as jnp
    import numpy as np

    if not available():  # a weight is only marked where it is; this registers the target in a fresh process
        raise RuntimeError(f"jaxmap's native CPU kernel is unavailable: {_ensure().problem}")
    lead, n = x.shape[:-1], x.shape[-1]
    rows, out = math.prod(lead), w.shape[0]
    q = QTYPES[w.qtype]
    k_type = q.kind == "k"

    def planes(arrays, widths):
        arrays, widths = list(arrays), list(widths)
        return arrays + [_empty("uint8")] * (2 - len(arrays)), widths + [0] * (2 - len(widths))

    values, vw = planes(w.q, q.widths)
    scales, sw = planes(w.sc, _planes(q.scale_bits)) if k_type else planes((), ())
    mins_planes, mw = planes(w.mc, _planes(q.min_bits)) if k_type and w.dmin is not None else planes((), ())
    mins = w.m if not k_type else w.dmin
    layers = 1 if layer is None else w.d.shape[0]
    index = jnp.zeros((), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32)
    y = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, out), jnp.float32), vmap_method="sequential")(
        x.reshape(rows, n).astype(jnp.float32), index, *values, w.d, _empty("float16") if mins is None else mins,
        *scales, *mins_planes,
        w0=np.int64(vw[0]), w1=np.int64(vw[1]), offset=np.int64(q.offset), sub=np.int64(w.sub),
        block=np.int64(q.block), k_type=np.int64(k_type), scw0=np.int64(sw[0]), scw1=np.int64(sw[1]),
        scale_offset=np.int64(q.scale_offset), mcw0=np.int64(mw[0]), mcw1=np.int64(mw[1]), layers=np.int64(layers),
        threads=np.int64(THREADS))
    return y.reshape(*lead, out).astype(x.dtype)


# ---- decode attention ------------------------------------------------------------------------------------------

def runs_here(w) -> bool:
    """Whether weight ``w`` (a layer's QTensor, or one layer of a scanned stack) runs its products here: the sign that
    its stage is one CPU device, where the decode attention kernel serves that layer too."""
    return is_native(w.stack if isinstance(w, LayerOf) else w)


def attention_supported(k_cache) -> bool:
    return k_cache.dtype.name in ("float32", "bfloat16")


def decode_attention(q, k_cache, v_cache, layer, mask, k_new, v_new, sinks, scale: float, softcap: float | None):
    """One decode query per row against the cache in one call (``attention.cc``): q [b, g, r, k]; caches [b, g, S, k]
    or a stack [L, b, g, S, k] read in place at ``layer``; mask [b, n] (which of the first n slots each row sees);
    k_new, v_new [b, g, k] (always seen); sinks [g, r] or None. Returns [b, g, r, k] in q's dtype."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    if not available():
        raise RuntimeError(f"jaxmap's native CPU kernel is unavailable: {_ensure().problem}")
    layers = 1 if layer is None else k_cache.shape[0]
    index = jnp.zeros((), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32)
    f32 = jnp.float32
    out = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, f32), vmap_method="sequential")(
        q.astype(f32), index, k_cache, v_cache, mask.astype(jnp.bool_), k_new.astype(f32), v_new.astype(f32),
        _empty("float32") if sinks is None else sinks.astype(f32),
        scale=np.float32(scale), softcap=np.float32(softcap or 0.0), layers=np.int64(layers))
    return out.astype(q.dtype)
