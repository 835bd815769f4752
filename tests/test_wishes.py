"""The user's wish: ``-n`` parsing and the topology YAML's reference semantics, one test per rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmap.config.hardware import Hardware
from jaxmap.errors import UserError
from jaxmap.families import preset_config
from jaxmap.planning.planner import plan
from jaxmap.planning.wishes import Topology, Wish, format_device_layers, parse_device_layers, parse_devices

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = (ROOT / "topologies" / "reference-isq.yml").read_text()


# ---- -n ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "expected"), [
    ("16", [(None, 16)]),
    (16, [(None, 16)]),
    ("0", [(None, 0)]),
    ("0:16;1:14", [(0, 16), (1, 14)]),
    (" 0 : 16 ; 1:14 ", [(0, 16), (1, 14)]),
    (["0:16", "1:14"], [(0, 16), (1, 14)]),
    (["16"], [(None, 16)]),
    ("1:16", [(1, 16)]),
])
def test_parse_device_layers(spec, expected):
    assert parse_device_layers(spec) == expected


@pytest.mark.parametrize(("spec", "fragment"), [
    ("0:x", "not a whole number"),
    ("x", "not a whole number"),
    ("0:16;;1:4", "empty part"),
    ("0:16;", "empty part"),
    ("", "empty"),
    ("-3", "negative"),
    ("0:-1", "negative"),
    ("-1:4", "negative"),
    ("0:16;0:4", "ordinal 0 is given twice"),
    ("16;1:4", "lacks an ordinal"),
    ("0:1.5", "not a whole number"),
])
def test_parse_device_layers_errors(spec, fragment):
    with pytest.raises(UserError, match=fragment) as info:
        parse_device_layers(spec)
    assert "\n" not in str(info.value)


def test_format_device_layers_round_trips():
    for spec in ("16", "0:16;1:14", "3:2"):
        assert format_device_layers(parse_device_layers(spec)) == spec


def test_parse_devices():
    assert parse_devices("0,2") == [0, 2]
    with pytest.raises(UserError, match="--devices"):
        parse_devices("0,a")


def test_wish_validation():
    with pytest.raises(UserError, match="--tp"):
        Wish(tp=0)
    with pytest.raises(UserError, match="twice"):
        Wish(devices=[0, 0])
    with pytest.raises(UserError, match="cannot be combined"):
        Wish(tp=2, device_layers=[(None, 4)])


# ---- topology: reference semantics -------------------------------------------------------------------------------

def test_reference_example_expands():
    topo = Topology.from_yaml(REFERENCE)
    assert [topo.layer_isq(i, None) for i in (0, 7, 8, 15, 16, 23, 28, 31)] == [
        "Q3K", "Q3K", "Q4K", "Q4K", "Q6K", "Q6K", "Q8_0", "Q8_0"]
    assert [topo.layer_device(i) for i in (0, 8, 16, 28)] == ["cuda[0]", "cpu", None, "cuda[0]"]
    assert topo.winner(24) is None and topo.winner(27) is None  # "# Skip 24-28"


def test_higher_end_wins():
    topo = Topology.from_yaml("0-4:\n  isq: Q4K\n2-6:\n  isq: Q6K\n")
    assert [topo.layer_isq(i, None) for i in range(6)] == ["Q4K", "Q4K", "Q6K", "Q6K", "Q6K", "Q6K"]


def test_higher_end_wins_even_when_written_first():
    topo = Topology.from_yaml("2-6:\n  isq: Q6K\n0-4:\n  isq: Q4K\n")
    assert [topo.layer_isq(i, None) for i in range(6)] == ["Q4K", "Q4K", "Q6K", "Q6K", "Q6K", "Q6K"]


def test_same_end_later_wins():
    topo = Topology.from_yaml("0-4:\n  isq: Q4K\n2-4:\n  isq: Q3K\n")
    assert [topo.layer_isq(i, None) for i in range(4)] == ["Q4K", "Q4K", "Q3K", "Q3K"]
    topo = Topology.from_yaml("2-4:\n  isq: Q3K\n0-4:\n  isq: Q4K\n")
    assert [topo.layer_isq(i, None) for i in range(4)] == ["Q4K"] * 4


def test_single_layer_key():
    topo = Topology.from_yaml("0-8:\n  isq: Q4K\n7:\n  isq: Q8_0\n")
    # 7 is 7-8: same end as 0-8 and written later, so it wins layer 7.
    assert topo.layer_isq(7, None) == "Q8_0" and topo.layer_isq(6, None) == "Q4K"
    topo = Topology.from_yaml("3:\n  device: cpu\n0-8:\n  isq: Q4K\n")
    # 3 ends at 4 < 8: the range wins layer 3 entirely.
    assert topo.layer_device(3) is None and topo.layer_isq(3, None) == "Q4K"


def test_winner_replaces_whole_entry():
    topo = Topology.from_yaml("0-8:\n  isq: Q4K\n  device: cpu\n4-10:\n  isq: Q8_0\n")
    assert topo.layer_device(5) is None and topo.layer_isq(5, None) == "Q8_0"
    assert topo.layer_device(3) == "cpu"


def test_isq_semantics():
    topo = Topology.from_yaml("0-4:\n  device: cpu\n4-6:\n  isq: Q6K\n")
    assert topo.layer_isq(0, "Q4K") is None  # covered, no isq: no ISQ even with --isq
    assert topo.layer_isq(4, "Q4K") == "Q6K"  # covered: the topology's isq overrides --isq
    assert topo.layer_isq(7, "Q4K") == "Q4K"  # uncovered: the global --isq
    assert topo.layer_isq(7, None) is None


def test_overrides_are_recorded():
    topo = Topology.from_yaml("0-8:\n  isq: Q4K\n4-12:\n  isq: Q6K\n")
    (over,) = topo.overrides()
    assert over.layers == (4, 5, 6, 7) and over.winner.key == "4-12" and over.loser.key == "0-8"
    assert "'4-12' (line 3)" in over.message() and "ends later" in over.message()
    (same,) = Topology.from_yaml("0-4:\n  isq: Q4K\n2-4:\n  isq: Q6K\n").overrides()
    assert "written later" in same.message()


def test_regex_keys():
    topo = Topology.from_yaml("'/model\\.embed_tokens/':\n  device: cpu\n/lm_head/:\n  device: cuda[1]\n"
                              "/head/:\n  isq: Q8_0\n")
    assert topo.match_for_name("model.embed_tokens.weight").device == "cpu"
    assert topo.match_for_name("lm_head.weight").isq == "Q8_0"  # the last matching entry wins
    assert topo.match_for_name("model.norm.weight") is None
    assert topo.ranges == []


def test_dict_and_path_inputs(tmp_path):
    topo = Topology.from_yaml({"0-2": {"device": "cpu"}, 3: {"isq": "Q4K"}})
    assert topo.layer_device(1) == "cpu" and topo.layer_isq(3, None) == "Q4K"
    path = tmp_path / "t.yml"
    path.write_text("0-2:\n  device: cpu[1]\n")
    assert Topology.from_yaml(path).layer_device(0) == "cpu[1]"
    assert Topology.from_yaml(str(path)).layer_device(1) == "cpu[1]"
    assert Topology.from_yaml("").entries == ()
    assert Topology.from_yaml("0-2:\n").winner(0) is not None


@pytest.mark.parametrize(("text", "fragment"), [
    ("0-8:\n  isq: Q4K\n8-4:\n  isq: Q4K\n", "'8-4' (line 3) must have start < end"),
    ("4-4:\n  isq: Q4K\n", "start < end"),
    ("0-8:\n  isq: Q4K\n  dev: cpu\n", "'0-8' (line 1) has unknown key 'dev'"),
    ("0-8:\n  device: gpu[0]\n", "unknown device 'gpu[0]'"),
    ("0-8:\n  device: cuda\n", "unknown device 'cuda'"),
    ("0-8:\n  isq: Q4K\n bad: [\n", "not valid YAML at line"),
    ("- 0-8\n- 8-16\n", "must be a mapping"),
    ("just text", "must be a mapping"),
    ("abc:\n  isq: Q4K\n", "'abc' (line 1) is not START-END"),
    ("0-8: cpu\n", "line 1 must be a mapping"),
    ("0-8:\n  isq: [a, b]\n", "line 2 must be a single value"),
    ("'/(unclosed/':\n  device: cpu\n", "invalid regex"),
    ("'/mlp/':\n  isq: Q9X\n", "entry '/mlp/' (line 1) has unknown isq type 'Q9X'"),
    ("0-8:\n  isq: q3\n", "'0-8' (line 1) has unknown isq type 'q3'"),
    ("0-8:\n  isq: Q4K\n0-8:\n  isq: Q6K\n", "appears twice"),
])
def test_topology_errors(text, fragment):
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as info:
        Topology.from_yaml(text)
    assert "\n" not in str(info.value)


def test_topology_past_last_layer():
    topo = Topology.from_yaml("0-8:\n  isq: Q4K\n28-40:\n  isq: Q4K\n")
    with pytest.raises(UserError, match=r"'28-40' \(line 3\) reaches layer 39 but the model's last layer is 29"):
        topo.check_layers(30)
    topo.check_layers(40)


def test_unreadable_topology_file():
    with pytest.raises(UserError, match="cannot read topology"):
        Topology.from_yaml("no/such/file.yml")


def test_every_shipped_topology_loads():
    files = sorted((ROOT / "topologies").glob("*.yml")) + sorted((ROOT / "topologies").glob("*.yaml"))
    assert len(files) >= 3
    for path in files:
        topo = Topology.from_yaml(path)
        assert topo.entries, path
        assert any(e.pattern for f in files for e in Topology.from_yaml(f).entries)


# ---- properties ------------------------------------------------------------------------------------------------

SMOL = preset_config("smollm2-135m")
CPU8 = Hardware.from_preset("cpu-8")
LAYERS = SMOL.num_hidden_layers
DEVICES = [None, "cpu", *(f"cpu[{i}]" for i in range(8))]


@st.composite
def topologies(draw: st.DrawFn) -> dict:
    out = {}
    for _ in range(draw(st.integers(0, 6))):
        start = draw(st.integers(0, LAYERS - 1))
        end = draw(st.integers(start + 1, LAYERS))
        key = str(start) if end == start + 1 and draw(st.booleans()) else f"{start}-{end}"
        entry = {}
        device = draw(st.sampled_from(DEVICES))
        if device:
            entry["device"] = device
        if draw(st.booleans()):
            entry["isq"] = draw(st.sampled_from(["Q4K", "Q8_0"]))
        out[key] = entry
    return out


@st.composite
def device_layers(draw: st.DrawFn) -> str:
    ordinals = draw(st.lists(st.integers(0, 7), unique=True, max_size=4))
    counts, left = [], LAYERS
    for _ in ordinals:
        counts.append(draw(st.integers(0, left)))
        left -= counts[-1]
    if not ordinals:
        return str(draw(st.integers(0, LAYERS)))
    return ";".join(f"{o}:{n}" for o, n in zip(ordinals, counts, strict=True))


def _check_layers_placed_once(device_map) -> None:
    covered = [layer for s in device_map.stages for layer in range(s.start, s.end)]
    assert covered == list(range(LAYERS))
    for a, b in zip(device_map.stages, device_map.stages[1:], strict=False):
        assert a.end == b.start and a.devices != b.devices
    for s in device_map.stages:
        assert len(s.isq) == s.end - s.start and s.mesh == {"tp": len(s.devices)}


@settings(max_examples=60, deadline=None)
@given(topologies(), st.one_of(st.none(), device_layers()), st.sampled_from([None, "Q4K"]))
def test_every_layer_placed_exactly_once(topo_raw, spec, isq):
    topo = Topology.from_yaml(topo_raw)
    wish = Wish(device_layers=parse_device_layers(spec) if spec else None, topology=topo, isq=isq)
    device_map = plan(SMOL, CPU8, wish)
    _check_layers_placed_once(device_map)
    devices = device_map.layer_devices()
    for layer in range(LAYERS):
        win = topo.winner(layer)
        if win is not None and win.device is not None:
            expected = "cpu[0]" if win.device == "cpu" else win.device
            assert devices[layer] == [expected]
        assert device_map.stage_of(layer).isq[layer - device_map.stage_of(layer).start] == topo.layer_isq(layer, isq)


@settings(max_examples=60, deadline=None)
@given(device_layers())
def test_device_layers_property(spec):
    pairs = parse_device_layers(spec)
    device_map = plan(SMOL, CPU8, Wish(device_layers=pairs))
    _check_layers_placed_once(device_map)
    devices = device_map.layer_devices()
    layer = 0
    for ordinal, count in pairs:
        assert all(d == [f"cpu[{ordinal or 0}]"] for d in devices[layer:layer + count])
        layer += count
    assert all(d == ["cpu[0]"] for d in devices[layer:])
