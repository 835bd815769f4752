"""A single GGUF file (llama.cpp's format): metadata, quantized tensors and the tokenizer's vocabulary in one file.

Everything is presented in Hugging Face terms so the rest of jaxmap never knows the weights came from GGUF: the
family that claims the file's ``general.architecture`` maps its tensor names to Hugging Face's, shapes are given as
``[out, in]``, quantized blocks are dequantized with ``gguf.quants``, and where the family says llama.cpp's converter
reordered the q/k rows (so that each RoPE pair sits in adjacent rows, for interleaved rotation) they are put back:
jaxmap, like Hugging Face, rotates the two halves of each head.

Mixtures of experts (Mixtral's ``llama`` files with ``llama.expert_count``, ``qwen3moe``): llama.cpp stacks each
layer's experts into ``blk.N.ffn_{gate,up,down}_exps.weight`` (ggml dims ``[in, out, E]``, numpy ``[E, out, in]``)
beside the router ``ffn_gate_inp``; they are served as jaxmap's stacks ``[E, in, out]`` (what a Hugging Face folder's
per-expert tensors become), dequantized one expert at a time, and as raw quantized rows ``[E, out, bytes]`` for
keeping them in their GGUF blocks. The expert counts and sizes come from ``{arch}.expert_count``,
``expert_used_count`` and ``expert_feed_forward_length``; dense layers mixed into a MoE file are told by their
tensors (no router, a dense ``ffn_gate``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxmap.config import ModelConfig
from jaxmap.errors import UserError
from jaxmap.families import config_from_hf, family_for_gguf, fused_parts, missing_tensors, stacked_experts
from jaxmap.families.mixtral import gguf_dense_layers, gguf_fused_gate_up
from jaxmap.loading import gguf_reader
from jaxmap.loading.gguf_reader import GGUFFile, TensorInfo
from jaxmap.loading.safetensors_source import as_numpy_dtype
from jaxmap.quant.types import GGUF_NATIVE

if TYPE_CHECKING:
    from jaxmap.loading.tokenizer import Tokenizer

log = logging.getLogger(__name__)
GGUF_MAGIC = gguf_reader.MAGIC
GGUF_VERSIONS = gguf_reader.VERSIONS


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, interleaved RoPE pairs back to the two halves HF rotates.

    The converter did ``w.reshape(n_head, 2, d // 2, ...).swapaxes(1, 2)``; this is its inverse. Works on
    ``[out, in]`` weights, ``[out]`` biases and ``[out, bytes]`` raw quantized rows alike.
    """
    rows = w.shape[0]
    head_dim = rows // n_head
    if n_head <= 0 or rows % n_head or head_dim % 2:
        raise UserError(f"cannot reorder a q/k tensor of {rows} rows into {n_head} heads")
    rest = w.shape[1:]
    return w.reshape(n_head, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF -> GGUF q/k row order (for writing test files and checking the inverse)."""
    rows = w.shape[0]
    head_dim = rows // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_scaling(config: ModelConfig, factors: np.ndarray) -> dict[str, Any] | None:
    """HF ``rope_scaling`` (llama3) that reproduces GGUF's ``rope_freqs`` table of per-frequency divisors, or None.

    The largest divisor is ``factor``. In the blended band ``1 / divisor`` is linear in ``1 / wavelength``, which
    fixes ``original_max_position_embeddings / (high - low)`` and ``low / (high - low)``: scaling all three by one
    constant gives the same table, so ``low_freq_factor = 1`` is taken and the rest follows. With fewer than two
    blended frequencies the values Llama 3.x ships are tried instead. Any answer is checked against the table.
    """
    from jaxmap.families.rope import inverse_frequencies

    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.shape != (config.head_dim // 2,) or not np.all(np.isfinite(factors)) or factors.min() <= 0:
        return None
    base = inverse_frequencies(config.with_changes(rope_scaling=None)).astype(np.float64)
    factor = float(factors.max())
    candidates: list[tuple[float, float, float]] = []
    medium = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    if medium.sum() >= 2 and factor > 1:
        smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
        inv_wavelen = base[medium] / (2 * math.pi)
        a, minus_b = np.polyfit(inv_wavelen, smooth, 1)
        if minus_b < 0 < a:
            b = -minus_b
            candidates.append((round(a / b), 1.0, round(1.0 + 1.0 / b, 6)))
    candidates += [(float(n), lo, hi) for n in (8192, 4096, 16384, 32768, 65536, 131072, 2048)
                   for lo, hi in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0), (1.0, 8.0), (2.0, 8.0))]
    for length, low, high in candidates:
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
                   "high_freq_factor": float(high), "original_max_position_embeddings": int(length)}
        try:
            scaled = inverse_frequencies(config.with_changes(rope_scaling=scaling)).astype(np.float64)
        except UserError:  # a fitted candidate out of range (a zero original length): try the next one
            continue
        if np.allclose(base / scaled, factors, rtol=1e-3, atol=1e-4):
            return scaling
    return None


class GGUFSource:
    """A :class:`~jaxmap.loading.source.WeightSource` over one ``.gguf`` file of any architecture a family reads."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = str(path)
        self._file = path
        self._reader: GGUFFile = gguf_reader.open_gguf(path)
        self._meta_cache: dict[str, Any] = {}
        self._dequantized_types: set[str] = set()
        arch = str(self._get("general.architecture", ""))
        self.family = family_for_gguf(arch, self.path, self._get)
        self.architecture = arch
        self._tensors: dict[str, TensorInfo] = {}
        self.unmapped: list[str] = []  # GGUF tensors with no Hugging Face counterpart (kept for diagnostics)
        by_gguf_name = self._reader.tensors
        for t in by_gguf_name.values():
            name = self.family.gguf_to_hf(t.name)
            if name is None:
                self.unmapped.append(t.name)
            else:
                self._tensors[name] = t
        self.config = self._build_config(by_gguf_name)
        self._parts = self._fused_parts()
        self._halves = self._gate_up_halves(by_gguf_name)
        # llama.cpp's stacked experts (ffn_{gate,up,down}_exps, numpy order [E, out, in]) are served in jaxmap's
        # stacked layout [E, in, out], as a Hugging Face folder's per-expert tensors are (safetensors_source); the
        # experts' biases ([E, out], gpt-oss) are served as stored
        self._stacks = dict.fromkeys(name for name in stacked_experts(self.config)
                                     if name in self._tensors and len(self._tensors[name].shape) != 2)
        for name in self._stacks:
            self._check_stack(name)

    def check_complete(self) -> None:
        """Refuse a file that lacks a tensor its metadata's model needs (before planning, not halfway through
        loading)."""
        missing = missing_tensors(self.config, set(self._tensors))
        if missing:
            first = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UserError(f"{self.path} lacks the tensor {first.gguf_name} ({first.hf_name}){more}, which a "
                            f"{self.architecture} model of its metadata needs; the file is incomplete or was written "
                            "by a converter jaxmap does not know")

    # ---- metadata ------------------------------------------------------------------------------------------------
    def _get(self, key: str, default: Any = None) -> Any:
        if key not in self._meta_cache:
            self._meta_cache[key] = _plain(self._reader.metadata.get(key))
        value = self._meta_cache[key]
        return default if value is None else value

    def _build_config(self, by_gguf_name: dict[str, TensorInfo]) -> ModelConfig:
        arch = self.architecture
        raw = self.family.gguf_config(arch, self._get, set(self._tensors), self.path)
        if raw.get("num_experts") or raw.get("num_local_experts"):
            raw.update(gguf_dense_layers(self._reader.tensors, int(raw["num_hidden_layers"])))
        longrope = self._longrope(by_gguf_name)  # partial rotary: the family's gguf_config reads dimension_count
        if longrope is not None:
            raw["rope_scaling"] = longrope
        tokens = self._reader.metadata.get("tokenizer.ggml.tokens")
        vocab = self._get(f"{arch}.vocab_size") or (len(tokens) if tokens is not None else None)
        embedding = next((t for t in self.family.outer_tensors if t.role == "embedding"), None)
        if vocab is None and embedding is not None and embedding.hf in self._tensors:
            vocab = int(self._tensors[embedding.hf].dims[-1])  # ggml order: [embed, vocab]
        if vocab is None:
            raise UserError(f"{self.path}: GGUF metadata has no vocabulary size")
        eos = [self._get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                      "tokenizer.ggml.eom_token_id")]
        raw.update(vocab_size=int(vocab), bos_token_id=self._get("tokenizer.ggml.bos_token_id"),
                   eos_token_id=[int(e) for e in dict.fromkeys(eos) if e is not None])
        config = config_from_hf(raw, name=self._file.stem)  # the file name: what the user typed
        scaling = self._rope_scaling(config, by_gguf_name.get("rope_freqs.weight"))
        return config.with_changes(rope_scaling=scaling) if scaling else config

    def _gate_up_halves(self, by_gguf_name: dict[str, TensorInfo]) -> dict[str, int]:
        """Expert gate and up stacks that a converter fused into one (``blk.N.ffn_gate_up_exps.{weight,bias}``, gate
        rows then up rows, llama.cpp's ``--fuse-gate-up-exps``): each family name of the two -> its half (0: gate,
        1: up), the fused tensor entered under both names."""
        halves: dict[str, int] = {}
        for i in range(self.config.num_hidden_layers):
            specs = self.family.layer_params(self.config, i)
            for kind in ("weight", "bias"):
                fused = by_gguf_name.get(gguf_fused_gate_up(i, kind))
                if fused is None:
                    continue
                keys = ("experts_gate", "experts_up") if kind == "weight" else ("experts_gate_bias", "experts_up_bias")
                if not all(k in specs for k in keys):
                    continue  # a layer without experts: left in self.unmapped
                rows = fused.shape[1] if len(fused.shape) > 1 else 0
                if fused.shape[0] != self.config.num_experts or rows != 2 * self.config.moe_intermediate_size:
                    raise UserError(f"{self.path}: tensor {fused.name} has shape {fused.shape}, the metadata's model "
                                    f"expects {self.config.num_experts} experts of 2 x "
                                    f"{self.config.moe_intermediate_size} rows (gate, then up); the file does not "
                                    "match its metadata")
                for half, key in enumerate(keys):
                    name = specs[key].hf_name
                    if name in self._tensors:
                        raise UserError(f"{self.path} holds both {fused.name} and {specs[key].gguf_name}; a file "
                                        "has its experts' gate and up fused or apart, not both")
                    self._tensors[name] = fused
                    halves[name] = half
                self.unmapped.remove(fused.name)
        return halves

    def _half(self, name: str, data: np.ndarray) -> np.ndarray:
        """``data`` (the stored tensor, or something with its rows on axis 1) cut to ``name``'s half when ``name``
        is half of a fused gate/up stack."""
        half = self._halves.get(name)
        if half is None:
            return data
        rows = data.shape[1] // 2
        return data[:, half * rows:(half + 1) * rows]

    def _check_stack(self, name: str) -> None:
        t = self._tensors[name]
        if len(t.shape) != 3 or t.shape[0] != self.config.num_experts:
            raise UserError(f"{self.path}: tensor {t.name} has shape {t.shape}, the metadata's model expects "
                            f"{self.config.num_experts} stacked experts ([experts, out, in]); the file does not "
                            "match its metadata")

    def _longrope(self, by_gguf_name: dict[str, TensorInfo]) -> dict[str, Any] | None:
        """LongRoPE as llama.cpp's converter stores it (Phi-3 128k, Phi-3.5, Phi-4-mini): the per-frequency factors as
        tensors ``rope_factors_short`` / ``rope_factors_long``, the original context and the attention factor as
        metadata; None for files without them."""
        short, long = by_gguf_name.get("rope_factors_short.weight"), by_gguf_name.get("rope_factors_long.weight")
        if short is None and long is None:
            return None
        arch = self.architecture
        original = self._get(f"{arch}.rope.scaling.original_context_length")
        if short is None or long is None or original is None:
            raise UserError(f"{self.path}: LongRoPE needs rope_factors_short.weight, rope_factors_long.weight and "
                            f"{arch}.rope.scaling.original_context_length; the file lacks some of them")

        def factors(t: TensorInfo) -> list[float]:
            return [float(v) for v in np.asarray(self._reader.tensor_data(t.name), np.float64).reshape(-1)]

        out: dict[str, Any] = {"rope_type": "longrope", "short_factor": factors(short),
                               "long_factor": factors(long), "original_max_position_embeddings": int(original)}
        attn = self._get(f"{arch}.rope.scaling.attn_factor")
        if attn is not None:
            out["attention_factor"] = float(attn)
        return out

    def _rope_scaling(self, config: ModelConfig, freqs: TensorInfo | None) -> dict[str, Any] | None:
        """Rope scaling from ``{arch}.rope.scaling.*``, or llama3 scaling recovered from ``rope_freqs.weight``."""
        arch = self.architecture
        kind = self._get(f"{arch}.rope.scaling.type")
        if config.rope_scaling and freqs is None:
            return None  # read already: LongRoPE from its factor tensors (_longrope), or by the family (gpt-oss)
        if freqs is not None:
            factors = np.asarray(self._reader.tensor_data(freqs.name), dtype=np.float64).reshape(-1)
            return self._llama3_from_factors(config, factors)
        if kind in (None, "none"):
            return None
        factor = float(self._get(f"{arch}.rope.scaling.factor", 1.0))
        if kind == "linear":
            return {"rope_type": "linear", "factor": factor}
        if kind == "yarn":
            original = int(self._get(f"{arch}.rope.scaling.original_context_length", config.max_position_embeddings))
            out = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
            for key in ("beta_fast", "beta_slow"):
                value = self._get(f"{arch}.rope.scaling.yarn_{key}")
                if value is not None:
                    out[key] = float(value)
            return out
        raise UserError(f"{self.path}: rope scaling {kind!r} is not supported")

    def _llama3_from_factors(self, config: ModelConfig, factors: np.ndarray) -> dict[str, Any]:
        scaling = llama3_rope_scaling(config, factors)
        if scaling is None:
            raise UserError(f"{self.path}: llama3 rope scaling from GGUF (rope_freqs.weight) could not be matched to "
                            "Hugging Face's llama3 parameters; load the Hugging Face folder instead")
        return scaling

    # ---- WeightSource --------------------------------------------------------------------------------------------
    def _fused_parts(self) -> dict[str, tuple[str, int, int, int]]:
        """The parts of fused tensors (Phi-3's attn_qkv, and ffn_up holding gate and up) that the file holds: each is
        served as rows of its stored tensor."""
        parts = {}
        for part, (stored, r0, r1, total) in fused_parts(self.config).items():
            t = self._tensors.get(stored)
            if t is None:
                continue  # check_complete names it
            if not t.shape or t.shape[0] != total:
                raise UserError(f"{self.path}: tensor {t.name} has shape {t.shape}, the metadata's model expects "
                                f"{total} rows (its fused parts); the file does not match its metadata")
            parts[part] = (stored, r0, r1, total)
        return parts

    def names(self) -> list[str]:
        """Every mapped tensor, and the parts of fused ones under the family's names for them."""
        return list(self._tensors) + list(self._parts)

    def _tensor(self, name: str) -> TensorInfo:
        if name in self._parts:
            name = self._parts[name][0]
        t = self._tensors.get(name)
        if t is None:
            raise UserError(f"{self.path} has no tensor {name!r}")
        return t

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions fastest-first ([in, out]); Hugging Face slowest-first ([out, in]).
        shape = self._tensor(name).shape
        if name in self._halves:
            shape = (shape[0], shape[1] // 2, *shape[2:])
        if name in self._stacks:  # stored [E, out, in]; jaxmap's stack is [E, in, out]
            return (shape[0], shape[2], shape[1])
        if name in self._parts:
            _, r0, r1, _ = self._parts[name]
            return (r1 - r0, *shape[1:])
        return shape

    def stored_nbytes(self, name: str) -> int:
        if name in self._parts:
            _, r0, r1, total = self._parts[name]
            return self._tensor(name).nbytes * (r1 - r0) // total
        return self._tensor(name).nbytes // (2 if name in self._halves else 1)

    def stored_type(self, name: str) -> str:
        return self._tensor(name).type_name

    def _data(self, name: str) -> np.ndarray:
        """The stored tensor as a view of the mapped file (typed for F32/F16..., byte rows for quantized types)."""
        return self._reader.tensor_data(self._tensor(name).name)

    def _q_k_heads(self, name: str) -> int | None:
        """Heads to un-permute by, for the q/k projections llama.cpp reordered; None for every other tensor."""
        return self.family.gguf_row_heads(self.architecture, self.config, name)

    def read(self, name: str, dtype: np.dtype | str = np.float32) -> np.ndarray:
        if name in self._parts:  # rows of a fused tensor (the whole is dequantized, then sliced)
            stored, r0, r1, _ = self._parts[name]
            return np.ascontiguousarray(self.read(stored, dtype)[r0:r1])
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self._tensor(name)
        qtype = GGMLQuantizationType(t.ggml_type)
        target = as_numpy_dtype(dtype)
        if name in self._stacks:
            return self._read_stack(name, t, qtype, target)
        shape = self.shape(name)
        out = np.empty(shape, dtype=target)
        data = self._data(name)
        if name in self._halves:  # a fused gate/up expert bias [E, 2 I] (stacks are read by _read_stack)
            out[...] = self._half(name, np.asarray(dequantize(data, qtype)).reshape(shape[0], -1))
            self._drop_mapped_pages()
            return out
        rows = shape[0] if len(shape) == 2 and data.ndim == 2 and data.shape[0] == shape[0] else None
        # Dequantize a few MiB of rows at a time into the output: dequantizing a whole tensor at once held ~3x its
        # float32 size in temporaries (240 MiB for SmolLM2's embedding table), which set the loading peak.
        step = max(1, (1 << 21) // max(1, shape[-1])) if rows else None
        try:
            if rows is None:
                out[...] = dequantize(data, qtype).reshape(shape)
            else:
                for r0 in range(0, rows, step):
                    out[r0:r0 + step] = dequantize(data[r0:r0 + step], qtype).reshape(-1, shape[1])
        except (NotImplementedError, ValueError) as exc:
            raise UserError(f"{self.path}: cannot dequantize {name} ({t.type_name}): {exc}") from None
        heads = self._q_k_heads(name)
        if heads is not None:
            out = np.ascontiguousarray(unpermute_rows(out, heads))
        offset = self.family.gguf_offset(name)
        if offset:  # llama.cpp stored this weight plus a constant (Gemma's norms: 1 + weight)
            out -= np.asarray(offset, out.dtype)
        self._drop_mapped_pages()
        return out

    def _read_stack(self, name: str, t: TensorInfo, qtype: Any, target: np.dtype) -> np.ndarray:
        """Stacked experts as ``[E, in, out]``, dequantized one expert at a time (the temporaries stay one expert's
        size, not the stack's)."""
        from gguf.quants import dequantize

        experts, rows, cols = t.shape
        rows //= 2 if name in self._halves else 1
        if t.type_name not in ("F32", "F16", "BF16") and t.type_name not in self._dequantized_types:
            self._dequantized_types.add(t.type_name)  # once per type: every layer's stacks share it
            log.info("%s: stacked experts stored as %s (e.g. %s) are dequantized to %s (kept in their blocks only "
                     "when loaded in native types, for %s)", self._file.name, t.type_name, t.name,
                     np.dtype(target).name, ", ".join(GGUF_NATIVE))
        out = np.empty((experts, cols, rows), dtype=target)
        data = self._data(name)
        try:
            half = self._halves.get(name)
            for e in range(experts):
                expert = data[e] if half is None else data[e].reshape(2 * rows, -1)[half * rows:(half + 1) * rows]
                out[e] = dequantize(expert, qtype).reshape(rows, cols).T
        except (NotImplementedError, ValueError) as exc:
            raise UserError(f"{self.path}: cannot dequantize {name} ({t.type_name}): {exc}") from None
        self._drop_mapped_pages()
        return out

    def _drop_mapped_pages(self) -> None:
        """Let the kernel drop the file pages this read touched: they are clean, read again on demand, and would
        otherwise count in the process's resident memory until the file is closed (98 MiB for SmolLM2's GGUF)."""
        if self._reader is not None:
            self._reader.drop_pages()

    def raw(self, name: str) -> tuple[np.ndarray, str]:
        """The stored bytes/values as rows of quantized blocks ([out, bytes per row]; stacked experts
        ``[E, out, bytes per row]``, each expert ``[out, in]`` as a QTensor stores it) and the ggml type name.

        q/k rows are already put back in Hugging Face order (quant blocks never straddle rows, so rows move whole).
        """
        if name in self._parts:  # quant blocks never straddle rows: a part is whole rows of blocks
            stored, r0, r1, _ = self._parts[name]
            data, type_name = self.raw(stored)
            return np.ascontiguousarray(data[r0:r1]), type_name
        t = self._tensor(name)
        data = self._data(name)
        if name in self._stacks:  # [E, out, bytes per row]: each expert's rows as a QTensor holds them
            rows = self._half(name, data.reshape(t.shape[0], t.shape[1], -1))
            return np.array(rows, order="C", copy=True), t.type_name
        if name in self._halves:  # half of a fused gate/up bias
            return np.array(self._half(name, data.reshape(t.shape[0], -1)), order="C", copy=True), t.type_name
        if data.ndim == 1 and len(self.shape(name)) == 2:
            data = data.reshape(self.shape(name)[0], -1)
        heads = self._q_k_heads(name)
        if heads is not None:
            data = unpermute_rows(data, heads)
        offset = self.family.gguf_offset(name)
        if offset and np.issubdtype(data.dtype, np.floating):  # a float tensor llama.cpp stored plus a constant
            data = data - np.asarray(offset, data.dtype)
        return np.array(data, order="C", copy=True), t.type_name

    def tokenizer(self) -> Tokenizer | None:
        """The file's tokenizer (None without one), built once per process for the unchanged file."""
        return self._reader.derived("tokenizer", self._build_tokenizer)

    def _build_tokenizer(self) -> Tokenizer | None:
        from jaxmap.loading.gguf_vocab import GGUFVocab

        return GGUFVocab(self.path, self._get, self._reader.metadata.get).tokenizer(self.config)

    def close(self) -> None:
        # The parse stays cached for the process (gguf_reader.open_gguf); the mapping goes with the reader.
        self._tensors = {}
        if self._reader is not None:
            self._reader.close()
        self._reader = None  # type: ignore[assignment]

    def __enter__(self) -> GGUFSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(value: Any) -> Any:
    """Metadata as gguf's reader gave it: arrays of numbers (numpy arrays from jaxmap's reader) as lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list) and value and isinstance(value[0], (list, np.ndarray)):
        return [_plain(v) for v in value]
    return value


def readable_versions() -> tuple[int, ...]:
    """GGUF versions jaxmap reads (its own reader: 2 and 3)."""
    return gguf_reader.VERSIONS
