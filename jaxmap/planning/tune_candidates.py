"""The layouts ``python -m jaxmap.tune`` tries: pure data (no jax), so the list is the same on hardware you lack.

From a model's config, the hardware and the flags the user fixed, every combination of dtype, ISQ type, layer mode
and tp/pp split is proposed; what the user passed is kept, not varied. Each is checked with the planner: those it
refuses stay in the list with its reason (the table shows them), the rest are ordered so that the likely fastest come
first, because ``--budget`` may cut the list short.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from jaxmap.config import ModelConfig
from jaxmap.config.hardware import Hardware
from jaxmap.errors import UserError
from jaxmap.planning.planner import plan, valid_tp_sizes
from jaxmap.planning.wishes import make_wish

LAYER_MODES = ("unrolled", "scan", "per_layer")  # as jaxmap.api.LAYER_MODES, less "auto" (tune picks)
ISQ_GGUF = ("native", "Q8_0", "none", "Q4K")  # a GGUF's own types first: no requantization, its quality
ISQ_FLOAT = ("Q8_0", "none", "Q4K")  # decode on CPU is memory-bound: 8-bit weights read a quarter of float32's
FIXED_KEYS = ("dtype", "isq", "layer_mode", "tp", "pp")


@dataclasses.dataclass
class Candidate:
    """One layout to try. ``refused``: the planner's reason when it does not fit (then it is not run)."""

    dtype: str
    isq: str
    layer_mode: str
    tp: int
    pp: int
    refused: str | None = None

    @property
    def name(self) -> str:
        return f"{self.dtype}/isq={self.isq}/{self.layer_mode}/tp{self.tp}pp{self.pp}"

    def load_kwargs(self) -> dict:
        """The :func:`jaxmap.load` keywords that make this layout."""
        return {"dtype": self.dtype, "isq": self.isq, "layer_mode": self.layer_mode, "tp": self.tp, "pp": self.pp}


def dtypes_for(hardware: Hardware) -> list[str]:
    """float32 first on a CPU (XLA's CPU bfloat16 matmuls convert on the fly), bfloat16 first on an accelerator."""
    return ["float32", "bfloat16"] if hardware.default_platform == "cpu" else ["bfloat16", "float32"]


def splits_for(config: ModelConfig, n_devices: int) -> list[tuple[int, int]]:
    """(tp, pp) pairs over the devices present: one device, all in tensor parallel, all in pipeline, and a tp x 2
    mix; tensor-parallel sizes the model's heads do not divide are left out."""
    tps = set(valid_tp_sizes(config))
    out = [(1, 1)]
    if n_devices > 1:
        out += [(n_devices, 1), (1, min(n_devices, config.num_hidden_layers))]
        if n_devices >= 4 and n_devices % 2 == 0:
            out.append((n_devices // 2, 2))
    seen: list[tuple[int, int]] = []
    for tp, pp in out:
        if tp in tps and (tp, pp) not in seen:
            seen.append((tp, pp))
    return seen


def enumerate_candidates(config: ModelConfig, hardware: Hardware, fixed: Mapping[str, object] | None = None,
                         isq_candidates: Sequence[str] | None = None, gguf: bool = False, max_seq_len: int = 512,
                         max_batch_size: int = 1, stored_bytes: dict[str, int] | None = None,
                         native_types: dict[str, str] | None = None) -> list[Candidate]:
    """Every candidate, fitting ones first in likely-best order, then the refused ones (each with the planner's
    reason). ``fixed``: the user's own choices among :data:`FIXED_KEYS` (None values are ignored)."""
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    unknown = set(fixed) - set(FIXED_KEYS)
    if unknown:
        raise UserError(f"tune cannot fix {', '.join(sorted(unknown))}; it fixes {', '.join(FIXED_KEYS)}")
    dtypes = [str(fixed["dtype"])] if "dtype" in fixed else dtypes_for(hardware)
    isqs = [str(fixed["isq"])] if "isq" in fixed else list(isq_candidates or (ISQ_GGUF if gguf else ISQ_FLOAT))
    if not gguf and "native" in isqs:
        raise UserError("isq native keeps a GGUF's own types; this model is not a GGUF")
    modes = [str(fixed["layer_mode"])] if fixed.get("layer_mode", "auto") != "auto" else list(LAYER_MODES)
    splits = splits_for(config, len(hardware.devices))
    if "tp" in fixed or "pp" in fixed:
        splits = [(int(fixed.get("tp", tp)), int(fixed.get("pp", pp))) for tp, pp in splits]
        splits = list(dict.fromkeys(splits))
    fits, refused = [], []
    for tp, pp in splits:
        for isq in isqs:
            for dtype in dtypes:
                why = _refusal(config, hardware, tp, pp, isq, dtype, max_seq_len, max_batch_size, stored_bytes,
                               native_types if isq == "native" else None)
                for mode in modes:
                    cand = Candidate(dtype, isq, mode, tp, pp, refused=why)
                    rank = (splits.index((tp, pp)) + isqs.index(isq) + modes.index(mode) + dtypes.index(dtype))
                    (refused if why else fits).append((rank, len(fits) + len(refused), cand))
    return [c for _, _, c in sorted(fits)] + [c for _, _, c in refused]


def _refusal(config: ModelConfig, hardware: Hardware, tp: int, pp: int, isq: str, dtype: str, max_seq_len: int,
             max_batch_size: int, stored_bytes, native_types) -> str | None:
    """The planner's one-line reason this layout does not fit, or None when it does."""
    try:
        plan(config, hardware, make_wish(tp=tp, pp=pp, isq=None if isq == "none" else isq), dtype, max_seq_len,
             max_batch_size, stored_bytes=stored_bytes if isq == "native" else None, native_types=native_types)
    except UserError as exc:
        return str(exc)
    return None
