"""Model families: one file each (:mod:`~jaxmap.families.llama`, :mod:`~jaxmap.families.qwen3`), each one
:class:`~jaxmap.families.base.Family` declaration; this module finds the family of a config, a ``config.json`` or a
GGUF architecture, and answers for it (its tensors, names, layer design). Pure data: imports no jax.

Adding a family: a file here with its ``FAMILY``, its entry in :data:`FAMILIES`, a preset in ``models/``, its tests
and its row in the README's support table. Anything else it needs is a gap in the interface (:mod:`.base`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from jaxmap.config import PRESETS_DIR, ModelConfig, list_presets
from jaxmap.errors import UserError
from jaxmap.families import gemma3, gpt_oss, llama, mixtral, phi3, qwen3, qwen3_moe
from jaxmap.families.base import LOGICAL_AXES, ROLES, Family, LayerDesign, ModelDesign, ParamSpec, TensorDecl
from jaxmap.families.wrapped import Wrapper

__all__ = ["FAMILIES", "LOGICAL_AXES", "ROLES", "Family", "LayerDesign", "ModelDesign", "ParamSpec", "TensorDecl",
           "config_from_hf", "config_to_hf", "family_for_gguf", "fused_parts", "gguf_name_to_hf", "family_of",
           "interleaved_parts", "layer_param_specs", "missing_tensors", "model_tensor_names", "outer_param_specs",
           "param_count", "preset_config", "read_config_json", "stacked_experts", "supported", "wrapper_of"]

FAMILIES: tuple[Family, ...] = (llama.FAMILY, qwen3.FAMILY, gemma3.FAMILY, gemma3.GEMMA2, phi3.FAMILY, mixtral.FAMILY,
                                qwen3_moe.FAMILY, gpt_oss.FAMILY)


def supported() -> str:
    """What jaxmap reads, for error messages."""
    types = ", ".join(t for f in FAMILIES for t in f.model_types)
    labels = "; ".join(f.label for f in FAMILIES)
    return f"{types} ({labels})"


def family_of(config: ModelConfig | str) -> Family:
    """The family of a config (or of a Hugging Face ``model_type``)."""
    model_type = config if isinstance(config, str) else config.architecture
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UserError(f"unsupported architecture {model_type!r}; jaxmap supports {supported()}")


def family_for_gguf(arch: str, where: str, get: Callable[[str, Any], Any] | None = None) -> Family:
    """The family that reads GGUF files of ``general.architecture = arch``; ``get(key, default)`` reads the file's
    metadata, for families that claim files by more than the architecture (Mixtral: ``llama`` with experts)."""
    if get is not None:
        for family in FAMILIES:
            if family.gguf_claims is not None and family.gguf_claims(arch, get):
                return family
    for family in FAMILIES:
        if arch in family.gguf_architectures:
            return family
    archs = ", ".join(a for f in FAMILIES for a in f.gguf_architectures)
    raise UserError(f"{where}: unsupported GGUF architecture {arch!r}; jaxmap reads {archs} GGUF files "
                    f"({'; '.join(f.label for f in FAMILIES)})")


def config_from_hf(raw: Mapping[str, Any], name: str = "") -> ModelConfig:
    """A Hugging Face ``config.json`` (as a dict) read by the family that claims its ``model_type`` or
    ``architectures``."""
    wrapper = wrapper_of(raw)
    if wrapper is not None:
        raw = wrapper.text_config(raw, name or "model config")
    model_type = raw.get("model_type")
    if model_type is None:
        archs = raw.get("architectures") or []
        model_type = next((f.architectures[a] for a in archs for f in FAMILIES if a in f.architectures), None)
    family = next((f for f in FAMILIES if model_type in f.model_types), None)
    if family is None:
        what = model_type or ", ".join(raw.get("architectures") or []) or "unknown"
        raise UserError(f"unsupported architecture {what!r}; jaxmap supports {supported()}")
    return family.read_config({**raw, "model_type": model_type}, name)


def wrapper_of(raw: Mapping[str, Any]) -> Wrapper | None:
    """The wrapping checkpoint format a ``config.json`` is in (Gemma 3's multimodal one), or None for a plain text
    model's config."""
    return next((w for f in FAMILIES for w in f.wrappers if w.claims(raw)), None)


def read_config_json(path: str | Path) -> ModelConfig:
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
    return config_from_hf(raw, name=path.parent.name)


def preset_config(name: str) -> ModelConfig:
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
    return config_from_hf(raw, name=path.stem)


def gguf_name_to_hf(gguf_name: str) -> str | None:
    """A GGUF tensor name in Hugging Face terms by the first family that knows it (for files that name no
    architecture, such as llama.cpp's importance matrices)."""
    return next((hf for f in FAMILIES if (hf := f.gguf_to_hf(gguf_name)) is not None), None)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    return family_of(config).to_hf(config)


def layer_param_specs(config: ModelConfig, layer: int) -> dict[str, ParamSpec]:
    return family_of(config).layer_params(config, layer)


def outer_param_specs(config: ModelConfig) -> dict[str, ParamSpec]:
    return family_of(config).outer_params(config)


def model_tensor_names(config: ModelConfig) -> set[str]:
    """Every tensor name the model reads from its file (Hugging Face names)."""
    names = {s.hf_name for s in outer_param_specs(config).values()}
    return names | {s.hf_name for i in range(config.num_hidden_layers) for s in layer_param_specs(config, i).values()}


def missing_tensors(config: ModelConfig, present: set[str]) -> list[ParamSpec]:
    """The tensors a model of this config reads that ``present`` (Hugging Face names as stored) lacks, in model
    order; a missing fused tensor once, under its stored names."""
    specs = [*outer_param_specs(config).values()]
    specs += [s for i in range(config.num_hidden_layers) for s in layer_param_specs(config, i).values()]
    out, seen = [], set()
    strided = interleaved_parts(config)
    for s in specs:
        if s.hf_name in present and s.hf_name in strided:  # a part the source holds (MXFP4 experts: not the whole)
            continue
        if s.hf_name in strided:  # present when its stored tensor is; named by it when not
            name = strided[s.hf_name][0]
            if name not in present and name not in seen:
                seen.add(name)
                out.append(dataclasses.replace(s, hf_name=name))
            continue
        name = s.stored or s.hf_name
        if name not in present and name not in seen:
            seen.add(name)
            out.append(dataclasses.replace(s, hf_name=s.stored, gguf_name=s.stored_gguf) if s.stored else s)
    return out


def interleaved_parts(config: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """Tensors declared as interleaved columns of a stored one (gpt-oss's gate and up in ``gate_up_proj``): part
    name -> (stored name, first column, step) along the last axis."""
    return family_of(config).interleaved_parts(config)


def fused_parts(config: ModelConfig) -> dict[str, tuple[str, int, int, int]]:
    """Tensors declared as rows of a stored fused one: part name -> (stored name, first row, end row, the stored
    tensor's rows); what every weight source presents as tensors of their own."""
    return family_of(config).fused_parts(config)


def stacked_experts(config: ModelConfig) -> dict[str, list[str]]:
    """Stacked expert tensors (``...experts.w1``, jaxmap's ``[E, in, out]``) -> the per-expert Hugging Face tensors
    they stack (``...experts.{e}.w1.weight``, each ``[out, in]``), as Mixtral's and Qwen3-MoE's checkpoints store
    them; empty for a dense model."""
    out: dict[str, list[str]] = {}
    for i in range(config.num_hidden_layers):
        for spec in layer_param_specs(config, i).values():
            if spec.role == "expert":
                prefix, proj = spec.hf_name.rsplit(".experts.", 1)
                out[spec.hf_name] = [f"{prefix}.experts.{e}.{proj}.weight" for e in range(config.num_experts)]
    return out


def param_count(config: ModelConfig) -> int:
    layers = sum(s.size for i in range(config.num_hidden_layers) for s in layer_param_specs(config, i).values())
    return layers + sum(s.size for s in outer_param_specs(config).values())
