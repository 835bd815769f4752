"""The program store (engine/program_store.py): a warm start reads traced stage programs instead of tracing again,
gives the same tokens, and never reuses a program whose model, dtype, ISQ type or shapes changed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmap
from jaxmap.engine import program_store


@pytest.fixture
def store(tmp_path):
    root = program_store.enable_program_store(tmp_path / "programs")
    yield root
    program_store.disable_program_store()


def _tokens(**kw):
    model = jaxmap.load("preset:tiny", max_seq_len=64, layer_mode="unrolled", progress=False, **kw)
    return model, model.generate([[5, 9, 2, 7, 11]], max_new_tokens=6, stop_at_eos=False)[0].token_ids


def test_key_follows_what_and_arguments():
    a = jnp.zeros((2, 3), jnp.float32)
    base = program_store.program_key(("cfg", 1), [a, None])
    assert base == program_store.program_key(("cfg", 1), [jnp.ones((2, 3), jnp.float32), None])  # values: same
    assert base != program_store.program_key(("cfg", 2), [a, None])                 # a setting
    assert base != program_store.program_key(("cfg", 1), [a.astype(jnp.bfloat16), None])  # a dtype
    assert base != program_store.program_key(("cfg", 1), [jnp.zeros((2, 4)), None])  # a shape
    assert base != program_store.program_key(("cfg", 1), [a, a])                     # the tree


def test_warm_start_reads_programs_and_matches(store):
    program_store.disable_program_store()
    _, plain = _tokens()
    program_store.enable_program_store(store)
    _, cold = _tokens()
    stored = sorted(store.glob("*.jaxexport"))
    assert stored, "the unrolled stage programs are exported"
    mtimes = [p.stat().st_mtime_ns for p in stored]
    model, warm = _tokens()
    assert plain == cold == warm
    assert sorted(store.glob("*.jaxexport")) == stored and [p.stat().st_mtime_ns for p in stored] == mtimes
    assert all(v is not None for v in model.engine._stored.values())  # served from the store


def test_changed_dtype_or_isq_makes_new_programs(store):
    _tokens()
    first = set(store.glob("*.jaxexport"))
    _tokens(dtype="bfloat16")
    second = set(store.glob("*.jaxexport"))
    assert second > first
    _, q = _tokens(isq="Q8_0")
    assert set(store.glob("*.jaxexport")) > second
    program_store.disable_program_store()
    _, q_plain = _tokens(isq="Q8_0")
    assert q == q_plain


def test_programs_calling_the_native_kernels_are_stored(store):
    """On one CPU device a quantized stage calls jaxmap's native kernels (products, decode attention): its prefill
    and decode programs are stored all the same, and a warm start gives the same tokens."""
    from jaxmap.quant import native

    if not native.available():
        pytest.skip(f"native kernel unavailable: {native.status()}")
    model, cold = _tokens(isq="Q8_0", devices="0")
    assert native.ATTENTION_TARGET in model.engine.compiled_text(0)
    assert model.engine._stored and all(v is not None for v in model.engine._stored.values())
    warm_model, warm = _tokens(isq="Q8_0", devices="0")
    assert cold == warm and all(v is not None for v in warm_model.engine._stored.values())


def test_a_torn_file_is_traced_again(store):
    _, want = _tokens()
    for p in store.glob("*.jaxexport"):
        p.write_bytes(b"not a program")
    _, got = _tokens()
    assert got == want
    assert all(p.stat().st_size > 100 for p in store.glob("*.jaxexport"))  # rewritten whole


def test_host_memory_arguments_are_not_stored():
    x = jax.device_put(np.zeros(4, np.float32))
    assert program_store.storable([x, None])
    try:
        host = jax.device_put(np.zeros(4, np.float32), x.sharding.with_memory_kind("pinned_host"))
    except Exception:  # a backend without pinned host memory
        pytest.skip("no pinned_host memory kind")
    assert not program_store.storable([x, host])
