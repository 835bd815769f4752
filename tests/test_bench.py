"""The benchmark's command line runs end to end on a tiny model: every figure it prints is there (no timings are
checked; the benchmark measures, tests check behaviour). Bad input is one ``error:`` line and status 2, whether the
parent refuses it before any worker starts or a worker finds it while loading."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jaxmap.cli.bench import parse_wish, parse_workload, worker_failure
from jaxmap.errors import UserError

TINY_LLAMA = str(Path(__file__).parent / "data" / "tiny-llama")


def run_bench(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxmap.bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_error_line(r: subprocess.CompletedProcess, fragment: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not r.stdout


def test_bench_prints_every_figure_for_each_layout():
    r = subprocess.run([sys.executable, "-m", "jaxmap.bench", "-m", TINY_LLAMA, "--workload", "4x1,4x2",
                        "--new-tokens", "3", "--repeats", "2", "--max-seq-len", "64",
                        "--layouts", "f32:isq=none", "q8:isq=Q8_0"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "median of 2 timed runs" in lines[0]
    assert lines[1].split() == ["impl", "prompt", "batch", "TTFT", "ms", "1st", "TTFT", "compile", "s",
                                "prefill", "t/s", "decode", "t/s", "peak", "RSS", "MiB"]
    rows = [line.split() for line in lines[3:] if line.strip()]
    assert [(row[0], row[1], row[2]) for row in rows] == [("f32", "4", "1"), ("f32", "4", "2"), ("q8", "4", "1"),
                                                         ("q8", "4", "2")]
    assert all(float(v) > 0 for row in rows for v in row[3:]), rows


def test_bench_refuses_zero_repeats():
    r = run_bench("--repeats", "0")
    assert_one_error_line(r, "--repeats must be at least 1, got 0")


@pytest.mark.parametrize(("args", "fragment"), [
    (["-m", "/nonexistent"], "no such file or folder: /nonexistent"),
    (["--dtype", "float64"], "unknown dtype 'float64'"),
    (["--max-seq-len", "0"], "--max-seq-len must be at least 1"),
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["--workload", "0x1"], "'0x1' is not PROMPTxBATCH"),
    (["--workload", "16x0"], "'16x0' is not PROMPTxBATCH"),
    (["--workload", "16x1x2"], "'16x1x2' is not PROMPTxBATCH"),
    (["--workload", "abc"], "'abc' is not PROMPTxBATCH"),
    (["--workload", "16x1,"], "'' is not PROMPTxBATCH"),
    (["--layouts", "x:tp=abc"], "--layouts x: tp must be a positive whole number, got 'abc'"),
    (["--layouts", "x:tp=0"], "--layouts x: tp must be a positive whole number"),
    (["--layouts", "x:foo=1"], "--layouts x: unknown key 'foo'"),
    (["--layouts", "x:dtype=bfloat16"], "--layouts x: unknown key 'dtype'"),
    (["--layouts", "x:tp"], "--layouts x: 'tp' is not KEY=VALUE"),
    (["--layouts", "x:tp=1,tp=2"], "--layouts x: tp is given twice"),
    (["--layouts", "x:isq="], "--layouts x: isq= has no value"),
    (["--layouts", "x:devices=a"], "--layouts x: --devices expects comma-separated ordinals"),
    (["--layouts", "tp=2"], "'tp=2' is not NAME:WISH"),
    (["--layouts", "x:tp=1", "x:pp=1"], "names 'x' twice"),
    (["--cpu-devices", "-3"], "--cpu-devices must be at least 1, got -3"),
    (["--cpu-devices", "0"], "--cpu-devices must be at least 1, got 0"),
    (["-m", "preset:tiny", "--compare-transformers"], "--compare-transformers needs weights on disk"),
    (["--compare-llamacpp"], "--compare-llamacpp runs llama.cpp on a GGUF file"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_flags_are_refused_before_any_worker(args, fragment, run_main, monkeypatch):
    """The parent's checks, in this process (the command's main; the tests around run ``python -m jaxmap.bench``):
    no worker may start, and the run's constants it sets are put back."""
    from jaxmap.cli import bench

    monkeypatch.setattr(bench, "NEW_TOKENS", bench.NEW_TOKENS)
    monkeypatch.setattr(bench, "REPEATS", bench.REPEATS)
    monkeypatch.setattr(bench, "run_worker", lambda *a, **k: pytest.fail("a worker was started"))
    r = run_main(bench.main, "-m", TINY_LLAMA, *args)
    assert_one_error_line(r, fragment)


@pytest.mark.parametrize(("args", "fragment"), [
    (["-m", "preset:tiny"], "preset:tiny has no tokenizer"),
    (["-m", TINY_LLAMA, "--workload", "1000x1"], "the prompt is 1000 tokens, longer than --max-seq-len 512"),
    (["-m", TINY_LLAMA, "--layouts", "f32:isq=none", "big:tp=64"], "layout big: "),
], ids=["no-tokenizer", "prompt-past-context", "layout-needs-more-devices"])
def test_a_workers_user_error_is_one_line(args, fragment):
    r = run_bench("--workload", "4x1", "--new-tokens", "2", "--repeats", "1", *args, timeout=300)
    assert_one_error_line(r, fragment)


def test_layout_wishes_become_load_keywords():
    assert parse_wish("tp=2,pp=1,devices=0,2,isq=Q8_0") == {"tp": 2, "pp": 1, "devices": "0,2", "isq": "Q8_0"}
    assert parse_wish("max_memory=0:1GiB,host:2GiB") == {"max_memory": "0:1GiB,host:2GiB"}
    assert parse_wish("") == {}
    assert parse_workload("16x1, 128x8") == [(16, 1), (128, 8)]


def test_a_worker_crash_keeps_its_traceback(capsys):
    crash = subprocess.CompletedProcess([], 1, "", "Traceback (most recent call last):\nKeyError: 'x'\n")
    failure = worker_failure(crash, "layout a")
    assert isinstance(failure, SystemExit) and "the layout a benchmark failed (exit 1)" in str(failure.code)
    assert "KeyError" in capsys.readouterr().err
    refused = worker_failure(subprocess.CompletedProcess([], 2, "", "WARNING x\nerror: bad isq\n"), "layout a")
    assert isinstance(refused, UserError) and str(refused) == "layout a: bad isq"


def test_llamacpp_peer_runs_the_same_gguf():
    """llama.cpp (the bench extra, not installed by CI) on the default GGUF: batch-1 rows measured, batch 8 n/a."""
    pytest.importorskip("llama_cpp")
    r = run_bench("--workload", "8x1,8x2", "--new-tokens", "4", "--repeats", "1", "--compare-llamacpp", timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("llama.cpp")]
    assert len(rows) == 2 and float(rows[0][-2]) > 0 and "n/a" in rows[1]
    assert "ratio jaxmap / llama.cpp" in r.stdout


def test_profile_sorts_a_decode_tokens_ops_by_kind(run_main):
    """``--profile`` traces the decode (jax.profiler over XLA's thunks) and puts every op in a kind by the compiled
    program: the tiny llama's projections (Q8_0, one scanned stage) and its LM head are found, per token; the
    command prints the table (its own load: the default layout, unrolled float32)."""
    from jaxmap.api import load
    from jaxmap.bench_profile import KINDS, classify, decode_profile, format_profile
    from jaxmap.cli import bench

    assert classify("while.3", "(s32[], f32[1,1,8])", "while", "", 256) is None  # a container: its body counts
    assert classify("copy_dot_fusion.3", "f32[256]{0}", "fusion", "%fused (p: u8[128,64]) -> f32[256] {", 256) == (
        "LM head and sampling")
    assert classify("ynn_fusion.1", "f32[1,3,3,128]", "fusion", "", 256) == "attention and KV cache"
    assert classify("copy_dot_fusion.7", "f32[288]{0}", "fusion", "", 256) == "projections"
    native = '%ffi_call.3 = f32[1,288]{1,0} custom-call(f32[1,64]{1,0} %x), custom_call_target="jaxmap_qmatvec"'
    assert classify("ffi_call.3", "f32[1,288]{1,0}", "custom-call", native, 256) == "projections"
    model = load(TINY_LLAMA, dtype="float32", max_seq_len=64, progress=False, devices="0", layer_mode="scan",
                 isq="Q8_0")
    profile = decode_profile(model, [1, 5, 9, 13], new_tokens=4)
    kinds = profile.by_kind()
    assert set(kinds) == set(KINDS) and profile.tokens == 3 and profile.wall_ms > 0
    assert kinds["projections"][0] > 0 and kinds["projections"][1] >= 2 * model.config.num_hidden_layers
    assert kinds["LM head and sampling"][0] > 0
    assert "projections" in format_profile(profile)
    out = run_main(bench.main, "-m", TINY_LLAMA, "--profile", "--workload", "4x1", "--max-seq-len", "64",
                  "--new-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("decode profile:") and "ms per decode token" in out.stdout, out.stdout
