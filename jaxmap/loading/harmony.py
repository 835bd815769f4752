"""OpenAI's "harmony" chat format (gpt-oss): which tokenizers speak it, their stop tokens, ``reasoning_effort``, and
a streaming parser that splits a reply into its channels.

A harmony conversation is a run of messages ``<|start|>{header}<|message|>{body}<|end|>``. The header holds the
author (``assistant``, ``user``, ``functions.get_weather``...), then optionally a recipient (``to=functions.x``),
``<|channel|>{analysis|commentary|final}`` and a content type (``<|constrain|>json`` or a bare ``json``). The chat
template ends the prompt with ``<|start|>assistant``; the model then writes, for example::

    <|channel|>analysis<|message|>Let me think.<|end|><|start|>assistant<|channel|>final<|message|>4.<|return|>

and ends its turn with ``<|return|>`` (a final answer) or ``<|call|>`` (a tool call, to be answered by the caller).

:class:`HarmonyParser` reads that text (special tokens kept, as ``decode(..., skip_special_tokens=False)`` gives
it) in pieces of any size and returns what each piece added: the analysis channel as *reasoning*, the final channel
and commentary meant for the user (a preamble, no recipient) as *content*, and messages with a recipient as *tool
calls* once each is complete. Text the model wrote outside any message, or a header it never finished, ends up in
content, so nothing the model wrote is lost. A tokenizer is harmony when it has every one of the format's special
tokens (:func:`is_harmony`); nothing here looks at a model's name. Pure Python, no jax.
"""

from __future__ import annotations

import dataclasses
import re

from jaxmap.errors import UserError

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
RETURN, CALL, CONSTRAIN = "<|return|>", "<|call|>", "<|constrain|>"
MARKERS = (START, END, MESSAGE, CHANNEL, RETURN, CALL, CONSTRAIN)
#: the tokens that end the assistant's turn (``<|return|>`` after a final answer, ``<|call|>`` after a tool call)
STOP_TOKENS = (RETURN, CALL)
REASONING_EFFORTS = ("low", "medium", "high")
MAX_HEADER = 256  # characters of header text without <|message|> after which it is taken as plain content


def is_harmony(tokenizer) -> bool:
    """Whether ``tokenizer`` (anything with ``token_to_id``) has all of harmony's special tokens."""
    return tokenizer is not None and all(tokenizer.token_to_id(m) is not None for m in MARKERS)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a harmony reply (none for other tokenizers): gpt-oss's generation_config lists ``<|return|>``
    but not ``<|call|>``, and a tool call must stop generation too."""
    if not is_harmony(tokenizer):
        return []
    return [tokenizer.token_to_id(t) for t in STOP_TOKENS]


def check_reasoning_effort(value, chat_template: str | None) -> str | None:
    """``value`` if it is a reasoning effort the template takes; ``None`` passes. A template that never reads
    ``reasoning_effort`` (anything but a harmony one) is refused rather than silently ignored."""
    if value is None:
        return None
    if value not in REASONING_EFFORTS:
        raise UserError(f"reasoning effort must be one of {', '.join(REASONING_EFFORTS)}, got {value!r}")
    if not chat_template or "reasoning_effort" not in chat_template:
        raise UserError("this model's chat template takes no reasoning effort (only harmony templates, gpt-oss's, "
                        "read one): drop --reasoning-effort / reasoning_effort")
    return value


@dataclasses.dataclass
class ToolCall:
    recipient: str  # e.g. "functions.get_weather", "browser.search", "python"
    arguments: str  # the message body as written (JSON when content_type says so)
    channel: str = ""
    content_type: str = ""  # "json" from ``<|constrain|>json``, or empty

    @property
    def name(self) -> str:
        """The function's name as OpenAI's API gives it: ``functions.`` dropped, other namespaces kept."""
        return self.recipient[len("functions."):] if self.recipient.startswith("functions.") else self.recipient


@dataclasses.dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)

    def __iadd__(self, other: Delta) -> Delta:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)
        return self


@dataclasses.dataclass
class Header:
    role: str = ""
    channel: str = ""
    recipient: str = ""
    content_type: str = ""


_RECIPIENT = re.compile(r"\bto=(\S+?)(?=\s|<\||$)")


def parse_header(text: str) -> Header:
    """``assistant<|channel|>commentary to=functions.f <|constrain|>json`` -> its parts."""
    head, _, rest = text.partition(CHANNEL)
    head_words = head.split()
    role = next((w for w in head_words if not w.startswith("to=")), "")
    found = _RECIPIENT.search(text)
    recipient = found.group(1) if found else ""
    channel_part, _, constrain = rest.partition(CONSTRAIN)
    words = [w for w in channel_part.split() if not w.startswith("to=")]
    channel = words[0] if words else ""
    content_type = constrain.strip() or (words[1] if len(words) > 1 else "")
    return Header(role, channel, recipient, content_type)


class HarmonyParser:
    """Streaming splitter of a harmony reply. ``push(piece)`` returns the :class:`Delta` the piece completed;
    ``push("", final=True)`` (or :meth:`finish`) flushes what is held back. Construct it in ``header`` state (the
    default) for replies that follow a prompt ending in ``<|start|>assistant``."""

    def __init__(self, role: str = "assistant"):
        self._buf = ""  # unread text
        self._state = "header"  # header -> body -> (between -> header ...) ; done after <|return|> / <|call|>
        self._prefix = role  # the header's start that the prompt already wrote (its first message only)
        self._header_text = ""
        self._header: Header | None = None
        self._body = ""  # a tool call's body, collected until its message ends
        self.done = False
        self.tool_calls: list[ToolCall] = []

    def finish(self) -> Delta:
        return self.push("", final=True)

    def push(self, piece: str, final: bool = False) -> Delta:
        out = Delta()
        self._buf += piece
        while self._buf and not self.done:
            at, marker = _next_marker(self._buf)
            if marker is None:  # no whole marker: take the text, but hold back what may start one
                keep = 0 if final else _partial_marker(self._buf)
                self._text(self._buf[:len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep:]
                break
            self._text(self._buf[:at], out)
            self._buf = self._buf[at + len(marker):]
            self._marker(marker, out)
        if final:
            self._end_of_stream(out)
        return out

    # ---- states --------------------------------------------------------------------------------------------------
    def _text(self, text: str, out: Delta) -> None:
        if not text:
            return
        if self._state == "header":
            self._header_text += text
            if len(self._header_text) > MAX_HEADER:  # no header is this long: the model is not writing harmony
                out.content += self._header_text
                self._state, self._header_text = "between", ""
        elif self._state == "body":
            kind = self._route()
            if kind == "tool":
                self._body += text
            elif kind == "reasoning":
                out.reasoning += text
            else:
                out.content += text
        else:  # between messages: stray text, shown rather than dropped
            out.content += text

    def _marker(self, marker: str, out: Delta) -> None:
        if marker == START:
            self._end_message(out)
            self._state, self._header_text, self._prefix = "header", "", ""
        elif marker == MESSAGE and self._state == "header":
            header = parse_header(self._prefix + self._header_text)
            self._header, self._state, self._body, self._prefix = header, "body", "", ""
        elif marker in (CHANNEL, CONSTRAIN) and self._state == "header":
            self._header_text += marker  # part of the header; parse_header reads it
        elif marker in (END, RETURN, CALL):
            self._end_message(out)
            self._state = "between"
            self.done = marker in STOP_TOKENS
        # a marker out of place (<|channel|> inside a body, <|message|> twice) is dropped: it carries no text

    def _route(self) -> str:
        h = self._header or Header()
        if h.recipient and h.recipient != "user" and not h.recipient.startswith("assistant"):
            return "tool"
        return "reasoning" if h.channel == "analysis" else "content"

    def _end_message(self, out: Delta) -> None:
        if self._state == "body" and self._route() == "tool":
            h = self._header
            call = ToolCall(h.recipient, self._body, h.channel, h.content_type)
            self.tool_calls.append(call)
            out.tool_calls.append(call)
        elif self._state == "header" and self._header_text.strip():
            out.content += self._header_text  # a header never closed by <|message|>: not harmony after all
        self._state, self._header, self._body = "between", None, ""

    def _end_of_stream(self, out: Delta) -> None:
        if not self.done:
            self._end_message(out)


def parse(text: str) -> Delta:
    """The whole reply at once."""
    parser = HarmonyParser()
    return parser.push(text, final=True)


def _next_marker(text: str) -> tuple[int, str | None]:
    best, which = len(text), None
    for m in MARKERS:
        at = text.find(m)
        if 0 <= at < best:
            best, which = at, m
    return best, which


def _partial_marker(text: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a marker."""
    at = text.find("<", max(0, len(text) - max(len(m) for m in MARKERS) + 1))
    while at >= 0:
        tail = text[at:]
        if any(m.startswith(tail) for m in MARKERS):
            return len(tail)
        at = text.find("<", at + 1)
    return 0


class HarmonyStream:
    """:class:`HarmonyParser` over token ids: decodes them with special tokens kept (whole characters only)."""

    def __init__(self, tokenizer):
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=False)
        self.parser = HarmonyParser()

    def push(self, token_id: int) -> Delta:
        return self.parser.push(self.decoder.push(token_id))

    def finish(self) -> Delta:
        return self.parser.push(self.decoder.flush(), final=True)


# ---- OpenAI-style requests -> the template's inputs ------------------------------------------------------------------
def template_tools(tools) -> list[dict]:
    """OpenAI's ``tools`` (``[{"type": "function", "function": {"name", "description", "parameters"}}]``) as
    gpt-oss's template reads them; a malformed entry is a :class:`UserError`."""
    if not isinstance(tools, list):
        raise UserError("tools must be a list of {\"type\": \"function\", \"function\": {...}} objects")
    out = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise UserError("each tool needs type \"function\" and a function with a name")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise UserError(f"tool {fn['name']!r}: parameters must be a JSON schema object")
        out.append({"type": "function", "function": {"name": fn["name"], "description": fn.get("description") or "",
                                                      "parameters": params or {}}})
    return out


def template_messages(messages: list) -> list[dict]:
    """Chat messages as gpt-oss's template reads them: an assistant turn may carry ``tool_calls`` (content then
    optional; each call's JSON ``arguments`` string decoded, the template encodes it again) and a ``tool`` turn
    answers the call before it; a tool-calling assistant turn's ``reasoning_content`` goes back as the
    template's ``thinking`` (its analysis, which harmony keeps in the prompt until the final answer).
    Every message needs a string role; content must be a string unless the message is an assistant's tool call."""
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise UserError("each message needs a string role and a string content")
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        content = m.get("content")
        if not isinstance(content, str) and not (calls and content is None):
            raise UserError("each message needs a string role and a string content")
        msg = {"role": m["role"], "content": content or ""} if isinstance(content, str) or not calls \
            else {"role": m["role"]}
        if calls:
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                      and isinstance(c["function"].get("name"), str) for c in calls):
                raise UserError("an assistant's tool_calls must be [{\"function\": {\"name\", \"arguments\"}}]")
            msg["tool_calls"] = [{"type": "function", "function": {"name": c["function"]["name"],
                                                                    "arguments": _json_or_text(
                                                                        c["function"].get("arguments", "{}"))}}
                                 for c in calls]
            thinking = m.get("reasoning_content")
            if isinstance(thinking, str) and thinking and not content:
                msg["thinking"] = thinking  # the analysis before a tool call stays in the prompt (harmony's rule)
        out.append(msg)
    return out


def _json_or_text(value):
    if not isinstance(value, str):
        return value
    import json

    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
