"""Every layout computes the same thing: tensor parallel, pipelines, both, -n and topologies, on 8 virtual CPUs."""

from __future__ import annotations

import re

import numpy as np
import pytest

import jaxmap
from jaxmap.errors import UserError

PROMPTS = [[5, 17, 99, 3, 250], [42, 7, 300]]
NEW = 8


def run(**wish):
    model = jaxmap.load("preset:tiny", max_seq_len=128, progress=False, **wish)
    tokens = [r.token_ids for r in model.generate(PROMPTS, max_new_tokens=NEW, stop_at_eos=False)]
    return model, model.forward_logits(PROMPTS), tokens


@pytest.fixture(scope="module")
def single():
    model, logits, tokens = run(devices="0")
    assert model.device_map.strategy == "single" or len(model.device_map.stages) == 1
    assert len(model.engine.stages) == 1 and model.engine.stages[0].params["layers"][0]["wq"].sharding.num_devices == 1
    return logits, tokens


def assert_same(result, single):
    _, logits, tokens = result
    ref_logits, ref_tokens = single
    for a, b in zip(logits, ref_logits, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)
    assert tokens == ref_tokens


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallel(single, tp):
    result = run(tp=tp, pp=1)
    model = result[0]
    assert [s.tp for s in model.device_map.stages] == [tp]
    wq = model.engine.stages[0].params["layers"][0]["wq"]
    assert wq.sharding.num_devices == tp
    assert wq.addressable_shards[0].data.shape == (128, 128 // tp)  # column-parallel: heads split
    wo = model.engine.stages[0].params["layers"][0]["wo"]
    assert wo.addressable_shards[0].data.shape == (128 // tp, 128)  # row-parallel
    assert_same(result, single)


@pytest.mark.parametrize("pp", [2, 3])
def test_pipeline(single, pp):
    result = run(pp=pp, tp=1)
    model = result[0]
    assert len(model.engine.stages) == pp
    devices = [set(s.params["layers"][0]["wq"].sharding.device_set) for s in model.engine.stages]
    assert all(a.isdisjoint(b) for i, a in enumerate(devices) for b in devices[i + 1:])
    assert_same(result, single)


def test_pipeline_x_tensor(single):
    result = run(pp=2, tp=2)
    assert [(s.start, s.end, s.tp) for s in result[0].device_map.stages] == [(0, 2, 2), (2, 4, 2)]
    assert_same(result, single)


def test_default_uses_every_device(single):
    result = run()
    assert result[0].device_map.strategy == "tensor_parallel"
    assert result[0].device_map.stages[0].tp == 8
    assert_same(result, single)


def test_device_layers(single):
    result = run(device_layers="1:2;3:1")
    stages = result[0].device_map.stages
    assert [(s.start, s.end, s.devices) for s in stages] == [(0, 2, ["cpu[1]"]), (2, 3, ["cpu[3]"]),
                                                             (3, 4, ["cpu[0]"])]
    assert_same(result, single)


def test_topology_non_contiguous(single):
    topo = {"0-1": {"device": "cpu[2]"}, "1-3": {"device": "cpu[5]"}, "3": {"device": "cpu[2]"}}
    result = run(topology=topo, devices="0")
    assert [s.devices for s in result[0].device_map.stages] == [["cpu[2]"], ["cpu[5]"], ["cpu[2]"]]
    assert_same(result, single)


def test_embeddings_and_head_placed_apart(single):
    topo = {"/embed_tokens/": {"device": "cpu[6]"}, "/lm_head|model\\.norm/": {"device": "cpu[7]"}}
    result = run(topology=topo, devices="0")
    engine_stages = result[0].engine.stages
    assert engine_stages[0].num_layers == 0 and engine_stages[0].is_first
    assert engine_stages[-1].num_layers == 0 and engine_stages[-1].is_last
    assert_same(result, single)


def test_saved_plan_round_trip(single, tmp_path):
    first = jaxmap.load("preset:tiny", max_seq_len=128, progress=False, pp=2, tp=2,
                        save_plan=tmp_path / "plan.yaml")
    assert (tmp_path / "plan.yaml").is_file()
    result = run(plan=tmp_path / "plan.yaml")
    assert result[0].device_map.to_dict() == first.device_map.to_dict()
    assert_same(result, single)


def test_plan_for_another_model_refused(tmp_path):
    jaxmap.load("preset:tiny", max_seq_len=64, progress=False, devices="0", save_plan=tmp_path / "p.yaml")
    with pytest.raises(UserError, match="plan was made for model"):
        jaxmap.load("preset:tiny-deep", max_seq_len=64, progress=False, plan=tmp_path / "p.yaml")


def test_hlo_has_all_reduces():
    """Row-parallel o/down projections end in all-reduces that XLA inserted from the shardings."""
    model = jaxmap.load("preset:tiny", max_seq_len=64, progress=False, tp=4, pp=1)
    for n_tokens in (1, 8):  # decode and prefill programs
        text = model.engine.compiled_text(0, batch=1, n_tokens=n_tokens, attend_len=n_tokens if n_tokens > 1 else 64)
        # two per layer at least: after the row-parallel o_proj and down_proj
        assert len(re.findall(r"all-reduce(?:-start)?\(", text)) >= 2 * model.config.num_hidden_layers
    single = jaxmap.load("preset:tiny", max_seq_len=64, progress=False, devices="0")
    assert not re.findall(r"all-reduce", single.engine.compiled_text(0))


def test_kv_cache_sharded_on_kv_heads():
    model = jaxmap.load("preset:tiny", max_seq_len=64, progress=False, tp=4, pp=1)
    (k, _), *_ = model.engine.new_cache(1)[0]
    assert k.addressable_shards[0].data.shape == (1, 1, 64, 16)  # 4 kv heads over tp=4


def test_bad_wishes():
    with pytest.raises(UserError, match="--tp 3"):
        jaxmap.load("preset:tiny", progress=False, tp=3)
    with pytest.raises(UserError):
        jaxmap.load("preset:tiny", progress=False, device_layers="0:x")
    with pytest.raises(UserError):
        jaxmap.load("preset:tiny", progress=False, device_layers="0:3;9:1")
    with pytest.raises(UserError):
        jaxmap.load("preset:tiny", progress=False, device_layers="0:5")


def test_device_names_do_not_collide_across_platforms(monkeypatch):
    """jax numbers each platform from 0: a GPU and the host CPU both have id 0 (a bug seen on an H100)."""
    import types

    import jax

    from jaxmap.materialize import placement

    gpu = [types.SimpleNamespace(platform="gpu", id=i) for i in range(2)]
    cpu = [types.SimpleNamespace(platform="cpu", id=0)]
    monkeypatch.setattr(jax, "devices", lambda backend=None: cpu if backend == "cpu" else gpu)
    live = placement.live_devices_by_name()
    assert live == {"cuda[0]": gpu[0], "cuda[1]": gpu[1], "cpu[0]": cpu[0]}
