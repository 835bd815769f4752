"""Generation behaviour on random-weight presets: batching, sampling, stopping, dtypes, compile bounds."""

from __future__ import annotations

import numpy as np
import pytest

import jaxmap
from jaxmap.engine.engine import attend_bucket, prefill_bucket
from jaxmap.errors import UserError
from jaxmap.families import preset_config


@pytest.fixture(scope="module")
def tiny():
    return jaxmap.load("preset:tiny", max_seq_len=256, progress=False)


PROMPTS = [[5, 17, 99, 3], [42, 7, 300, 11, 250, 8, 1, 77, 64, 2, 19], [400]]


def test_batch_equals_one_by_one(tiny):
    batch = tiny.generate(PROMPTS, max_new_tokens=12, stop_at_eos=False)
    for ids, result in zip(PROMPTS, batch, strict=True):
        alone = tiny.generate([ids], max_new_tokens=12, stop_at_eos=False)[0]
        assert result.token_ids == alone.token_ids
        assert len(result.token_ids) == 12


def test_batch_logits_equal_single_logits(tiny):
    batch = tiny.forward_logits(PROMPTS)
    for ids, logits in zip(PROMPTS, batch, strict=True):
        (alone,) = tiny.forward_logits([ids])
        assert logits.shape == (len(ids), tiny.config.vocab_size)
        np.testing.assert_allclose(logits, alone, rtol=1e-4, atol=1e-4)


def test_decode_matches_prefill_logits(tiny):
    """Greedy decode token by token must agree with one prefill over the whole sequence (the KV cache is right)."""
    result = tiny.generate([PROMPTS[1]], max_new_tokens=10, stop_at_eos=False)[0]
    full = PROMPTS[1] + result.token_ids
    (logits,) = tiny.forward_logits([full])
    predicted = logits.argmax(-1)[len(PROMPTS[1]) - 1:-1]
    assert predicted.tolist() == result.token_ids


def test_layer_modes_agree():
    unrolled = jaxmap.load("preset:tiny", max_seq_len=256, layer_mode="unrolled", progress=False)
    per_layer = jaxmap.load("preset:tiny", max_seq_len=256, layer_mode="per_layer", progress=False)
    a = unrolled.generate(PROMPTS, max_new_tokens=8, stop_at_eos=False)
    b = per_layer.generate(PROMPTS, max_new_tokens=8, stop_at_eos=False)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert per_layer.engine.stages[0].mode == "per_layer"


def test_crossing_attention_buckets(tiny):
    """A generation that crosses the 128-slot bucket keeps agreeing with a full prefill."""
    prompt = list(range(1, 121))
    result = tiny.generate([prompt], max_new_tokens=20, stop_at_eos=False)[0]
    (logits,) = tiny.forward_logits([prompt + result.token_ids])
    assert logits.argmax(-1)[len(prompt) - 1:-1].tolist() == result.token_ids


def test_sampling_is_seeded_and_varies(tiny):
    kw = dict(max_new_tokens=16, stop_at_eos=False, temperature=1.5, top_k=50, top_p=0.95)
    a = tiny.generate([PROMPTS[0]], seed=1, **kw)[0].token_ids
    b = tiny.generate([PROMPTS[0]], seed=1, **kw)[0].token_ids
    c = tiny.generate([PROMPTS[0]], seed=2, **kw)[0].token_ids
    assert a == b
    assert a != c


def test_top_k_one_is_greedy(tiny):
    greedy = tiny.generate([PROMPTS[0]], max_new_tokens=8, stop_at_eos=False)[0].token_ids
    topk1 = tiny.generate([PROMPTS[0]], max_new_tokens=8, stop_at_eos=False, temperature=0.8, top_k=1)[0].token_ids
    assert greedy == topk1


def test_repetition_penalty_reduces_repeats(tiny):
    plain = tiny.generate([PROMPTS[0]], max_new_tokens=40, stop_at_eos=False)[0].token_ids
    penal = tiny.generate([PROMPTS[0]], max_new_tokens=40, stop_at_eos=False, repetition_penalty=3.0)[0].token_ids
    assert len(set(penal)) > len(set(plain))


def test_stops_at_eos(tiny):
    free = tiny.generate([PROMPTS[1]], max_new_tokens=6, stop_at_eos=False)[0].token_ids
    tiny_eos = tiny.config.eos_token_ids
    # the config is frozen: a second Model over the same engine, whose EOS is the 3rd token generated
    stopper = jaxmap.api.Model(tiny.config.with_changes(eos_token_ids=(free[2],)), tiny.engine, None, "x")
    result = stopper.generate([PROMPTS[1]], max_new_tokens=6)[0]
    assert result.token_ids == free[:2]
    assert result.finish_reason == "eos"
    assert tiny.config.eos_token_ids == tiny_eos


def test_stops_at_context_end():
    model = jaxmap.load("preset:tiny", max_seq_len=20, progress=False)
    result = model.generate([list(range(1, 16))], max_new_tokens=50, stop_at_eos=False)[0]
    assert result.finish_reason == "context"
    assert len(result.token_ids) == 20 - 15 + 1


def test_bf16_close_to_float32(tiny):
    bf16 = jaxmap.load("preset:tiny", max_seq_len=256, dtype="bfloat16", progress=False)
    (a,) = tiny.forward_logits([PROMPTS[1]])
    (b,) = bf16.forward_logits([PROMPTS[1]])
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.8
    assert len(bf16.generate([PROMPTS[0]], max_new_tokens=4, stop_at_eos=False)[0].token_ids) == 4


def test_float16_runs():
    f16 = jaxmap.load("preset:tiny", max_seq_len=64, dtype="float16", progress=False)
    assert len(f16.generate([PROMPTS[0]], max_new_tokens=4, stop_at_eos=False)[0].token_ids) == 4


def test_deep_model_compiles_quickly(fresh_compiles):
    """80 layers (Llama-3-70B's depth) run per layer: compile time does not grow with depth (timed without the
    persistent compilation cache, which would hide a slow compile on a rerun)."""
    deep = jaxmap.load("preset:tiny-deep", max_seq_len=128, progress=False)
    assert deep.engine.stages[0].mode == "per_layer"
    result = deep.generate([PROMPTS[0]], max_new_tokens=2, stop_at_eos=False)[0]
    assert len(result.token_ids) == 2
    assert deep.engine.compile_stats.programs <= 8
    assert result.stats.compile_s < 30  # generous: measured ~1.3 s here; unrolled 80 layers took ~16 s


def test_prompt_longer_than_context(tiny):
    with pytest.raises(UserError, match="longer than --max-seq-len"):
        tiny.generate([list(range(1, 300))], max_new_tokens=2)


def test_bad_inputs(tiny):
    with pytest.raises(UserError, match="outside the vocabulary"):
        tiny.generate([[1, 99999]], max_new_tokens=2)
    with pytest.raises(UserError, match="empty"):
        tiny.generate([[]], max_new_tokens=2)
    with pytest.raises(UserError, match="max-new-tokens"):
        tiny.generate([[1]], max_new_tokens=0)
    with pytest.raises(UserError, match="temperature"):
        tiny.generate([[1]], temperature=-1)
    with pytest.raises(UserError, match="unknown dtype"):
        jaxmap.load("preset:tiny", dtype="float8")
    with pytest.raises(UserError, match="unknown model preset|no such file"):
        jaxmap.load("preset:nope")


def test_buckets():
    assert [attend_bucket(n, 4096) for n in (1, 128, 129, 1000)] == [128, 128, 256, 1024]
    assert attend_bucket(5000, 4096) == 4096
    assert [prefill_bucket(n, 4096) for n in (1, 9, 16, 17, 200, 257, 600)] == [8, 16, 16, 32, 256, 512, 768]
    assert prefill_bucket(100, 50) == 50


def test_decode_reads_cache_buckets_one_layer_at_a_time():
    """Each layer's decode attention reads its cache bucket when that layer runs: a read that depends on nothing
    would be scheduled at the start of the step, every layer's bucket copied out and alive at once (at batch 8 this
    spilled SmolLM2's buckets out of the CPU caches and made decode attention 4x slower)."""
    model = jaxmap.load("preset:tiny", max_seq_len=512, devices="0", progress=False)
    cfg, batch, bucket = model.config, 8, 256
    one_layer = 2 * batch * cfg.num_key_value_heads * bucket * cfg.head_dim * 4  # its keys and values, float32
    assert cfg.num_hidden_layers >= 4
    temp = model.engine.compiled(0, batch=batch, n_tokens=1, attend_len=bucket).memory_analysis().temp_size_in_bytes
    assert temp < 2 * one_layer, (temp, one_layer)


def test_ragged_prefill_blocks_match_one_block(monkeypatch):
    """A prefill whose length 512 does not divide (max_seq_len 1100, not a multiple of 256) runs in 512-query blocks
    with the last one padded, not as one [t, t] block: same logits, and the planner's activation estimate stays
    that of a blocked prefill."""
    from jaxmap.planning import memory

    ids = [list(np.random.default_rng(1).integers(0, 512, 1100))]
    blocked = jaxmap.load("preset:tiny", max_seq_len=1100, progress=False, devices="0").forward_logits(ids)[0]
    config = preset_config("tiny")
    ragged, even = (memory.activation_bytes(config, 1, 4, s, 1) for s in (100_000, 100_096))
    assert ragged <= even
    monkeypatch.setattr(memory, "PREFILL_QUERY_CHUNK", 4096)
    whole = jaxmap.load("preset:tiny", max_seq_len=1100, progress=False, devices="0").forward_logits(ids)[0]
    np.testing.assert_allclose(blocked, whole, atol=2e-5)


@pytest.mark.parametrize("chunk", [3, 50])
def test_chunked_prefill_equals_one_step(tiny, chunk):
    """Prompts prefilled chunk by chunk (each chunk reading the cache slots the earlier ones wrote, left padding
    crossing chunk boundaries, a 149-token prompt whose history crosses the 128-slot bucket) give the logits,
    greedy tokens and seeded samples of one prefill step."""
    prompts = [*PROMPTS, list(range(1, 150))]
    sampled = dict(temperature=0.9, top_p=0.95, repetition_penalty=1.3, seed=3)

    def run():
        logits = tiny.forward_logits(prompts)
        greedy = [r.token_ids for r in tiny.generate(prompts, max_new_tokens=6, stop_at_eos=False)]
        return logits, greedy, [r.token_ids for r in tiny.generate(prompts, max_new_tokens=6, **sampled)]

    whole = run()
    assert tiny.engine.prefill_chunk > 149
    tiny.engine.prefill_chunk = chunk
    try:
        chunked = run()
    finally:
        tiny.engine.prefill_chunk = tiny.device_map.chunk
    for a, b in zip(whole[0], chunked[0], strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    assert whole[1:] == chunked[1:]


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"top_k": 2.5}, "top_k"),
    ({"seed": 2**70}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"temprature": 1.0}, "sampling keywords are"),
    ({"sampling": jaxmap.SamplingParams(temperature=0.5), "temperature": 0.0}, "not both"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
])
def test_bad_sampling_arguments_are_user_errors(tiny, kwargs, message):
    with pytest.raises(UserError, match=message):
        tiny.generate([[1, 2, 3]], **kwargs)


@pytest.mark.parametrize("prompts, message", [
    ([1, 2, 3], "wrap it in a list"),
    (np.array([1, 2, 3]), "wrap it in a list"),
    ([[1.7, 2.2]], "whole numbers"),
    (None, "prompts must be"),
    (b"abc", "prompts must be"),
])
def test_malformed_prompts_are_user_errors(tiny, prompts, message):
    with pytest.raises(UserError, match=message):
        tiny.generate(prompts, max_new_tokens=2)


def test_forward_logits_refuses_text(tiny):
    with pytest.raises(UserError, match="encode text first"):
        tiny.forward_logits(["hello"])
    with pytest.raises(UserError, match="wrap it in a list"):
        tiny.forward_logits([1, 2, 3])


def test_top_k_beyond_the_vocabulary_means_no_top_k(tiny):
    """k >= vocabulary size keeps every token: the same draw as top-k off, not an error from inside the step."""
    big = tiny.generate([[1, 2, 3]], max_new_tokens=6, temperature=1.0, top_k=10_000, seed=4, stop_at_eos=False)
    off = tiny.generate([[1, 2, 3]], max_new_tokens=6, temperature=1.0, top_k=0, seed=4, stop_at_eos=False)
    assert big[0].token_ids == off[0].token_ids


def test_load_refuses_unknown_layer_mode_and_takes_dtype_objects():
    import jax.numpy as jnp

    with pytest.raises(UserError, match="layer_mode must be one of"):
        jaxmap.load("preset:tiny", layer_mode="per-layer", progress=False)
    assert jaxmap.load("preset:tiny", dtype=jnp.bfloat16, max_seq_len=32, progress=False, devices="0").dtype == \
        jnp.bfloat16


def test_a_saved_plan_is_not_silently_overridden(tmp_path):
    """A plan fixes placement, dtype and ISQ: a conflicting wish is refused, and the plan's own KV sizes apply."""
    path = tmp_path / "plan.yaml"
    jaxmap.load("preset:tiny", max_seq_len=64, pp=2, save_plan=str(path), progress=False)
    model = jaxmap.load("preset:tiny", plan=str(path), progress=False)
    assert model.max_seq_len == 64 and model.dtype == np.float32
    for kwargs in ({"dtype": "bfloat16"}, {"isq": "Q8_0"}, {"tp": 2}, {"max_memory": "0:1GiB"}, {"auto": False}):
        with pytest.raises(UserError, match="a saved plan"):
            jaxmap.load("preset:tiny", plan=str(path), progress=False, **kwargs)
    with pytest.raises(UserError, match="takes a path"):
        jaxmap.load("preset:tiny", plan={"stages": []}, progress=False)


def test_topology_placing_every_layer_refuses_tp():
    with pytest.raises(UserError, match="nothing to place"):
        jaxmap.load("preset:tiny", tp=2, topology={"0-4": {"device": "cpu[5]"}}, progress=False)


def test_save_plan_is_written_only_when_the_load_succeeds(tmp_path, monkeypatch):
    from jaxmap.materialize import params as stage_params

    path = tmp_path / "plan.yaml"
    with pytest.raises(UserError, match="it is a folder"):
        jaxmap.load("preset:tiny", max_seq_len=32, progress=False, devices="0", save_plan=tmp_path)

    def broken(*args, **kwargs):
        raise UserError("a weight could not be read")

    monkeypatch.setattr(stage_params, "materialize_stage", broken)
    with pytest.raises(UserError, match="could not be read"):
        jaxmap.load("preset:tiny", max_seq_len=32, progress=False, devices="0", save_plan=path)
    assert not path.exists() and not list(tmp_path.iterdir())
    monkeypatch.undo()
    jaxmap.load("preset:tiny", max_seq_len=32, progress=False, devices="0", save_plan=path)
    assert path.is_file()
