"""jaxmap's native CPU kernel for quantized decode products (jaxmap/quant/native): equal to the dequantized product
for every block type it takes, read in place out of scanned stacks, used by a model on one CPU device, and a clean
fall back to XLA where it is switched off or cannot be built."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmap.quant import host, native
from jaxmap.quant.kernels import dense, dequantize, qdot

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernel unavailable: {native.status()}")

TOL = 2e-5  # float32 products in another summation order (measured 2-20x below this)


def _weight(qtype: str, shape, seed: int = 0):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return jax.tree.map(jnp.asarray, host.quantize(w, qtype))


def _close(y, ref, tol=TOL):
    y, ref = np.asarray(y), np.asarray(ref)
    assert y.shape == ref.shape
    assert np.abs(y - ref).max() <= tol * np.abs(ref).max(), np.abs(y - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("qtype,shape", [
    ("Q4_0", (64, 96)), ("Q4_1", (96, 64)), ("Q5_0", (40, 64)), ("Q5_1", (64, 32)), ("Q8_0", (72, 128)),
    ("Q2K", (48, 256)), ("Q3K", (40, 512)), ("Q4K", (64, 256)), ("Q5K", (24, 512)), ("Q6K", (64, 256)),
    ("Q4K", (32, 288)), ("Q6K", (16, 544)),  # rows ending in a short super-block
])
def test_equals_dequantized_product(qtype, shape):
    w = _weight(qtype, shape)
    assert native.supports(w)
    marked = native.mark({"w": w})["w"]
    assert marked.kernel == native.KERNEL
    rng = np.random.default_rng(1)
    most = native.max_rows(marked)
    # decode at batch 1, a few rows, a [batch, tokens] activation, rows in chunks of 8 + 4 + 1, the most it takes
    for lead in ((1,), (3,), (2, 4), (13,), (most,)):
        x = jnp.asarray(rng.standard_normal((*lead, shape[1])).astype(np.float32) * 3)
        ref = x @ dequantize(w).T
        _close(jax.jit(qdot)(x, marked), ref)
    x_more = jnp.asarray(rng.standard_normal((most + 1, shape[1])), jnp.float32)  # more rows: XLA's GEMM
    _close(jax.jit(qdot)(x_more, marked), x_more @ dequantize(w).T)


def test_bfloat16_activation_comes_back_in_its_dtype():
    w = native.mark(_weight("Q4_1", (64, 64)))
    x = jnp.ones((1, 64), jnp.bfloat16)
    y = jax.jit(dense)(x, w)
    assert y.dtype == jnp.bfloat16
    _close(y.astype(jnp.float32), x.astype(jnp.float32) @ dequantize(w).T, tol=1e-2)  # bfloat16's rounding


def test_unsupported_types_stay_xla():
    for qtype in ("INT8", "INT4", "MXFP4", "F8E4M3"):
        w = _weight(qtype, (32, 128))
        assert not native.supports(w)
        assert native.mark(w).kernel == "xla"


def test_layer_of_a_stack_is_read_in_place():
    """A scanned segment's weights stay whole: the kernel offsets into the stack by the traced layer index."""
    layers = [_weight("Q4K", (32, 256), seed) for seed in range(3)]
    stack = native.mark(jax.tree.map(lambda *a: jnp.stack(a), *layers))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 256)), jnp.float32)

    def body(carry, index):
        return carry, dense(x, native.LayerOf(stack, index))

    _, ys = jax.jit(lambda: jax.lax.scan(body, 0, jnp.arange(3, dtype=jnp.int32)))()
    for i, w in enumerate(layers):
        _close(ys[i], x @ dequantize(w).T)
    with pytest.raises(Exception, match="layer index out of range"):
        jax.block_until_ready(jax.jit(lambda i: dense(x, native.LayerOf(stack, i)))(jnp.int32(3)))


def test_model_on_one_cpu_device_runs_its_products_here(smollm2_native, default_gguf):
    """The default GGUF on cpu[0]: every quantized weight marked, the decode program calls the kernels (no weight
    copied out of a scanned stack), and its logits and greedy tokens equal those of XLA's products."""
    import jaxmap
    from jaxmap.quant.qtensor import QTensor

    stage = smollm2_native.engine.stages[0]
    quantized = [leaf for leaf in jax.tree.leaves(stage.params, is_leaf=lambda x: isinstance(x, QTensor))
                 if isinstance(leaf, QTensor)]
    assert quantized and all(leaf.kernel == native.KERNEL for leaf in quantized)
    text = smollm2_native.engine.compiled_text(0)
    assert native.TARGET in text and native.ATTENTION_TARGET in text  # products and decode attention

    real = native.available
    native.available = lambda: False  # this load keeps XLA's products
    try:
        plain = jaxmap.load(str(default_gguf), max_seq_len=64, progress=False, devices="0")
    finally:
        native.available = real
    leaves = jax.tree.leaves(plain.engine.stages[0].params, is_leaf=lambda x: isinstance(x, QTensor))
    assert all(leaf.kernel == "xla" for leaf in leaves if isinstance(leaf, QTensor))
    prompts = ["The capital of France is", "def fibonacci(n):"]
    ids = [smollm2_native.encode(p) for p in prompts]
    for a, b in zip(smollm2_native.forward_logits(ids), plain.forward_logits(ids), strict=True):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()

    def tokens(model):
        return [r.token_ids for r in model.generate(prompts, max_new_tokens=12, stop_at_eos=False)]

    assert tokens(smollm2_native) == tokens(plain)


def _status_in(env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", "from jaxmap.quant import native; print(native.status())"],
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_switched_off_or_unbuildable_falls_back(tmp_path):
    assert _status_in({"JAXMAP_NATIVE_KERNELS": "0"}) == "off: JAXMAP_NATIVE_KERNELS=0"
    # a compiler that fails, into an empty cache: off with the reason, nothing half-written left behind
    status = _status_in({"CXX": "false", "JAXMAP_CACHE_DIR": str(tmp_path)})
    assert status.startswith("off: false failed"), status
    assert not any((tmp_path / "native").iterdir())


@pytest.mark.parametrize("machine,flags,why", [
    ("aarch64", "Features: fp asimd", "needs an x86-64 CPU with AVX2 (this one is aarch64)"),
    ("x86_64", "flags: fpu sse sse2 avx", "needs a CPU with AVX2, FMA and F16C (this one lacks avx2, fma, f16c)"),
])
def test_cpus_without_a_vector_path_keep_xla(monkeypatch, machine, flags, why):
    monkeypatch.setattr(native.platform, "machine", lambda: machine)
    monkeypatch.setattr(native, "_cpu_flags", lambda: flags)
    with pytest.raises(native._Unavailable, match=why.replace("(", r"\(").replace(")", r"\)")):
        native._check_cpu()


def test_mark_is_a_static_choice_in_the_tree():
    """The kernel is part of the pytree's structure, so a program (and a stored one's key) differs with it."""
    w = _weight("Q4_1", (32, 64))
    assert jax.tree.structure(w) != jax.tree.structure(dataclasses.replace(w, kernel=native.KERNEL))


# ---- decode attention ------------------------------------------------------------------------------------------

def _attention_case(rng, b=2, g=3, r=2, k=64, slots=24, read=16, layers=None, dtype=jnp.float32):
    stack = () if layers is None else (layers,)
    q = jnp.asarray(rng.standard_normal((b, g, r, k)), jnp.float32)
    caches = [jnp.asarray(rng.standard_normal((*stack, b, g, slots, k)), dtype) for _ in range(2)]
    new = [jnp.asarray(rng.standard_normal((b, g, k)), jnp.float32) for _ in range(2)]
    mask = jnp.asarray(rng.random((b, read)) < 0.7)
    return q, caches, new, mask


@pytest.mark.parametrize("case", [
    dict(),  # grouped-query heads, a batch with its own mask per row, float32
    dict(k=40, r=1, b=1),  # a head size off the vector width
    dict(dtype=jnp.bfloat16, softcap=5.0),  # bfloat16 caches, Gemma 2's soft-capping
    dict(layers=4, sinks=True),  # one layer of a stack read in place, gpt-oss's sinks
    dict(read=0, b=1),  # nothing cached yet: only the new key
])
def test_decode_attention_equals_xla(case):
    from jaxmap.engine.blocks import _decode_attention

    case = dict(case)
    softcap, sinks = case.pop("softcap", None), case.pop("sinks", False)
    rng = np.random.default_rng(3)
    q, (kc, vc), (kn, vn), mask = _attention_case(rng, **case)
    g, r = q.shape[1], q.shape[2]
    sink = jnp.asarray(rng.standard_normal((g, r)), jnp.float32) if sinks else None
    layer = None if kc.ndim == 4 else jnp.int32(2)
    read, scale = mask.shape[1], q.shape[-1] ** -0.5
    got = jax.jit(lambda *a: native.decode_attention(*a, sink, scale, softcap))(q, kc, vc, layer, mask, kn, vn)
    ref = _decode_attention(q, kn, vn, kc, vc, layer, mask, read, scale, softcap, sink)
    _close(got, ref, tol=1e-5)


def test_decode_attention_checks_the_layer_index():
    q, (kc, vc), (kn, vn), mask = _attention_case(np.random.default_rng(0), layers=2)
    with pytest.raises(Exception, match="layer index out of range"):
        native.decode_attention(q, kc, vc, jnp.int32(2), mask, kn, vn, None, 0.125, None).block_until_ready()

