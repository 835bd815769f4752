"""--max-memory figures that leave room for a chosen number of resident and host-memory layers (offload tests)."""

from __future__ import annotations

from jaxmap.config import ModelConfig
from jaxmap.planning.fit import layer_weight_bytes, outer_bytes
from jaxmap.planning.memory import activation_bytes, kv_cache_bytes


def caps(config: ModelConfig, resident: int, host_layers: int, seq: int = 64,
         isq: str | None = None, tp: int = 1) -> dict[str, int]:
    """--max-memory that leaves room for ``resident`` layers on cpu[0] (each of ``tp`` devices) and ``host_layers``
    in host memory."""
    w, kv = layer_weight_bytes(config, 0, tp, "float32", isq), kv_cache_bytes(config, tp, 4, seq, 1)
    outer = sum(outer_bytes(config, k, "float32", None, tp) for k in ("embed", "final_norm"))
    if not config.tie_word_embeddings:
        outer += outer_bytes(config, "lm_head", "float32", None, tp)
    device = activation_bytes(config, tp, 4, seq, 1) + outer + 2 * w + kv * config.num_hidden_layers + resident * w
    out = {str(i): device + 100 for i in range(tp)}
    out["host"] = max(host_layers * w * tp + 100, 1)
    return out
