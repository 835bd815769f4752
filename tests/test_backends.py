"""A jax backend that will not start (JAX_PLATFORMS naming a platform this machine lacks, or a name jax does not
know) is one line naming the variable and the fix, exit status 2, for every command; never jax's traceback."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxmap.cli.common import guarded
from jaxmap.config.hardware import backend_error
from jaxmap.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "data" / "tiny-llama")


def _installed(*dists: str) -> bool:
    for name in dists:
        try:
            importlib.metadata.version(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


def _nvidia_gpu_visible() -> bool:
    try:
        from jax._src import hardware_utils

        return bool(hardware_utils.has_visible_nvidia_gpu())
    except Exception:  # noqa: BLE001 - private API moved: look for the device node
        return os.path.exists("/dev/nvidia0")


def _starts_here(platform: str) -> bool:
    """Whether JAX_PLATFORMS=platform could work on this machine (then these tests have nothing to refuse)."""
    if platform == "cuda":
        return _installed("jax-cuda12-plugin", "jax-cuda13-plugin") and _nvidia_gpu_visible()
    if platform == "tpu":
        return _installed("libtpu") or importlib.util.find_spec("libtpu") is not None
    return False


def cli(module: str, *args: str, platforms: str, timeout: int = 120) -> subprocess.CompletedProcess:
    if _starts_here(platforms.split(",")[0]):
        pytest.skip(f"JAX_PLATFORMS={platforms} can start on this machine")
    env = dict(os.environ, JAX_PLATFORMS=platforms, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def assert_backend_error(out: subprocess.CompletedProcess, platforms: str, *fragments: str) -> str:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: JAX_PLATFORMS={platforms}"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert out.stdout == "", out.stdout
    return lines[0]


@pytest.mark.parametrize("module, args", [
    ("jaxmap.generate", ["-m", TINY, "-p", "hi"]),
    ("jaxmap.plan", ["-m", TINY]),  # no --mesh: the live devices
    ("jaxmap.doctor", []),
    ("jaxmap.convert", ["-m", TINY, "--out", "{tmp}/ckpt"]),
    ("jaxmap.imatrix", ["-m", TINY, "-o", "{tmp}/m.imatrix.npz"]),
    ("jaxmap.quality", ["-m", TINY, "--types", "none"]),
    ("jaxmap.bench", ["-m", TINY]),
])
def test_cuda_without_a_gpu_is_one_line(module, args, tmp_path):
    out = cli(module, *(a.format(tmp=tmp_path) for a in args), platforms="cuda")
    assert_backend_error(out, "cuda", "could not start the cuda backend", 'pip install -e ".[cuda]"',
                         "unset JAX_PLATFORMS")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "m.imatrix.npz").exists()


@pytest.mark.parametrize("module, args", [
    ("jaxmap.generate", ["-m", TINY, "-p", "hi"]),
    ("jaxmap.plan", ["-m", TINY]),
    ("jaxmap.doctor", []),
])
def test_tpu_without_libtpu_is_one_line(module, args):
    line = assert_backend_error(cli(module, *args, platforms="tpu"), "tpu", "could not start the tpu backend",
                                'pip install -e ".[tpu]"', "unset JAX_PLATFORMS")
    assert "(" in line and "set JAX_PLATFORMS=''" not in line  # jax's own reason, without its own hint


def test_unknown_platform_name_is_one_line():
    assert_backend_error(cli("jaxmap.generate", "-m", TINY, "-p", "hi", platforms="gpux"), "gpux",
                         "names no jax backend", "'gpux'", "cuda", "unset JAX_PLATFORMS")


def test_library_load_raises_user_error():
    code = ("import jaxmap\n"
            "try:\n"
            f"    jaxmap.load({TINY!r})\n"
            "except jaxmap.UserError as exc:\n"
            "    print('UserError:', exc)\n")
    if _starts_here("cuda"):
        pytest.skip("JAX_PLATFORMS=cuda can start on this machine")
    env = dict(os.environ, JAX_PLATFORMS="cuda", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("UserError: JAX_PLATFORMS=cuda but jax could not start the cuda backend"), out.stdout


def test_launch_reports_the_backend_error():
    out = cli("jaxmap.launch", "-n", "2", "--", sys.executable, "-m", "jaxmap.generate", "-m", TINY, "-p", "hi",
              platforms="cuda")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert "error: JAX_PLATFORMS=cuda but jax could not start the cuda backend" in out.stderr


# ---- recognising jax's errors, in process ------------------------------------------------------------------------
def _raise_from_xla_bridge(exc: BaseException, function: str = "backends") -> BaseException:
    """``exc`` as raised inside a function of a file named like jax's ``jax/_src/xla_bridge.py``."""
    source = f"def {function}():\n    raise exc\n"
    namespace = {"exc": exc}
    exec(compile(source, "/site-packages/jax/_src/xla_bridge.py", "exec"), namespace)  # noqa: S102
    try:
        namespace[function]()
    except BaseException as raised:  # noqa: BLE001
        return raised
    raise AssertionError("unreachable")


def test_assertion_from_jax_backends_is_the_cuda_error(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    error = backend_error(_raise_from_xla_bridge(AssertionError()))
    assert isinstance(error, UserError)
    assert str(error) == ('JAX_PLATFORMS=cuda but jax could not start the cuda backend (no NVIDIA GPU is visible); '
                          'install the plugin (pip install -e ".[cuda]") or unset JAX_PLATFORMS to use the CPU')


def test_other_assertions_and_runtime_errors_are_not_backend_errors(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    try:
        raise AssertionError("a jaxmap bug")
    except AssertionError as exc:
        assert backend_error(exc) is None
    assert backend_error(_raise_from_xla_bridge(AssertionError(), "something_else")) is None
    assert backend_error(RuntimeError("RESOURCE_EXHAUSTED: out of memory")) is None
    assert backend_error(RuntimeError("Unable to allocate")) is None
    assert backend_error(ValueError("Unable to initialize backend 'cuda': x")) is None
    assert backend_error(RuntimeError(3)) is None


def test_plugin_failures_keep_jax_reason(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    exc = RuntimeError("Unable to initialize backend 'cuda': FAILED_PRECONDITION: No visible GPU devices. "
                       "(set JAX_PLATFORMS='' to automatically choose an available backend)")
    assert str(backend_error(exc)) == (
        "JAX_PLATFORMS=cuda but jax could not start the cuda backend (FAILED_PRECONDITION: No visible GPU devices); "
        'install the plugin (pip install -e ".[cuda]") or unset JAX_PLATFORMS to use the CPU')
    monkeypatch.delenv("JAX_PLATFORMS")
    exc = RuntimeError("Unable to initialize backend 'cuda': CUDA driver too old (you may need to uninstall the "
                       "failing plugin package, or set JAX_PLATFORMS=cpu to skip this backend.)")
    assert str(backend_error(exc)) == ("jax could not start the cuda backend (CUDA driver too old); repair or "
                                       "uninstall that plugin, or set JAX_PLATFORMS=cpu to use the CPU")


def test_unknown_and_left_out_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "metal")
    exc = RuntimeError("Unable to initialize backend 'metal': Backend 'metal' is not in the list of known backends: "
                       "['cpu', 'tpu']. (set JAX_PLATFORMS='' to automatically choose an available backend)")
    assert "JAX_PLATFORMS=mps" in str(backend_error(exc))
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    left_out = RuntimeError("Unknown backend cpu. Available backends are ['tpu']")
    assert str(backend_error(left_out)) == ("JAX_PLATFORMS=tpu leaves out the cpu backend that this command also "
                                            "uses; add it (JAX_PLATFORMS=tpu,cpu) or unset JAX_PLATFORMS")
    monkeypatch.delenv("JAX_PLATFORMS")
    assert backend_error(left_out) is None  # without JAX_PLATFORMS a missing backend is jaxmap's own doing


def test_guarded_turns_backend_errors_into_one_line(monkeypatch, capsys):
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")

    def fails(_args):
        raise RuntimeError("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so "
                           "(set JAX_PLATFORMS='' to automatically choose an available backend)")

    assert guarded(fails, None) == 2
    err = capsys.readouterr().err
    assert err == ('error: JAX_PLATFORMS=tpu but jax could not start the tpu backend (INTERNAL: Failed to open '
                   'libtpu.so); install the plugin (pip install -e ".[tpu]") or unset JAX_PLATFORMS to use the CPU\n')

    def bug(_args):
        raise RuntimeError("something else went wrong")

    with pytest.raises(RuntimeError, match="something else"):
        guarded(bug, None)
