"""Text <-> token ids, chat templates and streaming decode, on top of the ``tokenizers`` library.

One :class:`Tokenizer` serves every weight format: a Hugging Face folder hands over its ``tokenizer.json`` (plus the
special-token settings scattered over ``tokenizer_config.json``, ``generation_config.json`` and ``config.json``); a
GGUF file has its vocabulary rebuilt into a ``tokenizers.Tokenizer`` by the GGUF source. The engine only ever sees
ids; everything that touches text lives here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers

from jaxmap.errors import UserError
from jaxmap.loading import harmony

_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the model's special tokens and chat template."""

    def __init__(
        self,
        inner: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        pad_token_id: int | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
    ):
        self.inner = inner
        self.bos_token_id = bos_token_id
        #: speaks OpenAI's harmony chat format (gpt-oss): has its special tokens (see :mod:`jaxmap.loading.harmony`)
        self.harmony = harmony.is_harmony(inner)
        # harmony's turn-ending tokens stop generation too (gpt-oss's generation_config lists <|return|>, not
        # <|call|>); appended, so the first eos (the template's ``eos_token``, the default pad) stays as declared
        eos_token_ids = [*eos_token_ids, *harmony.stop_token_ids(inner)]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.pad_token_id = pad_token_id if pad_token_id is not None else (
            self.eos_token_ids[0] if self.eos_token_ids else None)
        self.chat_template = chat_template or None
        # Only honoured when the tokenizer's own post-processor did not already put the BOS in front.
        self.add_bos = add_bos

    # ---- constructors --------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path, config_eos: Sequence[int] = (), config_bos: int | None = None) -> Tokenizer:
        """Load ``tokenizer.json``; special tokens and template come from the sibling Hugging Face json files."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"cannot read {path}: no such file")
        try:
            inner = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exceptions for malformed json
            raise UserError(f"{path} is not a valid tokenizer.json: {exc}") from None
        folder = path.parent
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        gen_cfg = _read_json(folder / "generation_config.json")
        model_cfg = _read_json(folder / "config.json")

        def token_id(value: Any) -> int | None:
            if isinstance(value, Mapping):
                value = value.get("content")
            return inner.token_to_id(value) if isinstance(value, str) else None

        eos: list[int] = []
        for raw in (gen_cfg.get("eos_token_id"), model_cfg.get("eos_token_id")):
            eos.extend(_as_ids(raw))
        eos.extend(config_eos)
        tok_eos = token_id(tok_cfg.get("eos_token"))
        if tok_eos is not None:
            eos.append(tok_eos)

        bos = token_id(tok_cfg.get("bos_token"))
        if bos is None:
            for raw in (gen_cfg.get("bos_token_id"), model_cfg.get("bos_token_id"), config_bos):
                ids = _as_ids(raw)
                if ids:
                    bos = ids[0]
                    break
        pad = token_id(tok_cfg.get("pad_token"))
        if pad is None and _as_ids(gen_cfg.get("pad_token_id")):
            pad = _as_ids(gen_cfg.get("pad_token_id"))[0]

        template = _pick_template(tok_cfg.get("chat_template"))
        jinja_file = folder / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        if template is None:
            template = _pick_template(_read_json(folder / "chat_template.json").get("chat_template"))
        return cls(inner, bos_token_id=bos, eos_token_ids=eos, pad_token_id=pad, chat_template=template,
                   add_bos=bool(tok_cfg.get("add_bos_token", False)))

    # ---- ids <-> text --------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.inner.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.inner.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the BOS goes in front when the model wants one."""
        check_utf8(text)
        ids = list(self.inner.encode(text, add_special_tokens=add_special_tokens).ids)
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.inner.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """An incremental decoder for printing tokens as they are generated."""
        return StreamDecoder(self, skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------------------------------
    def _token_text(self, token_id: int | None) -> str:
        return (self.inner.id_to_token(token_id) or "") if token_id is not None else ""

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render ``messages`` with the model's jinja chat template, the way Hugging Face's transformers does."""
        if not self.chat_template:
            raise UserError("this model has no chat template: drop --chat (chat=False) and pass a plain prompt")
        template = _compile_template(self.chat_template)
        eos = self._token_text(self.eos_token_ids[0]) if self.eos_token_ids else ""
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self._token_text(self.bos_token_id), eos_token=eos, **extra)
        except _TemplateError as exc:
            raise UserError(f"the chat template refused the messages: {exc}") from None
        except Exception as exc:  # the template is the model's code: any failure inside it is the model's, not ours
            raise UserError(f"the model's chat template failed while rendering ({type(exc).__name__}: {exc}); fix "
                            f"chat_template in tokenizer_config.json, or drop --chat") from None


class StreamDecoder:
    """Turns generated ids into text pieces as soon as they form complete characters.

    Decoding one byte-level token alone can give half a UTF-8 character (shown as U+FFFD) or lose a leading space
    (SentencePiece strips it at the start of a text), so each step decodes a short window of recent tokens and emits
    only what the window added, holding back text that still ends in U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: tokens before it are already printed and no longer decoded
        self._read = 0  # tokens before this index have been emitted

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._tok.decode(self._ids[start:stop], skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completed (often empty)."""
        self._ids.append(int(token_id))
        before = self._decode(self._prefix, self._read)
        now = self._decode(self._prefix)
        if len(now) > len(before) and not now.endswith(_REPLACEMENT_CHAR):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character comes out as U+FFFD)."""
        before = self._decode(self._prefix, self._read)
        now = self._decode(self._prefix)
        self._prefix = self._read = len(self._ids)
        return now[len(before):] if len(now) > len(before) else ""


# ---- helpers ---------------------------------------------------------------------------------------------------------
def check_utf8(text: str) -> None:
    """Refuse text that cannot be UTF-8: bytes that were not UTF-8 reach Python (argv, stdin) as lone surrogates,
    which the tokenizer library rejects with an opaque TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = text[exc.start]
        what = f"byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"U+{ord(char):04X}"
        raise UserError(f"the prompt is not valid UTF-8 text ({what} at character {exc.start}); pass UTF-8 "
                        f"text") from None
    except AttributeError:
        raise UserError(f"a prompt must be text, got {type(text).__name__}") from None


class _TemplateError(Exception):
    """Raised by a template's ``raise_exception(...)``."""


def _raise_exception(message: str) -> None:
    raise _TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    # transformers' tojson keeps non-ASCII text as is; jinja2's built-in one escapes it.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_TEMPLATE_CACHE: dict[str, Any] = {}


def _compile_template(source: str) -> Any:
    """A sandboxed jinja2 template (templates ship with downloaded models, so they are untrusted code)."""
    if source not in _TEMPLATE_CACHE:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            _TEMPLATE_CACHE[source] = env.from_string(source)
        except TemplateError as exc:
            raise UserError(f"the model's chat template is not valid jinja: {exc}") from None
    return _TEMPLATE_CACHE[source]


def _pick_template(value: Any) -> str | None:
    """``chat_template`` is a string, or a list of named templates of which ``default`` is the one to use."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        chosen = named.get("default") or next(iter(named.values()), None)
        return chosen if isinstance(chosen, str) else None
    return None


def _as_ids(value: Any) -> list[int]:
    """A token id field that may be an int, a list of ints or null."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _read_json(path: Path) -> dict[str, Any]:
    """A json file's object, or ``{}`` when the file is absent (these side files are all optional)."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    return raw if isinstance(raw, dict) else {}


def encode_prompt(tokenizer: Tokenizer, prompt: str, chat: bool = False,
                  reasoning_effort: str | None = None) -> list[int]:
    """Token ids of ``prompt`` (see :meth:`jaxmap.api.Model.encode`), for callers that have the tokenizer before
    the model."""
    if reasoning_effort is not None and not chat:
        raise UserError("a reasoning effort needs the chat template: pass --chat (chat=True) too")
    if chat:
        extra = {}
        if harmony.check_reasoning_effort(reasoning_effort, tokenizer.chat_template) is not None:
            extra["reasoning_effort"] = reasoning_effort
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], **extra)
        return tokenizer.encode(prompt, add_special_tokens=False)
    return tokenizer.encode(prompt)
