"""Each weight's final ISQ type is decided once, by the planner, stored in the DeviceMap, and what loading uses."""

from __future__ import annotations

import json

import pytest
import yaml

import jaxmap
from jaxmap import quant
from jaxmap.config.hardware import Hardware
from jaxmap.errors import UserError
from jaxmap.families import layer_param_specs, preset_config
from jaxmap.planning.device_map import DeviceMap
from jaxmap.planning.fit import layer_weight_bytes, types_bytes
from jaxmap.planning.isq_types import ensure_types, resolve_native
from jaxmap.planning.planner import plan
from jaxmap.planning.wishes import make_wish

SMOL = preset_config("smollm2-135m")
TINY = preset_config("tiny")
CPU8 = Hardware.from_preset("cpu-8")
PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def _strip(raw: dict) -> dict:
    """A plan's dict as written before the final types were stored."""
    for s in raw["stages"]:
        s.pop("tensor_isq")
    for key in ("embed", "final_norm", "lm_head"):
        raw[key].pop("tensor_isq")
    return raw


def test_plan_stores_fallbacks():
    """SmolLM2 at Q4K: on one device every projection keeps Q4K (576 inputs: a short super-block); at tp=3 the
    row-parallel o projection (192 inputs per device) falls back to Q5_0, the down projection (512) keeps Q4K."""
    one = plan(SMOL, CPU8, make_wish(isq="Q4K", devices="0"))
    assert all(t == dict.fromkeys(PROJECTIONS, "Q4K") for s in one.stages for t in s.tensor_isq)
    three = plan(SMOL, CPU8, make_wish(isq="Q4K"))
    assert [s.tp for s in three.stages] == [3, 3]
    expected = {**dict.fromkeys(PROJECTIONS, "Q4K"), "wo": "Q5_0"}
    assert all(t == expected for s in three.stages for t in s.tensor_isq)
    assert three.embed.tensor_isq is None and three.lm_head.tensor_isq is None  # the head keeps its precision
    tp8 = plan(TINY, CPU8, make_wish(isq="Q8_0", tp=8))  # 16 inputs per device: Q8_0's 32-blocks do not fit
    assert {t["wo"] for t in tp8.stages[0].tensor_isq} == {"INT8"} and tp8.stages[0].tensor_isq[0]["wq"] == "Q8_0"
    # the memory table counts exactly these types
    for m, tp in ((three, 3), (tp8, 8)):
        s = m.stages[0]
        assert types_bytes(m_config(m), 0, tp, "float32", s.tensor_isq[0]) == layer_weight_bytes(
            m_config(m), 0, tp, "float32", s.isq[0])


def test_regex_types_layer_weights_apart():
    """A /regex/ entry with an isq types the decoder-layer weights it matches apart from their layer (by the file's
    names or the GGUF ones), the last match winning; ``isq: none`` keeps them float; other weights keep the range's
    type or --isq; the fill counts the bytes of the types given; the table shows the per-weight types."""
    text = ("0-15:\n  isq: Q4K\n'/mlp\\.down_proj/':\n  isq: Q8_0\n'/blk\\.(2|3)\\.ffn_down/':\n  isq: Q6K\n"
            "'/self_attn\\.o_proj/':\n  isq: none\n")
    m = plan(SMOL, CPU8, make_wish(isq="Q4_0", devices="0", topology=yaml.safe_load(text)))
    types = [t for s in m.stages for t in s.tensor_isq]
    assert types[0] == {**dict.fromkeys(("wq", "wk", "wv", "w_gate", "w_up"), "Q4K"), "w_down": "Q8_0"}
    assert types[2]["w_down"] == "Q6K" and types[3]["w_down"] == "Q6K" and types[4]["w_down"] == "Q8_0"
    assert types[20] == {**dict.fromkeys(("wq", "wk", "wv", "w_gate", "w_up"), "Q4_0"), "w_down": "Q8_0"}
    assert m.stages[0].isq[0] == "Q4K w_down=Q8_0 wo=none"
    assert m.lm_head.tensor_isq is None  # a regex for layer weights leaves the head alone
    table = m.render_table()
    assert "Q4K w_down=Q8_0 wo=none" in table and "Q4_0 w_down=Q8_0 wo=none" in table
    s = m.stages[0]
    assert types_bytes(SMOL, 2, 1, "float32", s.tensor_isq[2]) == layer_weight_bytes(SMOL, 2, 1, "float32", s.isq[2])
    again = DeviceMap.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again.stages[0].isq == s.isq and again.stages[0].tensor_isq == s.tensor_isq
    assert "weights with types of their own" in m.to_topology()


def m_config(device_map: DeviceMap):
    return SMOL if device_map.model == SMOL.name else TINY


def test_regex_types_on_tied_embeddings():
    """A /regex/ type for the LM head quantizes SmolLM2's shared table, on both placements that hold it."""
    topo = {"/lm_head/": {"isq": "Q8_0"}}
    m = plan(SMOL, CPU8, make_wish(isq="Q4K", topology=topo))
    assert m.embed.tensor_isq == "Q8_0" and m.lm_head.tensor_isq == "Q8_0" and m.final_norm.tensor_isq is None
    assert "isq Q8_0" in m.render_table()


def test_saved_plan_round_trips_the_types(tmp_path):
    m = plan(SMOL, CPU8, make_wish(isq="Q4K"))
    path = tmp_path / "plan.yaml"
    path.write_text(m.to_yaml())
    for again in (DeviceMap.from_yaml(path), DeviceMap.from_yaml(path, SMOL), DeviceMap.from_dict(m.to_dict())):
        assert again == m and again.stages[0].tensor_isq[0]["wo"] == "Q5_0"
    assert "tensor_isq:" in path.read_text() and "wo: Q5_0" in path.read_text()


def test_plan_written_before_the_types_still_loads():
    m = plan(SMOL, CPU8, make_wish(isq="Q4K", topology={"/lm_head/": {"isq": "Q8_0"}}))
    raw = _strip(m.to_dict())
    assert DeviceMap.from_dict(raw, SMOL) == m  # recomputed with the model's config
    bare = DeviceMap.from_dict(_strip(m.to_dict()))
    assert bare.stages[0].tensor_isq is None
    ensure_types(bare, SMOL)
    assert bare == m
    with pytest.raises(UserError, match="tensor_isq must hold one mapping per layer"):
        DeviceMap.from_dict({**m.to_dict(), "stages": [{**m.to_dict()["stages"][0], "tensor_isq": [{}]},
                                                      m.to_dict()["stages"][1]]})


def test_native_without_the_types_is_resolved_from_the_file():
    """Planned from a preset (no checkpoint at hand), native tensors are placeholders counted as float; the
    stored types fill them in (falling back at the split like any other type)."""
    m = plan(SMOL, CPU8, make_wish(isq="native", devices="0"))
    assert m.stages[0].tensor_isq[0]["wq"] == "native" and m.embed.tensor_isq == "native"
    assert m.memory[0].weights_bytes == plan(SMOL, CPU8, make_wish(devices="0")).memory[0].weights_bytes
    stored = {s.hf_name: "Q4_1" for i in range(SMOL.num_hidden_layers)
              for s in layer_param_specs(SMOL, i).values() if len(s.shape) == 2}
    stored["model.embed_tokens.weight"] = "Q8_0"
    del stored["model.layers.0.mlp.down_proj.weight"]  # stored as float: stays float
    resolve_native(m, SMOL, stored)
    assert m.stages[0].tensor_isq[0] == {k: "Q4_1" for k in PROJECTIONS if k != "w_down"}
    assert m.stages[0].tensor_isq[1]["w_down"] == "Q4_1" and m.embed.tensor_isq == "Q8_0"
    direct = plan(SMOL, CPU8, make_wish(isq="native", devices="0"), native_types=stored)
    assert [s.tensor_isq for s in direct.stages] == [s.tensor_isq for s in m.stages]


def test_layout_table_and_json_show_the_types():
    m = plan(SMOL, CPU8, make_wish(isq="Q4K"))
    table = m.render_table()
    assert "Q4K (wo: Q5_0)" in table
    layers = m.to_json()["layers"]
    assert layers[0]["isq"] == "Q4K" and layers[0]["tensor_isq"]["wo"] == "Q5_0"
    assert layers[29]["tensor_isq"]["w_down"] == "Q4K"
    assert "Q4K (" not in plan(SMOL, CPU8, make_wish(isq="Q4K", devices="0")).render_table()  # no fallback
    json.dumps(m.to_json())


def _loaded_types(model) -> tuple[dict, dict]:
    """(plan, loaded): per layer and outer placement, the quantized weights' types."""
    dm = model.device_map
    want = {i: dict(s.tensor_isq[i - s.start]) for s in dm.stages for i in range(s.start, s.end)
            if s.memory_kind != "disk"}
    got: dict = {}
    for st in model.engine.stages:
        for j, layer in enumerate(st.params["layers"]):
            got[st.start + j] = {k: v.qtype for k, v in layer.items() if quant.is_quantized(v)}
        for key, value in st.params.items():
            if key == "layers":
                continue
            slot = ("lm_head" if key == "embed_tokens" and st.is_last and not st.is_first else
                    "embed" if key == "embed_tokens" else key)
            got[slot] = value.qtype if quant.is_quantized(value) else None
            want[slot] = getattr(dm, slot).tensor_isq
    return want, got


@pytest.mark.parametrize("kwargs", [dict(isq="Q4K", tp=2), dict(isq="Q8_0", tp=8)])
def test_a_tensor_parallel_load_uses_the_plans_types(kwargs, caplog):
    with caplog.at_level("WARNING", logger="jaxmap.materialize.isq"):
        model = jaxmap.load("preset:tiny", max_seq_len=64, progress=False,
                            topology={"/lm_head/": {"isq": kwargs["isq"]}}, **kwargs)
    want, got = _loaded_types(model)
    assert want == got and want["lm_head"] == kwargs["isq"]
    fallback = model.device_map.stages[0].tensor_isq[0]["wo"]
    assert fallback != kwargs["isq"]
    assert any(f"isq: {kwargs['isq']} does not fit self_attn.o_proj" in r.message and f"{fallback} used instead"
               in r.message for r in caplog.records)


def test_a_split_the_plan_did_not_decide_is_an_error():
    from jaxmap.materialize.isq import type_function

    m = plan(TINY, CPU8, make_wish(isq="Q4K", tp=2))
    type_for = type_function(m, TINY)
    wo = layer_param_specs(TINY, 1)["wo"]
    assert type_for(wo, 2, 1) == ("Q4K", "Q5_0")
    with pytest.raises(UserError, match="model.layers.1.self_attn.o_proj.weight is placed split 1x1"):
        type_for(wo, 1, 1)


def test_a_gguf_native_load_uses_the_plans_types(default_gguf, tmp_path):
    saved = tmp_path / "plan.yaml"
    model = jaxmap.load(str(default_gguf), max_seq_len=64, tp=3, progress=False, save_plan=saved)
    want, got = _loaded_types(model)
    assert want == got
    assert want[0] == dict.fromkeys(PROJECTIONS, "Q4_1") and want["embed"] == want["lm_head"] == "Q8_0"
    assert "native (Q4_1)" in model.device_map.render_table()
    ids = [[1, 2, 3, 4]]
    logits = model.forward_logits(ids)[0]
    # the same plan written before the types were stored: recomputed, the stored types read from the file
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(_strip(yaml.safe_load(saved.read_text())), sort_keys=False))
    assert "tensor_isq" not in old.read_text()
    again = jaxmap.load(str(default_gguf), plan=old, progress=False)
    assert again.device_map.stages == model.device_map.stages and _loaded_types(again) == (want, got)
    assert (again.forward_logits(ids)[0] == logits).all()
