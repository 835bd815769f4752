"""The DeviceMap as data: round trips, refusal of a plan for another model, ``-n``/topology forms, JSON, table."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxmap.config.hardware import Hardware, list_mesh_presets
from jaxmap.errors import UserError
from jaxmap.families import preset_config
from jaxmap.planning.device_map import DeviceMap, Stage
from jaxmap.planning.planner import plan
from jaxmap.planning.wishes import Topology, Wish, parse_device_layers

ROOT = Path(__file__).resolve().parent.parent
SMOL = preset_config("smollm2-135m")
TWO = Hardware.from_preset("2x24gb")
CPU8 = Hardware.from_preset("cpu-8")


def _plans() -> list[DeviceMap]:
    topo = Topology.from_yaml("0-10:\n  device: cpu[1]\n  isq: Q4K\n20-30:\n  device: cpu[1]\n")
    return [
        plan(SMOL, CPU8),
        plan(SMOL, TWO, Wish(device_layers=parse_device_layers("16")), dtype="bf16"),
        plan(SMOL, CPU8, Wish(topology=topo, isq="Q8_0")),
        plan(preset_config("llama-3-8b"), Hardware.from_preset("8xh100"), dtype="bf16"),
    ]


@pytest.mark.parametrize("index", range(4))
def test_yaml_round_trip(index, tmp_path):
    device_map = _plans()[index]
    again = DeviceMap.from_yaml(device_map.to_yaml(), SMOL if index < 3 else None)
    assert again == device_map
    path = tmp_path / "plan.yaml"
    path.write_text(device_map.to_yaml())
    assert DeviceMap.from_yaml(path) == device_map
    assert DeviceMap.from_dict(device_map.to_dict()) == device_map


def test_plan_for_another_model_is_refused():
    saved = plan(SMOL, CPU8).to_yaml()
    other = preset_config("tiny")
    with pytest.raises(UserError, match="made for model 'smollm2-135m'.*model is 'tiny'"):
        DeviceMap.from_yaml(saved, other)
    renamed = SMOL.with_changes(name="my-smollm")
    DeviceMap.from_yaml(saved, renamed)  # same architecture under another name: accepted


@pytest.mark.parametrize("text", ["stages: [", "[1, 2]", "model: x\n"])
def test_malformed_plans(text):
    with pytest.raises(UserError):
        DeviceMap.from_yaml(text)


def test_broken_stage_ranges_are_refused():
    raw = plan(SMOL, TWO).to_dict()
    raw["stages"][1]["start"] = 16
    with pytest.raises(UserError, match="does not continue"):
        DeviceMap.from_dict(raw)


@pytest.mark.parametrize(("spec", "expected"), [
    ("16", "0:16"), ("0:16;1:14", "0:16;1:14"), ("1:4", "1:4"), ("0", "0"), ("0:30", "0:30"),
])
def test_to_device_layers(spec, expected):
    device_map = plan(SMOL, TWO, Wish(device_layers=parse_device_layers(spec)))
    assert device_map.to_device_layers() == expected
    again = plan(SMOL, TWO, Wish(device_layers=parse_device_layers(expected)))
    assert again.layer_devices() == device_map.layer_devices()


def test_to_device_layers_none_when_not_expressible():
    assert plan(SMOL, CPU8).to_device_layers() is None  # tensor parallel
    topo = Topology.from_yaml("0-8:\n  device: cuda[0]\n8-16:\n  device: cuda[1]\n16-30:\n  device: cuda[0]\n")
    assert plan(SMOL, TWO, Wish(topology=topo)).to_device_layers() is None  # cuda[0] twice


def test_to_topology_round_trips_placement_and_isq():
    for device_map in _plans()[1:3]:
        topo = Topology.from_yaml(device_map.to_topology())
        hardware = TWO if device_map.hardware == "2x24gb" else CPU8
        again = plan(SMOL, hardware, Wish(topology=topo))
        assert again.layer_devices() == device_map.layer_devices()
        assert [s.isq for s in again.stages] == [s.isq for s in device_map.stages]
    text = plan(SMOL, CPU8).to_topology()
    assert "tensor parallel over cpu[0], cpu[1], cpu[2]" in text
    Topology.from_yaml(text)


def test_json_layers():
    device_map = _plans()[2]
    out = device_map.to_json()
    assert len(out["layers"]) == SMOL.num_hidden_layers
    assert [entry["layer"] for entry in out["layers"]] == list(range(30))
    first = out["layers"][0]
    assert set(first) >= {"devices", "memory_kind", "dtype", "isq"}
    assert first["devices"] == ["cpu[1]"] and first["isq"] == "Q4K" and out["layers"][25]["isq"] is None
    assert out["layers"][15]["isq"] == "Q8_0"
    assert {"stages", "strategy", "reason", "memory"} <= set(out)


def test_segments_split_on_isq():
    stage = Stage(0, 6, ["cpu[0]"], [0], {"tp": 1}, isq=[None, None, "Q4K", "Q4K", None, "Q8_0"])
    assert [(s.start, s.end, s.isq) for s in stage.segments()] == [
        (0, 2, None), (2, 4, "Q4K"), (4, 5, None), (5, 6, "Q8_0")]


def test_render_table():
    table = plan(SMOL, CPU8).render_table()
    for fragment in ("0-14", "15-29", "cpu[0],cpu[1],cpu[2]", "tp=3", "device", "float32", "strategy: "
                     "pipeline_x_tensor", "idle: cpu[6], cpu[7]", "kv cache", "embeddings:"):
        assert fragment in table
    assert "layer devices" not in table


def test_every_mesh_preset_loads():
    presets = list_mesh_presets()
    assert {"cpu-8", "1x24gb", "24gb+16gb", "2x24gb", "4xa100-80gb", "8xh100", "tpu-v5e-8", "mac-m2-32gb"} <= set(
        presets)
    for name in presets:
        hardware = Hardware.from_preset(name)
        assert hardware.accelerators and plan(SMOL, hardware).stages
    assert len(Hardware.from_preset("cpu-8").accelerators) == 8
    assert Hardware.from_preset("mac-m2-32gb").unified_memory
    assert all(d.coords for d in Hardware.from_preset("tpu-v5e-8").accelerators)
    assert Hardware.from_preset(ROOT / "meshes" / "2x24gb.yaml").name == "2x24gb"


@pytest.mark.parametrize(("raw", "fragment"), [
    ({"devices": []}, "non-empty"),
    ({"devices": [{"platform": "gpu"}]}, "platform must be"),
    ({"devices": [{"platform": "cuda", "count": 0}]}, "positive"),
    ({"devices": [{"platform": "cuda", "count": 100_000_000}]}, "at most 65536"),
    ({"devices": [{"platform": "cuda", "memory_gib": -1}]}, "positive"),
    ({"devices": [{"platform": "cuda", "colour": 1}]}, "unknown"),
    ({"devices": [{"platform": "tpu", "count": 2, "coords": [[0, 0]]}]}, "one coordinate per device"),
    ([1], "mapping"),
])
def test_bad_mesh_presets(raw, fragment):
    with pytest.raises(UserError, match=fragment):
        Hardware.from_dict(raw)


def test_unknown_mesh_preset():
    with pytest.raises(UserError, match="unknown mesh preset 'nope'; known presets: .*cpu-8"):
        Hardware.from_preset("nope")


def test_live_hardware_is_the_8_virtual_cpus():
    hardware = Hardware.from_jax()
    assert [d.name for d in hardware.accelerators] == [f"cpu[{i}]" for i in range(8)]
    assert plan(SMOL, hardware).strategy == "pipeline_x_tensor"
