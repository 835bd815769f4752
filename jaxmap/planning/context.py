"""How many KV-cache slots a run holds when none is asked for (pure data: no jax)."""

from __future__ import annotations

from jaxmap.config import ModelConfig

RUN_SEQ_LEN_MIN = 256


def run_max_seq_len(config: ModelConfig, positions: int) -> int:
    """KV slots for a run known to need ``positions`` (its longest prompt plus its new tokens): the next power of two
    from 256, at most the model's context. Sizing the cache to the run, not to min(context, 4096), keeps a short
    generate from holding a long cache (SmolLM2 at 4096 slots: 180 MiB of float32 cache for 21 positions); powers of
    two let runs of similar length share compiled programs."""
    want = max(RUN_SEQ_LEN_MIN, 1 << max(0, positions - 1).bit_length())
    return min(config.max_position_embeddings, want)
