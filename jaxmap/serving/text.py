"""A request's generated text: decoded from all its ids (so a character split over tokens is never cut), stop
strings applied on that text, and the part that is safe to send (no half character, no possible stop prefix)."""

from __future__ import annotations

from jaxmap.loading.harmony import HarmonyParser

_REPLACEMENT = "\ufffd"


class TextTracker:
    def __init__(self, tokenizer, stop: list[str], keep_special: bool = False):
        self._tok = tokenizer
        self._skip = not keep_special  # harmony replies keep their <|channel|>... markers for HarmonySplitter
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of ``text`` already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one id; return the new text that is safe to send (empty while held back)."""
        self.ids.append(int(token_id))
        self.text = self._tok.decode(self.ids, skip_special_tokens=self._skip) if self._tok is not None else ""
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        if self.stopped:
            return self._take(len(self.text))
        safe = len(self.text)
        while safe > self.sent and self.text[safe - 1] == _REPLACEMENT:
            safe -= 1
        for s in self.stop:  # hold back a suffix that may be the start of a stop string
            for n in range(min(len(s) - 1, safe - self.sent), 0, -1):
                if self.text[safe - n:safe] == s[:n]:
                    safe -= n
                    break
        return self._take(safe)

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:upto], upto
        return piece


class ThinkSplitter:
    """Splits streamed text into (reasoning, content): what lies inside a ``<think>...</think>`` block at the start
    of the reply is reasoning (Qwen3's thinking), the rest content."""

    OPEN, CLOSE = "<think>", "</think>"
    new_calls: tuple = ()  # Qwen3's tool calls are not parsed (HarmonySplitter's are)
    calls_before = 0
    any_calls = False

    def __init__(self):
        self._buf = ""
        self._state = "start"  # start -> think -> content, or start -> content

    def push(self, piece: str, final: bool = False) -> tuple[str, str]:
        self._buf += piece
        reasoning = content = ""
        while True:
            if self._state == "start":
                stripped = self._buf.lstrip()
                if stripped.startswith(self.OPEN):
                    self._buf, self._state = stripped[len(self.OPEN):], "think"
                    continue
                if self.OPEN.startswith(stripped) and not final:
                    return reasoning, content  # may still become <think>
                self._state = "content"
                continue
            if self._state == "think":
                at = self._buf.find(self.CLOSE)
                if at >= 0:
                    reasoning += self._buf[:at]
                    self._buf, self._state = self._buf[at + len(self.CLOSE):].lstrip("\n"), "content"
                    continue
                keep = 0 if final else _partial_suffix(self._buf, self.CLOSE)
                reasoning += self._buf[:len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep:]
                return reasoning, content
            content += self._buf
            self._buf = ""
            return reasoning, content


class HarmonySplitter:
    """ThinkSplitter's counterpart for harmony replies (gpt-oss; text with its special tokens kept): the analysis
    channel is reasoning, the final channel content; ``new_calls`` holds the tool calls the last push completed,
    ``calls_before`` how many came before them."""

    def __init__(self):
        self._parser = HarmonyParser()
        self.new_calls: list = []
        self.calls_before = 0
        self.any_calls = False

    def push(self, piece: str, final: bool = False) -> tuple[str, str]:
        delta = self._parser.push(piece, final=final)
        self.calls_before += len(self.new_calls)
        self.new_calls = delta.tool_calls
        self.any_calls = self.any_calls or bool(delta.tool_calls)
        return delta.reasoning, delta.content


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
