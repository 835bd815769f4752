"""Checkpoints that wrap a family's text model with parts jaxmap leaves out (Gemma 3 4B-27B are
``Gemma3ForConditionalGeneration``: the text model, a vision tower and a multimodal projector).

A family declares each such wrapper as data: the outer ``model_type`` and class names, the key of the nested text
config, where the text model's tensors sit in the file (Hugging Face has spelled it two ways: ``language_model.model.``
in the checkpoints as published and as transformers still writes them, ``model.language_model.`` inside transformers
5), and the prefixes of what is left out. The loader renames the text model's tensors to the family's own names and
says in one log line what it skipped; the config reader reads the nested text config with the family's defaults
(published nested configs hold only the keys that differ from transformers' defaults). Pure data: imports no jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxmap.errors import UserError


@dataclasses.dataclass(frozen=True)
class Wrapper:
    """One wrapping checkpoint format of a family's text model."""

    model_type: str  # the outer config's model_type ("gemma3")
    architectures: tuple[str, ...]  # its Hugging Face classes ("Gemma3ForConditionalGeneration")
    text_model_type: str  # the text model's model_type when the nested config does not say ("gemma3_text")
    text_key: str = "text_config"
    # stored name prefix -> the text model's own prefix
    prefixes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # stored name prefix -> what that part is ("vision tower"), for the log line
    left_out: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # keys the outer config may hold for the text model (used when the nested config lacks them)
    inherited: tuple[str, ...] = ("eos_token_id", "bos_token_id", "pad_token_id", "tie_word_embeddings")

    def claims(self, raw: Mapping[str, Any]) -> bool:
        archs = raw.get("architectures") or []
        return raw.get("model_type") == self.model_type or any(a in self.architectures for a in archs)

    def text_config(self, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The nested text config as a config.json of the text model (outer keys it inherits filled in)."""
        text = raw.get(self.text_key)
        if not isinstance(text, Mapping):
            name = (raw.get("architectures") or [self.model_type])[0]
            raise UserError(f"{where}: a {name} config without a {self.text_key} object; jaxmap runs the text model "
                            f"of such checkpoints and needs its config there (re-save the checkpoint with a current "
                            "transformers, or use the text-only model's config.json)")
        out = {k: raw[k] for k in self.inherited if raw.get(k) is not None and text.get(k) is None}
        out.update(text)
        out.setdefault("model_type", self.text_model_type)
        out.pop("architectures", None)
        return out

    def text_name(self, stored: str) -> str | None:
        """A stored tensor's name in the text model's terms; None for a left-out part's tensor; the name itself for
        anything else (which the loader treats as any stray tensor)."""
        if self.part_of(stored) is not None:
            return None
        for prefix, to in self.prefixes.items():
            if stored.startswith(prefix):
                return to + stored[len(prefix):]
        return stored

    def part_of(self, stored: str) -> str | None:
        """Which left-out part a stored tensor belongs to, or None."""
        return next((what for prefix, what in self.left_out.items() if stored.startswith(prefix)), None)
