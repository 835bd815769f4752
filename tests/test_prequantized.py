"""A Hugging Face checkpoint shipped pre-quantized (``quantization_config`` in config.json: GPTQ, AWQ, FP8, ...) is
refused in one line naming the method, exit status 2, before any tensor is read; never loaded as if it were float."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import jaxmap
from jaxmap.cli.common import config_from_model_arg
from jaxmap.loading import safetensors_source
from jaxmap.loading.safetensors_source import check_not_prequantized, read_hf_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "tiny-llama"
TAIL = ("which jaxmap does not read; use the original float checkpoint (jaxmap can quantize it itself with --isq) "
        "or a GGUF")

CONFIGS = {
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}, "GPTQ"),
    "awq": ({"quant_method": "awq", "bits": 4, "version": "gemm", "zero_point": True}, "AWQ"),
    "fp8": ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}, "FP8"),
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
                     "bitsandbytes"),
    "compressed-tensors": ({"quant_method": "compressed-tensors", "format": "pack-quantized",
                            "config_groups": {"group_0": {"weights": {"num_bits": 4}}}}, "compressed-tensors"),
    "mxfp4": ({"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}, "MXFP4"),
}


def prequantized(tmp_path: Path, method: str) -> Path:
    folder = tmp_path / f"tiny-{method}"
    shutil.copytree(TINY, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = CONFIGS[method][0]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def expected(folder: Path, method: str) -> str:
    raw, name = CONFIGS[method]
    detail = f'quantization_config.quant_method = "{raw["quant_method"]}"'
    if "format" in raw:
        detail += f', format "{raw["format"]}"'
    return f"{folder} is pre-quantized with {name} ({detail}), {TAIL}"


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)


def assert_refused(out: subprocess.CompletedProcess, message: str) -> None:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [f"error: {message}"], out.stderr


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Any safetensors header or tensor read fails the test: the refusal comes from config.json alone."""
    def forbidden(*_args, **_kwargs):
        raise AssertionError("a safetensors file was read")

    monkeypatch.setattr(safetensors_source, "parse_header", forbidden)
    monkeypatch.setattr(safetensors_source.SafetensorsSource, "view", forbidden)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_config_check_names_the_method(method, tmp_path):
    raw = {"model_type": "llama", "quantization_config": CONFIGS[method][0]}
    with pytest.raises(jaxmap.UserError) as info:
        check_not_prequantized(raw, tmp_path)
    assert str(info.value) == expected(tmp_path, method)


def test_config_check_odd_shapes(tmp_path):
    for ok in ({}, {"quantization_config": None}, {"quantization_config": {}}, [], "text"):
        check_not_prequantized(ok, tmp_path)  # a float checkpoint, or nothing the check can judge
    with pytest.raises(jaxmap.UserError, match=r'with bitsandbytes \(quantization_config.quant_method = '
                                               r'"bitsandbytes"\)'):
        check_not_prequantized({"quantization_config": {"load_in_8bit": True}}, tmp_path)  # before quant_method
    with pytest.raises(jaxmap.UserError, match=r'with EXL2 \(quantization_config.quant_method = "EXL2"\)'):
        check_not_prequantized({"quantization_config": {"quant_method": "EXL2"}}, tmp_path)
    with pytest.raises(jaxmap.UserError, match=r'with my_new_method \(quantization_config.quant_method = '
                                               r'"my_new_method"\)'):
        check_not_prequantized({"quantization_config": {"quant_method": "my_new_method"}}, tmp_path)
    with pytest.raises(jaxmap.UserError, match=r"is pre-quantized \(its config.json has a quantization_config\), "
                                               r"which jaxmap does not read"):
        check_not_prequantized({"quantization_config": {"bits": 4}}, tmp_path)


@pytest.mark.parametrize("method", ["gptq", "fp8", "compressed-tensors"])
def test_load_refuses_before_reading_tensors(method, tmp_path, no_tensor_reads):
    folder = prequantized(tmp_path, method)
    with pytest.raises(jaxmap.UserError) as info:
        jaxmap.load(str(folder))
    assert str(info.value) == expected(folder, method)


def test_plan_facts_refuse_too(tmp_path, no_tensor_reads):
    folder = prequantized(tmp_path, "awq")
    with pytest.raises(jaxmap.UserError) as info:
        config_from_model_arg(str(folder))
    assert str(info.value) == expected(folder, "awq")


def test_float_checkpoint_still_reads(tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(TINY, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = None
    (folder / "config.json").write_text(json.dumps(config))
    assert read_hf_config(folder) == read_hf_config(TINY).with_changes(name="tiny")


@pytest.mark.parametrize("module, method, args", [
    ("jaxmap.generate", "gptq", ["-p", "hi"]),
    ("jaxmap.plan", "fp8", []),
    ("jaxmap.plan", "bitsandbytes", ["--mesh", "2x24gb"]),
    ("jaxmap.doctor", "mxfp4", ["--no-xla-check"]),
    ("jaxmap.convert", "awq", ["--out", "{tmp}/ckpt"]),
])
def test_commands_refuse_in_one_line(module, method, args, tmp_path, run_main, monkeypatch):
    """generate through ``python -m`` in a subprocess (the whole of its stderr is the one line); the others through
    the command's main in this process, from the repository root as ``cli`` (their ``python -m`` paths run in
    subprocesses in the other command tests)."""
    import importlib

    folder = prequantized(tmp_path, method)
    argv = ["-m", str(folder), *(a.format(tmp=tmp_path) for a in args)]
    if module == "jaxmap.generate":
        out = cli(module, *argv)
    else:
        monkeypatch.chdir(ROOT)
        out = run_main(importlib.import_module(module.replace("jaxmap.", "jaxmap.cli.", 1)).main, *argv)
    assert_refused(out, expected(folder, method))
    assert not (tmp_path / "ckpt").exists()
