"""jaxmap: a JAX inference engine for LLMs built around device mapping."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "Model", "SamplingParams", "UserError", "ModelConfig", "shard", "plan_for", "offload", "fetch",
           "MemoryPlan", "shardings_for"]


def __getattr__(name: str):
    # Lazy so that `python -m jaxmap.plan` and friends do not pay for importing jax before they need it.
    if name in ("load", "Model"):
        from jaxmap import api

        return getattr(api, name)
    if name == "SamplingParams":
        from jaxmap.engine.sampling import SamplingParams

        return SamplingParams
    if name == "UserError":
        from jaxmap.errors import UserError

        return UserError
    if name in ("shard", "plan_for", "offload", "fetch", "MemoryPlan", "shardings_for"):
        from jaxmap import library

        return getattr(library, name)
    if name == "library":  # `jaxmap.library.memory_kinds` before any other library name was touched
        import importlib

        return importlib.import_module("jaxmap.library")
    if name == "ModelConfig":
        from jaxmap.config import ModelConfig

        return ModelConfig
    raise AttributeError(name)
