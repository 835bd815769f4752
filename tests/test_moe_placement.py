"""Routed experts as placement units (issue 17): the automatic fit moves experts off the accelerators before any
layer, the last layers' first; the plan shows and saves them; pure data on hardware presets (no arrays)."""

from __future__ import annotations

import json

import pytest

from jaxmap.cli.plan import main as plan_main
from jaxmap.cli.plan import render_svg
from jaxmap.config.hardware import Hardware
from jaxmap.families import preset_config
from jaxmap.planning.device_map import DeviceMap
from jaxmap.planning.experts import OFFLOAD_MIN_BATCH, phases
from jaxmap.planning.fit import moe_layers
from jaxmap.planning.planner import plan
from jaxmap.planning.wishes import make_wish

QWEN30 = preset_config("qwen3-30b-a3b")
MIXTRAL = preset_config("mixtral-8x7b")


@pytest.fixture(scope="module")
def mixtral_plan():
    return plan(MIXTRAL, Hardware.from_preset("2x24gb"), dtype="bf16")


def test_experts_leave_first_and_every_layer_stays_resident(mixtral_plan):
    m = mixtral_plan
    assert all(s.memory_kind == "device" for s in m.stages) and all(r.fits for r in m.memory)
    assert {d for s in m.stages for d in s.devices} == {"cuda[0]", "cuda[1]"}
    apart = sorted(e.layer for e in m.experts)
    n = MIXTRAL.num_hidden_layers
    assert apart and apart == list(range(n - len(apart), n))  # a suffix: the last layers' experts first
    assert len(apart) < len(moe_layers(MIXTRAL))  # only as many as needed
    # in host memory: computed on the CPU device for decode, streamed to the layer's device for prefill chunks
    assert {(e.memory_kind, e.decode, e.prefill) for e in m.experts} == {("cpu", "cpu", "stream")}
    assert all(e.devices == ["cpu[0]"] for e in m.experts)
    assert "routed experts leave the accelerators first" in m.reason and "attention and router on cuda[0]" in m.reason


def test_experts_are_shown_saved_and_loaded(mixtral_plan, tmp_path):
    m = mixtral_plan
    table = m.render_table()
    assert "experts: layers" in table and "in host memory" in table and "decode on cpu[0]" in table
    layers = m.to_json()["layers"]
    last = layers[-1]["experts"]
    assert last["memory_kind"] == "cpu" and last["bytes"] > 0 and layers[0]["experts"] is None
    again = DeviceMap.from_yaml(m.to_yaml(), MIXTRAL)
    assert again.experts == m.experts and again.render_table() == table
    svg = render_svg(m)
    assert svg.count("experts cpu on cpu[0]") == len(m.experts) and "routed experts apart" in svg


def test_host_memory_counts_the_experts(mixtral_plan):
    host = next(r for r in mixtral_plan.memory if r.kind == "host")
    assert host.weights_bytes == sum(e.bytes for e in mixtral_plan.experts)
    gpu = next(r for r in mixtral_plan.memory if r.device == "cuda[1]")
    # each step streams one layer's experts in while the previous computes: two layers' experts of buffers
    assert gpu.streaming_bytes == 2 * max(e.bytes for e in mixtral_plan.experts)


def test_experts_leave_before_layers_stream():
    """Qwen3-30B-A3B in bfloat16 (57 GiB of experts) on one 24 GB card: host memory takes the last layers'
    experts, as many as it holds, before any layer streams."""
    m = plan(QWEN30, Hardware.from_preset("1x24gb"), make_wish(), dtype="bf16")
    apart = sorted(e.layer for e in m.experts)
    assert apart == list(range(48 - len(apart), 48)) and len(apart) > 20 and all(r.fits for r in m.memory)
    host = next(r for r in m.memory if r.kind == "host")
    assert host.weights_bytes >= sum(e.bytes for e in m.experts)


def test_a_model_that_fits_keeps_its_experts():
    m = plan(preset_config("qwen3-235b-a22b"), Hardware.from_preset("8xh100"), dtype="bf16")
    assert m.experts == [] and m.strategy == "tensor_parallel"


def test_phase_choice_follows_llamacpp_batch_threshold():
    assert phases("cpu", 1, 2048) == ("cpu", "stream")
    assert phases("cpu", 1, OFFLOAD_MIN_BATCH - 1) == ("cpu", "cpu")
    assert phases("cpu", OFFLOAD_MIN_BATCH, 1) == ("stream", "stream")
    assert phases("disk", 1, 1) == ("stream", "stream")


def test_plan_json_lists_experts(capsys):
    assert plan_main(["-m", "mixtral-8x7b", "--mesh", "2x24gb", "--dtype", "bf16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["experts"] and any(layer["experts"] for layer in out["layers"])


# ---- llama.cpp's flags ---------------------------------------------------------------------------------------------

def test_cpu_moe_puts_every_layers_experts_on_the_cpu():
    m = plan(QWEN30, Hardware.from_preset("1x24gb"), make_wish(cpu_moe=True), dtype="bf16")
    assert [e.layer for e in m.experts] == moe_layers(QWEN30)
    assert {(e.memory_kind, e.source) for e in m.experts} == {("cpu", "--cpu-moe")}
    assert all(s.memory_kind == "device" for s in m.stages) and all(r.fits for r in m.memory)


def test_n_cpu_moe_takes_the_first_layers_and_ot_comes_first():
    m = plan(QWEN30, Hardware.from_preset("1x24gb"), make_wish(n_cpu_moe=40, override_tensor=[r"blk\.1\.=disk"]),
             dtype="bf16")
    by_layer = {e.layer: e for e in m.experts}
    assert sorted(by_layer) == list(range(40))
    assert by_layer[1].memory_kind == "disk" and by_layer[1].source == r"-ot blk\.1\.=disk"
    assert by_layer[0].memory_kind == "cpu" and by_layer[0].source == "--n-cpu-moe 40"


@pytest.mark.parametrize("ot", [
    r"blk\.(4[0-7])\.ffn_(up|down|gate)_exps=CPU",  # a GGUF recipe, reaching a Hugging Face model's experts
    r"layers\.(4[0-7])\.mlp\.experts\.\d+\.=cpu",  # the folder's own per-expert names
    r"layers\.(4[0-7])\.mlp\.experts=cpu",  # jaxmap's stacked names
])
def test_ot_regex_reaches_the_same_tensors_by_any_name(ot):
    m = plan(QWEN30, Hardware.from_preset("1x24gb"), make_wish(override_tensor=ot), dtype="bf16")
    assert [e.layer for e in m.experts] == list(range(40, 48)) and {e.memory_kind for e in m.experts} == {"cpu"}


def test_ot_comma_separated_first_match_wins_and_buffer_names():
    m = plan(MIXTRAL, Hardware.from_preset("2x24gb"), make_wish(override_tensor=r"blk\.31\.=CUDA0,exps=host"),
             dtype="bf16")
    by_layer = {e.layer: e for e in m.experts}
    assert by_layer[31].memory_kind == "device" and by_layer[31].devices == ["cuda[0]"]
    assert all(by_layer[i].memory_kind == "host" for i in range(31))


@pytest.mark.parametrize("flags, message", [
    (["-ot", "exps[=cpu"], "is not a regular expression"),
    (["-ot", "exps=gpu7"], "unknown place 'gpu7'"),
    (["-ot", "nothing_like_this=cpu"], "matches no tensor"),
    (["-ot", "attn_q=cpu"], "not a routed expert tensor"),
    (["-ot", "exps"], "is not REGEX=PLACE"),
    (["-ot", "exps=cuda[5]"], "names cuda[5]"),
    (["--n-cpu-moe", "49"], "has 48 layers"),
])
def test_bad_expert_flags_are_one_line(flags, message, capsys):
    assert plan_main(["-m", "qwen3-30b-a3b", "--mesh", "1x24gb", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cpu_moe_on_a_dense_model_is_refused(capsys):
    assert plan_main(["-m", "llama-3-8b", "--mesh", "1x24gb", "--cpu-moe"]) == 2
    assert "dense model" in capsys.readouterr().err


# ---- experts in host memory at run time (virtual CPU devices) -------------------------------------------------

@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_experts_in_host_memory_give_the_one_device_output(family, tmp_path):
    """-ot ...=host keeps the last MoE layer's expert stacks in host memory (arrays of the CPU device); each step
    moves the routed experts' slices (decode) or the stack (prefill) to the layer's device: logits and greedy tokens
    equal the all-on-device model's."""
    import numpy as np
    import yaml
    from test_moe import TINY_MIXTRAL, TINY_QWEN3_MOE

    import jaxmap

    raw = TINY_MIXTRAL if family == "mixtral" else TINY_QWEN3_MOE
    preset = tmp_path / "tiny-moe.yaml"
    preset.write_text(yaml.safe_dump(raw))
    config = preset_config(str(preset))
    ref = jaxmap.load(f"preset:{preset}", max_seq_len=64, dtype="float32", progress=False, devices="0")
    layer = moe_layers(config)[-1]
    m = plan(config, Hardware.from_jax(), make_wish(override_tensor=rf"blk\.{layer}\.ffn_.*_exps=host", devices=[0],
                                                    max_memory={"host": 1 << 30}), max_seq_len=64)
    assert [(e.layer, e.memory_kind) for e in m.experts] == [(layer, "host")]
    (tmp_path / "plan.yaml").write_text(m.to_yaml())
    model = jaxmap.load(f"preset:{preset}", progress=False, plan=str(tmp_path / "plan.yaml"))
    apart = {i: a for st in model.engine.stages for i, a in st.apart.items()}
    assert list(apart) == [layer] and apart[layer].kind == "host"
    assert {d.platform for w in apart[layer].stacks.values() for d in w.devices()} == {"cpu"}
    held = [p for st in model.engine.stages for j, p in enumerate(st.params["layers"]) if st.start + j == layer]
    assert held and not any(k.startswith("experts") for k in held[0])
    ids = [3, 17, 5, 60, 22, 9, 41, 8, 70, 11, 4, 33]  # prefill: the dense path; decode: the gather path
    np.testing.assert_allclose(model.forward_logits([ids])[0], ref.forward_logits([ids])[0], atol=1e-5)
    got = model.generate([ids], max_new_tokens=4, temperature=0.0)[0].token_ids
    assert got == ref.generate([ids], max_new_tokens=4, temperature=0.0)[0].token_ids


def test_topology_regex_entries_place_experts_last_match_wins():
    topology = {r"/blk\.(4[4-7])\.ffn_.*_exps/": {"device": "host"},
                r"/layers\.47\.mlp\.experts\.\d+\./": {"device": "disk"}}
    m = plan(QWEN30, Hardware.from_preset("1x24gb"), make_wish(topology=topology), dtype="bf16")
    assert [(e.layer, e.memory_kind) for e in m.experts] == [(44, "host"), (45, "host"), (46, "host"), (47, "disk")]
    assert m.experts[-1].source.startswith("topology /layers")
    # -ot comes before the topology
    m = plan(QWEN30, Hardware.from_preset("1x24gb"), make_wish(topology=topology, override_tensor=r"blk\.47\.=cpu"),
             dtype="bf16")
    assert m.experts[-1].memory_kind == "cpu"


def test_host_and_disk_are_places_for_regex_entries_only():
    from jaxmap.errors import UserError

    with pytest.raises(UserError, match="unknown device 'host'"):
        make_wish(topology={"0-4": {"device": "host"}})


@pytest.mark.parametrize("command", ["generate", "serve", "doctor"])
def test_expert_flags_reach_generate_serve_and_doctor(command, capsys):
    """The default SmolLM2 is dense: --cpu-moe is refused in one line before any weight is read."""
    import importlib

    main = importlib.import_module(f"jaxmap.cli.{command}").main
    flags = ["--model", "--cpu-moe"] if command == "doctor" else ["--cpu-moe"]
    assert main([*flags, *(["-p", "hi"] if command == "generate" else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert "--cpu-moe" in err and "dense model" in err and len(err.splitlines()) == 1


def test_load_runs_experts_in_host_memory_and_on_the_cpu(tmp_path):
    """The Python API takes the flags too: -ot exps=host and --cpu-moe (CPU compute) run."""
    import yaml
    from test_moe import TINY_MIXTRAL

    import jaxmap
    from jaxmap.errors import UserError

    preset = tmp_path / "tiny-moe.yaml"
    preset.write_text(yaml.safe_dump(TINY_MIXTRAL))
    kw = dict(max_seq_len=32, progress=False, devices="0", max_memory="host:1GiB")
    model = jaxmap.load(f"preset:{preset}", override_tensor="exps=host", **kw)
    assert {e.memory_kind for e in model.device_map.experts} == {"host"}
    assert len(model.generate([[1, 2, 3]], max_new_tokens=3, temperature=0.0)[0].token_ids) == 3
    model = jaxmap.load(f"preset:{preset}", cpu_moe=True, **kw)
    assert {e.memory_kind for e in model.device_map.experts} == {"cpu"}
    assert len(model.generate([[1, 2, 3]], max_new_tokens=3, temperature=0.0)[0].token_ids) == 3
    with pytest.raises(UserError, match="-ot would be ignored"):
        jaxmap.load(f"preset:{preset}", override_tensor="exps=host", plan=str(tmp_path / "none.yaml"))
