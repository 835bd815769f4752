"""The planner's rules on hardware presets and synthetic device lists (pure data: no arrays)."""

from __future__ import annotations

import pytest

from jaxmap.config import ModelConfig
from jaxmap.config.hardware import Device, Hardware
from jaxmap.errors import UserError
from jaxmap.families import param_count, preset_config
from jaxmap.planning.planner import group_devices, plan, split_layers, valid_tp_sizes, wire_order
from jaxmap.planning.rules import RULES, ShardingError, logical_to_spec
from jaxmap.planning.wishes import Topology, Wish, parse_device_layers

SMOL = preset_config("smollm2-135m")


def cfg(heads: int, kv: int, layers: int = 12, inter: int = 1152, vocab: int = 1536, tied: bool = False):
    return ModelConfig(architecture="llama", vocab_size=vocab, hidden_size=heads * 16, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=16,
                       tie_word_embeddings=tied, name=f"h{heads}kv{kv}")


def cpus(n: int) -> Hardware:
    return Hardware(tuple(Device("cpu", i, i) for i in range(n)), 16 << 30, name=f"cpu-{n}")


def gpus(n: int, gib: int = 24) -> Hardware:
    devs = [Device("cuda", i, i, memory_bytes=gib << 30) for i in range(n)] + [Device("cpu", 0, 0)]
    return Hardware(tuple(devs), 64 << 30, name=f"{n}xgpu")


# ---- automatic ---------------------------------------------------------------------------------------------------

def test_one_device_takes_everything():
    m = plan(SMOL, Hardware.from_preset("1x24gb"))
    assert m.strategy == "single" and [(s.start, s.end, s.devices) for s in m.stages] == [(0, 30, ["cuda[0]"])]
    assert m.embed.devices == m.lm_head.devices == ["cuda[0]"]
    assert plan(SMOL, cpus(1)).strategy == "single"
    assert plan(SMOL, Hardware.from_preset("mac-m2-32gb")).stages[0].devices == ["metal[0]"]


def test_12_heads_4_kv_on_4_is_tensor_parallel():
    m = plan(cfg(12, 4), cpus(4))
    assert m.strategy == "tensor_parallel" and len(m.stages) == 1 and m.stages[0].mesh == {"tp": 4}
    assert m.embed.vocab_parallel and m.lm_head.vocab_parallel and not m.idle_devices


def test_9_heads_3_kv_on_4_is_tp3_with_one_idle():
    m = plan(cfg(9, 3, inter=1152), cpus(4))
    assert m.strategy == "tensor_parallel" and m.stages[0].mesh == {"tp": 3}
    assert m.idle_devices == ["cpu[3]"] and "cpu[3]" in m.reason and "9 attention heads" in m.reason


def test_9_heads_explicit_pipeline():
    m = plan(cfg(9, 3, inter=1152), cpus(4), Wish(pp=4))
    assert m.strategy == "pipeline" and [s.end - s.start for s in m.stages] == [3, 3, 3, 3]
    m = plan(cfg(9, 3, inter=1152), cpus(4), Wish(tp=1, pp=2))
    assert len(m.stages) == 2 and len(m.idle_devices) == 2 and "as asked" in m.reason


def test_3_heads_1_kv_on_2_is_pipeline():
    m = plan(cfg(3, 1, inter=1152), cpus(2))
    assert m.strategy == "pipeline" and [s.devices for s in m.stages] == [["cpu[0]"], ["cpu[1]"]]
    assert m.reason.startswith("tensor parallel unavailable: 3 attention heads do not divide over 2 devices")


@pytest.mark.parametrize(("n", "strategy", "shape", "idle"), [
    (8, "pipeline_x_tensor", (2, 3), 2),
    (2, "pipeline", (2, 1), 0),
    (3, "tensor_parallel", (1, 3), 0),
    (1, "single", (1, 1), 0),
])
def test_smollm2_reference_cases(n, strategy, shape, idle):
    m = plan(SMOL, cpus(n))
    assert m.strategy == strategy
    assert (len(m.stages), m.stages[0].mesh["tp"]) == shape
    assert len(m.idle_devices) == idle
    assert [s.end - s.start for s in m.stages] == [30 // shape[0]] * shape[0]


def test_smollm2_on_cpu8_preset_groups_and_reason():
    m = plan(SMOL, Hardware.from_preset("cpu-8"))
    assert [s.devices for s in m.stages] == [["cpu[0]", "cpu[1]", "cpu[2]"], ["cpu[3]", "cpu[4]", "cpu[5]"]]
    assert [s.device_ids for s in m.stages] == [[0, 1, 2], [3, 4, 5]]
    assert m.idle_devices == ["cpu[6]", "cpu[7]"]
    assert "cpu[6], cpu[7]" in m.reason and "pipeline over 2 stages" in m.reason


def test_valid_tp_sizes_include_intermediate():
    assert valid_tp_sizes(SMOL) == [1, 3]  # 9 would split 9 heads but not 1536
    assert valid_tp_sizes(cfg(12, 4)) == [1, 2, 4, 12]  # 3 and 6 neither divide 4 kv heads nor are multiples
    assert valid_tp_sizes(cfg(8, 2, inter=256)) == [1, 2, 4, 8]


def test_explicit_tp_that_does_not_fit():
    with pytest.raises(UserError, match=r"--tp 5 does not fit smollm2-135m: .*allow tp in \{1, 3\}"):
        plan(SMOL, cpus(8), Wish(tp=5))


def test_tp_times_pp_more_than_devices():
    with pytest.raises(UserError, match="needs 6 devices; 4 available"):
        plan(SMOL, cpus(4), Wish(tp=3, pp=2))
    with pytest.raises(UserError, match="--pp 9 needs 9 devices"):
        plan(SMOL, cpus(8), Wish(pp=9))
    with pytest.raises(UserError, match="more stages than"):
        plan(cfg(8, 2, layers=2, inter=256), cpus(4), Wish(tp=1, pp=3))


def test_tp_alone_fills_the_rest_with_pipeline():
    m = plan(cfg(8, 2, inter=256), cpus(8), Wish(tp=4))
    assert [s.mesh["tp"] for s in m.stages] == [4, 4] and m.strategy == "pipeline_x_tensor"


def test_devices_choose_ordinals():
    m = plan(cfg(8, 2, inter=256), gpus(4), Wish(devices=[0, 2]))
    assert m.stages[0].devices == ["cuda[0]", "cuda[2]"] and m.strategy == "tensor_parallel"
    with pytest.raises(UserError, match="cuda\\[7\\]"):
        plan(SMOL, gpus(2), Wish(devices=[7]))


def test_pipeline_splits_are_equal_earlier_first():
    assert split_layers(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    m = plan(SMOL, cpus(4), Wish(tp=1))
    assert [(s.start, s.end) for s in m.stages] == [(0, 8), (8, 16), (16, 23), (23, 30)]


def test_kv_heads_replicated_when_tp_is_a_multiple():
    m = plan(cfg(8, 2, inter=256), cpus(4))
    assert m.stages[0].mesh == {"tp": 4} and "2 kv heads replicated" in m.reason
    single = plan(cfg(8, 2, inter=256), cpus(1))
    # each device holds every kv head: the per-device cache equals the single device's cache
    assert m.memory[0].kv_cache_bytes == single.memory[0].kv_cache_bytes


def test_vocab_that_does_not_divide_is_replicated():
    m = plan(cfg(12, 4, vocab=1537), cpus(4))
    assert m.strategy == "tensor_parallel" and not m.embed.vocab_parallel and not m.lm_head.vocab_parallel
    assert any("vocab size 1537" in w for w in m.warnings)


# ---- -n ----------------------------------------------------------------------------------------------------------

def test_n_count_uses_ordinal_0_and_rest_on_cpu():
    m = plan(SMOL, Hardware.from_preset("2x24gb"), Wish(device_layers=parse_device_layers("16")))
    assert [(s.start, s.end, s.devices) for s in m.stages] == [(0, 16, ["cuda[0]"]), (16, 30, ["cpu[0]"])]
    assert m.strategy == "manual" and "remaining 14 layers on the CPU" in m.reason and "cuda[1]" in m.idle_devices


def test_n_ordinals():
    m = plan(SMOL, Hardware.from_preset("2x24gb"), Wish(device_layers=parse_device_layers("0:16;1:14")))
    assert [(s.start, s.end, s.devices) for s in m.stages] == [(0, 16, ["cuda[0]"]), (16, 30, ["cuda[1]"])]


def test_lone_ordinal_1_really_uses_ordinal_1():
    m = plan(SMOL, Hardware.from_preset("2x24gb"), Wish(device_layers=parse_device_layers("1:16")))
    assert m.stages[0].devices == ["cuda[1]"] and m.stages[1].devices == ["cpu[0]"]


def test_n_0_puts_everything_on_the_cpu():
    m = plan(SMOL, Hardware.from_preset("2x24gb"), Wish(device_layers=parse_device_layers("0")))
    assert m.strategy == "cpu" and [s.devices for s in m.stages] == [["cpu[0]"]]
    assert m.embed.devices == m.lm_head.devices == ["cpu[0]"]


def test_n_on_cpu_only_hardware_remainder_on_cpu0():
    m = plan(SMOL, Hardware.from_preset("cpu-8"), Wish(device_layers=parse_device_layers("1:10;2:10")))
    assert [s.devices for s in m.stages] == [["cpu[1]"], ["cpu[2]"], ["cpu[0]"]]
    assert plan(SMOL, cpus(8), Wish(device_layers=[(None, 0)])).stages[0].devices == ["cpu[0]"]


def test_n_errors():
    with pytest.raises(UserError, match="places 31 layers but smollm2-135m has 30"):
        plan(SMOL, Hardware.from_preset("2x24gb"), Wish(device_layers=parse_device_layers("0:16;1:15")))
    with pytest.raises(UserError, match=r"cuda\[3\], but the hardware preset 2x24gb has only cuda\[0\], cuda\[1\]"):
        plan(SMOL, Hardware.from_preset("2x24gb"), Wish(device_layers=parse_device_layers("3:4")))


# ---- topology ----------------------------------------------------------------------------------------------------

def test_non_contiguous_topology_makes_three_stages():
    topo = Topology.from_yaml("0-8:\n  device: cuda[0]\n8-16:\n  device: cuda[1]\n16-24:\n  device: cuda[0]\n")
    m = plan(cfg(8, 2, layers=24, inter=256), gpus(2), Wish(topology=topo))
    assert [(s.start, s.end, s.devices) for s in m.stages] == [
        (0, 8, ["cuda[0]"]), (8, 16, ["cuda[1]"]), (16, 24, ["cuda[0]"])]
    assert m.strategy == "manual" and m.from_topology
    table = m.render_table()
    assert "layer 23: cuda[0]" in table and "layer 8: cuda[1]" in table


def test_topology_overrides_n_and_uncovered_layers_keep_it():
    topo = Topology.from_yaml("20-25:\n  device: cuda[0]\n  isq: Q4K\n")
    wish = Wish(device_layers=parse_device_layers("0:10;1:5"), topology=topo, isq="Q8_0")
    m = plan(SMOL, Hardware.from_preset("2x24gb"), wish)
    devices = m.layer_devices()
    assert devices[9] == ["cuda[0]"] and devices[12] == ["cuda[1]"] and devices[17] == ["cpu[0]"]
    assert devices[20:25] == [["cuda[0]"]] * 5 and devices[25] == ["cpu[0]"]
    isq = [s.isq[i - s.start] for s in m.stages for i in range(s.start, s.end)]
    assert isq[20:25] == ["Q4K"] * 5 and isq[0] == "Q8_0" and isq[29] == "Q8_0"


def test_topology_without_device_keeps_automatic_placement():
    topo = Topology.from_yaml("0-10:\n  isq: Q4K\n")
    m = plan(SMOL, cpus(8), Wish(topology=topo))
    assert m.strategy == "pipeline_x_tensor" and len(m.stages) == 2
    assert [seg.isq for seg in m.stages[0].segments()] == ["Q4K", None]


def test_topology_errors_against_model_and_hardware():
    with pytest.raises(UserError, match="last layer is 29"):
        plan(SMOL, cpus(2), Wish(topology=Topology.from_yaml("25-31:\n  device: cpu[1]\n")))
    with pytest.raises(UserError, match=r"names cuda\[0\], but the hardware preset cpu-2 has only"):
        plan(SMOL, cpus(2), Wish(topology=Topology.from_yaml("0-4:\n  device: cuda[0]\n")))


def test_topology_override_warnings_name_the_winner():
    topo = Topology.from_yaml("0-8:\n  device: cpu[1]\n4-12:\n  device: cpu[2]\n")
    m = plan(SMOL, cpus(4), Wish(topology=topo))
    assert any("'4-12' (line 3)" in w and "'0-8'" in w for w in m.warnings)


def test_regex_topology_moves_embeddings():
    topo = Topology.from_yaml("'/model\\.embed_tokens/':\n  device: cpu\n/lm_head/:\n  device: cpu\n")
    m = plan(cfg(8, 2, inter=256), gpus(1), Wish(topology=topo))
    assert m.embed.devices == ["cpu[0]"] and m.embed.stage is None and m.lm_head.devices == ["cpu[0]"]
    assert m.final_norm.devices == ["cuda[0]"]
    assert any(mem.device == "cpu[0]" and mem.weights_bytes > 0 for mem in m.memory)


def test_cpu_layers_run_float32_on_accelerator_hardware():
    m = plan(SMOL, Hardware.from_preset("2x24gb"), Wish(device_layers=parse_device_layers("16")), dtype="bf16")
    assert [s.dtype for s in m.stages] == ["bfloat16", "float32"]
    assert any("float32" in w for w in m.warnings)


# ---- memory ------------------------------------------------------------------------------------------------------

def test_memory_single_device_counts_every_weight():
    for config in (SMOL, cfg(8, 2, inter=256)):
        m = plan(config, gpus(1), dtype="bfloat16", max_seq_len=128, max_batch_size=2)
        (mem,) = m.memory
        assert mem.weights_bytes == param_count(config) * 2
        layers, kv, head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        assert mem.kv_cache_bytes == 2 * layers * 2 * 128 * kv * head_dim * 2


def test_memory_tensor_parallel_splits_weights():
    config = cfg(8, 4, inter=256)
    one = plan(config, cpus(1)).memory[0]
    four = plan(config, cpus(4)).memory
    assert len(four) == 4 and four[0].kv_cache_bytes * 4 == one.kv_cache_bytes
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size * 4  # replicated norm weights
    assert (four[0].weights_bytes - norms) * 4 == one.weights_bytes - norms


def test_memory_overflow_of_a_hand_made_layout_is_a_warning():
    m = plan(preset_config("llama-3-70b"), Hardware.from_preset("1x24gb"), Wish(device_layers=[(0, 80)]),
             dtype="bf16")
    assert any("cuda[0] needs" in w and "short by" in w for w in m.warnings)


def test_plans_are_deterministic():
    wish = Wish(topology=Topology.from_yaml("0-4:\n  device: cpu[5]\n  isq: Q4K\n"))
    assert plan(SMOL, cpus(8), wish).to_dict() == plan(SMOL, cpus(8), wish).to_dict()


# ---- meshes follow the wires -----------------------------------------------------------------------------------

def test_tp_groups_stay_inside_a_process():
    devs = [Device("cuda", i, i, process_index=i % 2) for i in range(8)]
    groups, idle, notes = group_devices(devs, 2, 4)
    assert [{d.process_index for d in g} for g in groups] == [{0}, {1}] and not idle and not notes
    groups, idle, notes = group_devices(devs[:6], 2, 3)
    assert all(len({d.process_index for d in g}) == 1 for g in groups)


def test_tp_group_spanning_processes_is_noted():
    devs = [Device("cuda", i, i, process_index=i % 3) for i in range(6)]
    groups, idle, notes = group_devices(devs, 1, 4)
    assert len(groups) == 1 and notes and len(idle) == 2


def test_tpu_groups_are_coordinate_neighbours():
    tpus = Hardware.from_preset("tpu-v5e-8").accelerators
    for tp in (2, 3, 4):
        groups, _, _ = group_devices(tpus, 8 // tp, tp)
        for g in groups:
            for a, b in zip(g, g[1:], strict=False):
                assert sum(abs(x - y) for x, y in zip(a.coords, b.coords, strict=True)) == 1, (tp, g)
    order = wire_order(tpus)
    assert [d.coords for d in order[:4]] == [(0, 0), (1, 0), (1, 1), (0, 1)]


# ---- the rules table ---------------------------------------------------------------------------------------------

def test_logical_to_spec():
    units = {"heads": 8, "kv_heads": 2}
    assert logical_to_spec(("embed", "heads"), RULES, (128, 128), {"tp": 4}, units=units) == (None, "tp")
    assert logical_to_spec(("mlp", "embed"), RULES, (256, 128), {"tp": 4}) == ("tp", None)
    assert logical_to_spec(("vocab", "embed"), RULES, (512, 128), {"tp": 4}) == ("tp", None)
    notes: list[str] = []
    assert logical_to_spec(("embed", "kv_heads"), RULES, (128, 32), {"tp": 4}, name="wk", units=units,
                           notes=notes) == (None, None)
    assert notes and "wk" in notes[0]
    assert logical_to_spec(("vocab", "embed"), RULES, (513, 128), {"tp": 4}, notes=notes) == (None, None)


@pytest.mark.parametrize(("axes", "rules", "mesh", "fragment"), [
    (("embed", "nope"), RULES, {"tp": 2}, "no sharding rule"),
    (("embed", "heads"), {**RULES, "heads": "pp"}, {"tp": 2}, "mesh axis the mesh lacks"),
    (("heads", "mlp"), RULES, {"tp": 2}, "used twice"),
    (("embed", "heads"), RULES, {"tp": 3}, "does not divide"),
])
def test_logical_to_spec_errors(axes, rules, mesh, fragment):
    with pytest.raises(ShardingError, match=fragment) as info:
        logical_to_spec(axes, rules, (128, 128), mesh, name="model.layers.0.wq", units={"heads": 8})
    assert "model.layers.0.wq" in str(info.value)


def test_regex_device_over_layer_weights_is_a_warning():
    topo = Topology.from_yaml("/mlp/:\n  device: cpu\n")
    m = plan(SMOL, cpus(2), Wish(topology=topo))
    assert any("/mlp/" in w and "ranges" in w for w in m.warnings) and len(m.stages) == 2


def test_host_device_is_implied_when_a_preset_lists_no_cpu():
    hardware = Hardware.from_dict({"devices": [{"platform": "cuda", "count": 1, "memory_gib": 8}]}, "one-gpu")
    m = plan(SMOL, hardware, Wish(device_layers=parse_device_layers("10")))
    assert m.stages[1].devices == ["cpu[0]"] and [mem.device for mem in m.memory] == ["cuda[0]", "cpu[0]"]


# ---- input embeddings in host memory -------------------------------------------------------------------------------

def _resident_layers(m) -> int:
    return sum(s.end - s.start for s in m.stages if s.memory_kind == "device")


def test_embeddings_move_to_host_when_layers_would_stream():
    """Llama 3 8B in float32 on one 24 GB GPU streams layers: its untied 2 GB embedding table goes to host memory
    (only looked-up rows move), which leaves room for more resident layers than the table kept on the GPU."""
    from jaxmap.planning.device_map import DeviceMap

    config, hw = preset_config("llama-3-8b"), Hardware.from_preset("1x24gb")
    m = plan(config, hw, dtype="float32", max_seq_len=8192)
    assert m.embed.devices == ["cpu[0]"] and m.embed.stage is None and "looked-up rows" in m.embed.note
    assert m.lm_head.devices == ["cuda[0]"] and m.lm_head.note == ""
    table = config.vocab_size * config.hidden_size * 4
    assert next(r for r in m.memory if r.device == "cpu[0]").weights_bytes == table
    assert any("embeddings (1.96 GiB) in host memory (cpu[0])" in n for n in m.memory_notes)
    assert "embeddings: cpu[0] (off-stage; in host memory" in m.render_table()
    kept = plan(config, hw, Wish(topology=Topology.from_yaml("/embed_tokens/:\n  device: cuda[0]\n")),
                dtype="float32", max_seq_len=8192)
    assert kept.embed.devices == ["cuda[0]"] and _resident_layers(kept) < _resident_layers(m)
    again = DeviceMap.from_yaml(m.to_yaml(), config)
    assert again.embed == m.embed


def test_embeddings_stay_on_the_device_when_everything_fits():
    m = plan(preset_config("gemma-3-4b"), Hardware.from_preset("1x24gb"), dtype="float32", max_seq_len=32768)
    assert m.embed.devices == ["cuda[0]"] and m.embed.stage == 0 and not m.embed.note


def test_tied_table_on_one_device_stays_there():
    """Gemma 3 27B on one GPU: the tied head needs the table on that device anyway, so moving it frees nothing."""
    m = plan(preset_config("gemma-3-27b"), Hardware.from_preset("1x24gb"), dtype="float32", max_seq_len=8192)
    assert m.strategy == "offload" and m.embed.devices == ["cuda[0]"]


def test_tied_head_gets_its_own_counted_copy():
    """On two GPUs the table leaves cuda[0] for host memory; the tied head's copy on cuda[1] is counted there."""
    config = preset_config("gemma-3-27b")
    m = plan(config, Hardware.from_preset("2x24gb"), dtype="float32", max_seq_len=8192)
    assert m.embed.devices == ["cpu[0]"] and m.lm_head.devices == ["cuda[1]"]
    assert m.lm_head.note == "its own copy of the tied embedding table"
    assert "lm head: cuda[1] (stage 3; its own copy of the tied embedding table)" in m.render_table()
    table = config.vocab_size * config.hidden_size * 4
    assert next(r for r in m.memory if r.device == "cpu[0]").weights_bytes == table
    assert next(r for r in m.memory if r.device == "cuda[1]").weights_bytes >= table


def test_unified_memory_keeps_embeddings_with_the_layers():
    m = plan(preset_config("llama-3-8b"), Hardware.from_preset("mac-m2-32gb"), dtype="float32", max_seq_len=8192)
    assert m.embed.stage == 0 and m.embed.devices == m.stages[0].devices
