"""The command lines as a user runs them: output, JSON, and one clear line with exit status 2 for bad input.

``cli`` runs ``python -m`` in a subprocess; ``main`` runs the command's main in this process (the ``run_main``
fixture), for the checks that need no fresh process: it skips a jax import per call. Standard input, the device
count a process starts with, and each command's ``python -m`` path stay in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "tiny-llama"


def cli(*args: str, stdin: str | None = None, module: str = "jaxmap.generate", timeout: int = 240):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          input=stdin, env=env, timeout=timeout)


@pytest.fixture
def main(run_main, monkeypatch):
    """``main(*args, module="jaxmap.generate")``: that command's main in this process, from the repository root."""
    import importlib

    monkeypatch.chdir(ROOT)
    def run(*args: str, module: str = "jaxmap.generate"):
        return run_main(importlib.import_module(module.replace("jaxmap.", "jaxmap.cli.", 1)).main, *args)

    return run


def assert_user_error(out, *fragments: str) -> None:
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_generate_json_batch():
    out = cli("-m", str(TINY), "--prompt", "hello there", "--prompt", "a", "--max-new-tokens", "5", "--json",
              "--ignore-eos", "-q")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["hello there", "a"]
    for r in rows:
        assert len(r["token_ids"]) == 5
        assert isinstance(r["text"], str)
        assert {"ttft_s", "decode_tokens_per_s", "compile_s"} <= set(r["stats"])


def test_generate_streams_text_and_stats_from_stdin():
    out = cli("-m", str(TINY), "--max-new-tokens", "6", "--ignore-eos", "--devices", "0", stdin="the history of")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "time to first token" in out.stderr and "decode:" in out.stderr
    assert "device map" in out.stderr  # the layout table at INFO


def test_generate_layout_flags_and_saved_plan(tmp_path, main):
    cli = main
    plan = tmp_path / "plan.yaml"
    a = cli("-m", str(TINY), "-p", "hi", "--max-new-tokens", "4", "--ignore-eos", "--json", "-q", "--pp", "2",
            "--save-plan", str(plan))
    b = cli("-m", str(TINY), "-p", "hi", "--max-new-tokens", "4", "--ignore-eos", "--json", "-q", "--plan", str(plan))
    c = cli("-m", str(TINY), "-p", "hi", "--max-new-tokens", "4", "--ignore-eos", "--json", "-q", "-n", "0:2;1:1")
    for out in (a, b, c):
        assert out.returncode == 0, out.stderr
    ids = [json.loads(o.stdout)["token_ids"] for o in (a, b, c)]
    assert ids[0] == ids[1] == ids[2]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["-m", "/no/such/model"], ["no such file"]),
        (["-m", str(ROOT / "tests")], ["config.json"]),
        (["-m", str(TINY), "--dtype", "float8"], ["unknown dtype"]),
        (["-m", str(TINY), "--max-seq-len", "4"], ["longer than --max-seq-len"]),
        (["-m", str(TINY), "-n", "0:x"], ["-n"]),
        (["-m", str(TINY), "-n", "0:2;0:1"], []),
        (["-m", str(TINY), "-n", "9:2"], []),
        (["-m", str(TINY), "-n", "99"], []),
        (["-m", str(TINY), "--tp", "3"], ["--tp 3"]),
        (["-m", str(TINY), "--temperature", "-1"], ["temperature"]),
        (["-m", "preset:nope"], ["unknown model preset"]),
    ],
)
def test_bad_input_one_line_exit_2(args, fragments, main):
    out = main(*args, "--prompt", "hello world, this is a prompt", "--max-new-tokens", "2")
    assert_user_error(out, *fragments)


def test_unsupported_architecture(tmp_path, main):
    cli = main
    folder = tmp_path / "gpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert_user_error(cli("-m", str(folder), "--prompt", "x"), "unsupported architecture", "llama")


def test_truncated_safetensors(tmp_path, main):
    cli = main
    folder = tmp_path / "broken"
    shutil.copytree(TINY, folder)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert_user_error(cli("-m", str(folder), "--prompt", "x"), "truncated")


def test_truncated_gguf(tmp_path, default_gguf, main):
    cli = main
    broken = tmp_path / "broken.gguf"
    with open(default_gguf, "rb") as src:
        broken.write_bytes(src.read(5_000_000))
    assert_user_error(cli("-m", str(broken), "--prompt", "x"))


def test_bad_topology(tmp_path, main):
    cli = main
    topo = tmp_path / "t.yml"
    topo.write_text("0-9:\n  device: cpu\n")
    assert_user_error(cli("-m", str(TINY), "--topology", str(topo), "--prompt", "x"))
    topo.write_text("0-2:\n  device: [oops\n")
    assert_user_error(cli("-m", str(TINY), "--topology", str(topo), "--prompt", "x"), "line")


def test_doctor_reports_devices():
    out = cli(module="jaxmap.doctor")
    assert out.returncode == 0, out.stderr
    assert "cpu[3]" in out.stdout and "pinned_host" in out.stdout
    report = json.loads(cli("--json", module="jaxmap.doctor").stdout)
    assert len(report["devices"]) == 4 and report["process_count"] == 1


def test_example_layouts_runs(default_gguf):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "examples/layouts.py"], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "4xa100" in out.stdout and "cpu[1]" in out.stdout and "Paris" in out.stdout


def raw_cli(*args: str, stdin: bytes, module: str = "jaxmap.generate"):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, cwd=ROOT, input=stdin, env=env,
                          timeout=240)


@pytest.mark.parametrize("args, stdin, fragment", [
    (["-m", str(TINY)], b"\xff\xfehi", "not valid UTF-8 text (byte 0xff"),
    (["-m", str(TINY)], b"", "standard input is empty"),
    (["-m", str(TINY), "-p", "a", "-p", ""], b"", "prompt 2 of 2 is empty"),
    (["-m", "preset:tiny", "-p", "hi"], b"", "presets have random weights and no tokenizer"),
    (["-m", str(TINY), "-p", "hi", "--max-new-tokens", "0"], b"", "--max-new-tokens must be at least 1"),
    (["-m", str(TINY), "-p", "hi", "--temperature", "nan"], b"", "finite number"),
    (["-m", str(TINY), "-p", "hi", "--seed", "99999999999999999999"], b"", "seed"),
])
def test_prompt_and_flag_errors_come_before_loading(args, stdin, fragment, main):
    """Errors knowable from the flags and the prompt are reported before any weight is read (no device map). A
    prompt from standard input is read in a subprocess; the others run in this process."""
    if "-p" in args:
        assert not stdin
        out = main(*args)
        err = out.stderr
    else:
        out = raw_cli(*args, stdin=stdin)
        err = out.stderr.decode()
    assert out.returncode == 2 and fragment in err and "Traceback" not in err, err
    assert "device map" not in err and "loading weights" not in err


def test_stdin_prompt_drops_one_trailing_newline(main):
    piped = raw_cli("-m", str(TINY), "--json", "-q", "--max-new-tokens", "2", "--ignore-eos", stdin=b"hello there\n")
    given = main("-m", str(TINY), "--json", "-q", "--max-new-tokens", "2", "--ignore-eos", "-p", "hello there")
    assert piped.returncode == 0 and given.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["prompt_ids"] == json.loads(given.stdout)["prompt_ids"]


def test_non_utf8_topology_and_missing_plan_model(tmp_path, main):
    cli = main
    topo = tmp_path / "t.yml"
    topo.write_bytes(b"\xff\xfe0-2:\n  device: cpu\n")
    assert_user_error(cli("-m", str(TINY), "--topology", str(topo), "-p", "x"), "not UTF-8")
    assert_user_error(cli("-m", "/no/such/model.gguf", module="jaxmap.plan"), "no such file or folder")
    assert_user_error(cli("-m", "./nope.gguf", "--no-xla-check", module="jaxmap.doctor"), "no such file or folder")


def test_plan_defaults_to_the_models_context(main):
    out = main("-m", str(TINY), module="jaxmap.plan")
    assert out.returncode == 0, out.stderr
    assert "max_seq_len 512" in out.stdout  # tiny-llama's context, as generate uses when it saves a plan


def test_run_max_seq_len_is_a_power_of_two_from_256_within_the_context():
    from jaxmap.cli.common import config_from_model_arg
    from jaxmap.planning.context import run_max_seq_len

    config = config_from_model_arg(str(TINY))  # context 512
    assert [run_max_seq_len(config, n) for n in (1, 21, 256, 257, 511, 600)] == [256, 256, 256, 512, 512, 512]
    assert run_max_seq_len(config.with_changes(max_position_embeddings=100), 21) == 100


def test_generate_sizes_the_kv_cache_to_its_run(tmp_path, main):
    """Without --max-seq-len, generate's cache holds its longest prompt plus --max-new-tokens (a power of two from
    256), not the model's whole context; the tokens are those of a run with the full cache; a saved plan keeps the
    model's default, and --max-seq-len is taken as given."""
    args = ("-m", str(TINY), "--max-new-tokens", "4", "--ignore-eos", "--json")
    short = main(*args, "-p", "hello")
    assert "KV cache: 256 slots per sequence" in short.stderr and "max_seq_len 256" in short.stderr, short.stderr
    full = main(*args, "-p", "hello", "--max-seq-len", "512")
    assert "sized for this run" not in full.stderr and "max_seq_len 512" in full.stderr
    assert json.loads(short.stdout)["token_ids"] == json.loads(full.stdout)["token_ids"]
    long = main(*args, "-p", "hello " * 260, "-p", "hi")
    assert "KV cache: 512 slots" in long.stderr and "max_seq_len 512" in long.stderr, long.stderr
    plan = tmp_path / "plan.yaml"
    saved = main(*args, "-p", "hello", "--save-plan", str(plan))
    assert saved.returncode == 0 and "sized for this run" not in saved.stderr
    assert "max_seq_len: 512" in plan.read_text()


def test_imatrix_output_folder_is_refused_before_the_run(tmp_path, main):
    out = main("-m", str(TINY), "-o", str(tmp_path), module="jaxmap.imatrix")
    assert_user_error(out, "it is a folder")
    assert "device map" not in out.stderr


def test_convert_out_mistakes_are_named_before_reading(tmp_path, main):
    cli = main
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_user_error(cli("-m", "preset:tiny", "--out", str(afile / "sub"), module="jaxmap.convert"),
                      "is a file, not a folder")
    assert_user_error(cli("-m", "preset:tiny", "--out", "", module="jaxmap.convert"), "--out is empty")


def test_doctor_model_flags_without_a_model_are_refused():
    out = cli("--no-xla-check", "--dtype", "bfloat16", "--max-memory", "0:1GiB", module="jaxmap.doctor")
    assert_user_error(out, "--dtype, --max-memory describe a model's fit: add --model")


@pytest.mark.parametrize("module", ["jaxmap.generate", "jaxmap.plan", "jaxmap.quality", "jaxmap.convert",
                                    "jaxmap.imatrix", "jaxmap.doctor", "jaxmap.bench"])
def test_malformed_flags_are_one_error_line(module):
    out = cli("--no-such-flag", module=module)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(("error: unrecognized arguments", "error: the following arguments are required"))
    assert len(out.stderr.strip().splitlines()) == 1 and "usage:" not in out.stderr


def test_verbose_reports_each_start_phase(main):
    """``-v`` says where a start's time went: import, open, plan, load, engine, then prefill, decode and jax's trace /
    lower / compile (the figures are not checked, only that every phase is named with seconds)."""
    out = main("-m", str(TINY), "--prompt", "hello", "--max-new-tokens", "3", "--ignore-eos", "-v")
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert any("import phase:" in line for line in lines), out.stderr
    load = next(line for line in lines if "load phases:" in line)
    gen = next(line for line in lines if "generate phases:" in line)
    for phase in ("open", "plan", "load", "engine"):
        assert f"{phase} " in load and " s" in load, load
    for phase in ("prefill", "decode", "programs", "trace", "lower", "compile"):
        assert f"{phase} " in gen, gen
    quiet = main("-m", str(TINY), "--prompt", "hello", "--max-new-tokens", "2", "--ignore-eos")
    assert "phases:" not in quiet.stderr  # only with -v


def test_api_model_keeps_its_phases():
    from jaxmap.api import load

    model = load(str(TINY), progress=False)
    assert {"open", "plan", "load", "engine"} <= set(model.phases.seconds)
    model.generate(["hello"], max_new_tokens=2, stop_at_eos=False)
    assert {"prefill", "decode", "trace", "compile"} <= set(model.phases.seconds)
    assert all(s >= 0 for s in model.phases.seconds.values())
