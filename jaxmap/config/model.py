"""What the network is: :class:`ModelConfig`, read from a Hugging Face ``config.json``, GGUF metadata or a preset.

The field names mirror Hugging Face's ``config.json`` so that a preset in ``models/`` is a config.json a user can
read and edit. Only the llama family (Llama 2/3, Mistral, Qwen2, SmolLM2) is supported; anything else is refused
with a message that names what is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from jaxmap.errors import UserError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
_HF_ARCH_TO_TYPE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
PRESETS_DIR = Path(__file__).resolve().parents[2] / "models"
_INTEGER_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture values of a llama-family decoder (no weights)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UserError(
                f"unsupported architecture {self.architecture!r}; jaxmap supports {', '.join(SUPPORTED_ARCHITECTURES)}"
                " (Llama 2/3, Mistral, Qwen2, SmolLM2)"
            )
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"model config: {field} must be a positive integer, got {value!r}")
        for field in ("rms_norm_eps", "rope_theta"):  # zero or negative: NaN logits, silently
            value = getattr(self, field)
            if not _is_positive_number(value):
                raise UserError(f"model config: {field} must be a positive number, got {value!r}")
        _check_rope_scaling(self.rope_scaling)
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"model config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    # ---- derived sizes -------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def layer_param_count(self) -> int:
        d, f = self.hidden_size, self.intermediate_size
        attn = d * self.q_size + 2 * d * self.kv_size + self.q_size * d
        bias = (self.q_size + 2 * self.kv_size) if self.attention_bias else 0
        return attn + bias + 3 * d * f + 2 * d

    def param_count(self) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + self.hidden_size + self.num_hidden_layers * self.layer_param_count()

    # ---- constructors --------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], name: str = "") -> ModelConfig:
        """Build from the contents of a Hugging Face ``config.json``."""
        model_type = raw.get("model_type")
        if model_type is None:
            archs = raw.get("architectures") or []
            model_type = next((_HF_ARCH_TO_TYPE[a] for a in archs if a in _HF_ARCH_TO_TYPE), None)
        if model_type not in SUPPORTED_ARCHITECTURES:
            what = model_type or ", ".join(raw.get("architectures") or []) or "unknown"
            raise UserError(
                f"unsupported architecture {what!r}; jaxmap supports {', '.join(SUPPORTED_ARCHITECTURES)}"
                " (Llama 2/3, Mistral, Qwen2, SmolLM2)"
            )
        try:
            for key, value in raw.items():  # int() would take True as 1 and 64.5 as 64
                if key in _INTEGER_KEYS and (isinstance(value, bool) or isinstance(value, float)
                                             and not value.is_integer()):
                    raise UserError(f"model config: {key} must be a positive integer, got {value!r}")
            scaling = raw.get("rope_scaling")
            if scaling and not isinstance(scaling, Mapping):
                raise UserError(f"model config: rope_scaling must be an object (rope_type, factor, ...) or null, "
                                f"got {scaling!r}")
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            head_dim = raw.get("head_dim")
            if not head_dim and heads > 0 and hidden % heads:
                raise UserError(f"model config: hidden_size {hidden} is not divisible by num_attention_heads {heads}; "
                                f"set head_dim in config.json")
            head_dim = head_dim or (hidden // heads if heads > 0 else 0)
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
            sliding = raw.get("sliding_window") if raw.get("use_sliding_window", model_type == "mistral") else None
            return cls(
                architecture=model_type,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                rope_theta=float(raw.get("rope_theta", 10000.0)),
                rope_scaling=dict(raw["rope_scaling"]) if raw.get("rope_scaling") else None,
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
                sliding_window=int(sliding) if sliding else None,
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                name=name or str(raw.get("_name_or_path", "")),
            )
        except KeyError as exc:
            raise UserError(f"model config is missing the key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise UserError(f"model config has a malformed value: {exc}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{path} is not valid JSON: it is not UTF-8 text") from None
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path} must hold a JSON object")
        return cls.from_hf_dict(raw, name=path.parent.name)

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        """A preset from ``models/`` by name (``smollm2-135m``) or by path to a preset file."""
        path = Path(name)
        if not path.is_file():
            path = PRESETS_DIR / f"{name}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(list_presets())) or "none"
            raise UserError(f"unknown model preset {name!r}; known presets: {known}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise UserError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path} must hold a mapping of config.json keys")
        return cls.from_hf_dict(raw, name=path.stem)

    def with_changes(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as Hugging Face ``config.json`` keys (for presets, checkpoints and reference scripts)."""
        arch_class = {v: k for k, v in _HF_ARCH_TO_TYPE.items()}[self.architecture]
        out: dict[str, Any] = {
            "architectures": [arch_class],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
        }
        if self.architecture == "mistral":
            out["sliding_window"] = self.sliding_window
        return out


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def _check_rope_scaling(scaling: Mapping[str, Any] | None) -> None:
    """The values :mod:`jaxmap.engine.rope` divides by: a missing or zero ``factor``, or ``low_freq_factor`` equal to
    ``high_freq_factor``, would give a KeyError or NaN frequencies. Other rope types are refused by rope itself."""
    if not scaling:
        return
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("linear", "llama3"):
        return
    defaults = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    keys = ("factor", *defaults) if kind == "llama3" else ("factor",)
    for key in keys:
        value = scaling.get(key, defaults.get(key))
        if not _is_positive_number(value):
            raise UserError(f"model config: rope_scaling.{key} must be a positive number for {kind} scaling, "
                            f"got {value!r}")
    if kind == "llama3":
        low = scaling.get("low_freq_factor", defaults["low_freq_factor"])
        high = scaling.get("high_freq_factor", defaults["high_freq_factor"])
        if low >= high:
            raise UserError(f"model config: rope_scaling.low_freq_factor ({low}) must be below high_freq_factor "
                            f"({high})")


def list_presets() -> list[str]:
    return [p.stem for p in PRESETS_DIR.glob("*.yaml")] if PRESETS_DIR.is_dir() else []


def config_fingerprint(config: ModelConfig) -> str:
    """A short hash of what shapes the weights (the name is left out: a renamed copy is the same model)."""
    keys = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias")
    blob = json.dumps({k: getattr(config, k) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
