"""gpt-oss's harmony chat format: the channel parser on hand-written replies (whole and split at every possible
boundary), the real gpt-oss chat template with ``reasoning_effort``, stop tokens, and the CLI and server end to end
on the tiny random gpt-oss model with a tokenizer that has harmony's special tokens (tests/data/harmony,
written by tests/reference/make_harmony_tokenizer.py; chat_template.jinja there is gpt-oss-20b's own).

Random weights do not write harmony, so the end-to-end tests do not expect channels: they check that the server's
and the CLI's split of whatever the model wrote is the parser's split of the raw ids (special tokens kept), and that
generation ends at the first ``<|return|>``/``<|call|>``/eos of the unstopped greedy run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from live_server import live_server

from jaxmap.errors import UserError
from jaxmap.loading.harmony import HarmonyParser, HarmonyStream, check_reasoning_effort, parse, parse_header
from jaxmap.loading.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"
HARMONY = DATA / "harmony"
TEMPLATE = (HARMONY / "chat_template.jinja").read_text()

ANALYSIS_FINAL = ("<|channel|>analysis<|message|>User asks 2+2. Easy.<|end|>"
                  "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>")
TOOL_CALL = ("<|channel|>analysis<|message|>Need the weather.<|end|>"
             "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
             '{"location": "Tokyo"}<|call|>')
REPLIES = [
    ANALYSIS_FINAL,
    "<|channel|>final<|message|>Only the answer.<|return|>",
    TOOL_CALL,
    "<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant to=functions.f<|channel|>commentary json"
    "<|message|>{}<|call|>",
    "plain text, no harmony <|at all",
    "<|channel|>analysis<|message|>cut off mid-thou",
    "plain " * 60 + "<|message|>then a marker<|end|>",
]


# ---- the parser ------------------------------------------------------------------------------------------------------
def test_analysis_and_final():
    reply = parse(ANALYSIS_FINAL)
    assert (reply.reasoning, reply.content, reply.tool_calls) == ("User asks 2+2. Easy.", "2 + 2 = 4.", [])


def test_only_final_and_stops_at_return():
    parser = HarmonyParser()
    reply = parser.push("<|channel|>final<|message|>Hi.<|return|><|start|>assistant<|channel|>final<|message|>more",
                        final=True)
    assert (reply.reasoning, reply.content) == ("", "Hi.") and parser.done


def test_tool_call_ends_at_call():
    reply = parse(TOOL_CALL + "<|start|>functions.get_weather to=assistant<|message|>ignored")
    assert reply.reasoning == "Need the weather." and reply.content == ""
    [call] = reply.tool_calls
    assert (call.name, call.recipient, call.arguments, call.channel, call.content_type) == (
        "get_weather", "functions.get_weather", '{"location": "Tokyo"}', "commentary", "json")


def test_preamble_is_content_and_recipient_in_the_role_part():
    reply = parse(REPLIES[3])
    assert reply.content == "Let me check." and [c.name for c in reply.tool_calls] == ["f"]
    assert reply.tool_calls[0].content_type == "json"


def test_not_harmony_is_content_not_lost():
    assert parse("plain text <|at all").content == "plain text <|at all"
    assert parse("<|channel|>analysis<|message|>half").reasoning == "half"
    assert parse("stray<|end|>after").content == "strayafter"
    parser, long = HarmonyParser(), "no harmony here " * 20
    assert parser.push(long).content == long  # streamed once it cannot be a header, not held to the end


@pytest.mark.parametrize("header,want", [
    ("assistant<|channel|>final", ("assistant", "final", "", "")),
    ("assistant<|channel|>commentary to=functions.x <|constrain|>json", ("assistant", "commentary", "functions.x",
                                                                           "json")),
    ("assistant to=browser.search<|channel|>analysis", ("assistant", "analysis", "browser.search", "")),
])
def test_headers(header, want):
    h = parse_header(header)
    assert (h.role, h.channel, h.recipient, h.content_type) == want


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(REPLIES), st.lists(st.integers(0, 400), max_size=12))
def test_any_chunking_gives_the_same_split(reply, cuts):
    whole = parse(reply)
    parser = HarmonyParser()
    reasoning = content = ""
    calls = []
    for piece in _split(reply, cuts):
        d = parser.push(piece)
        reasoning, content, calls = reasoning + d.reasoning, content + d.content, calls + d.tool_calls
        assert "<|" not in d.reasoning + d.content or "<|at" in reply  # never half a marker
    d = parser.finish()
    assert (reasoning + d.reasoning, content + d.content, calls + d.tool_calls) == (
        whole.reasoning, whole.content, whole.tool_calls)


# ---- tokenizer, template, stop tokens --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """tests/data/tiny-gpt-oss with the harmony tokenizer and gpt-oss's chat template beside it."""
    out = tmp_path_factory.mktemp("tiny-gpt-oss-chat")
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        (out / f).symlink_to(DATA / "tiny-gpt-oss" / f)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(HARMONY / f, out / f)
    return out


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer.from_file(folder / "tokenizer.json")


def test_harmony_tokenizer_stops_at_return_and_call(tok):
    assert tok.harmony and tok.chat_template == TEMPLATE
    assert {tok.token_to_id("<|return|>"), tok.token_to_id("<|call|>")} <= set(tok.eos_token_ids)
    assert tok.eos_token_ids[0] == 2  # generation_config's eos stays the first (the template's eos_token)
    qwen = Tokenizer.from_file(DATA / "tiny-qwen3" / "tokenizer.json")
    assert not qwen.harmony


@pytest.mark.parametrize("effort", ["low", "high", None])
def test_real_template_renders_reasoning_effort(tok, effort):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    extra = {"reasoning_effort": check_reasoning_effort(effort, tok.chat_template)} if effort else {}
    text = tok.apply_chat_template(messages, **extra)
    assert text.startswith("<|start|>system<|message|>You are ChatGPT")
    assert f"Reasoning: {effort or 'medium'}\n\n# Valid channels: analysis, commentary, final." in text
    assert "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n<|end|>" in text
    assert text.endswith("<|start|>user<|message|>2+2?<|end|><|start|>assistant")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.token_to_id("<|start|>")) == 4 and tok.decode(ids, skip_special_tokens=False) == text


def test_reasoning_effort_refused_clearly(tok):
    with pytest.raises(UserError, match="one of low, medium, high"):
        check_reasoning_effort("extreme", tok.chat_template)
    qwen = Tokenizer.from_file(DATA / "tiny-qwen3" / "tokenizer.json")
    with pytest.raises(UserError, match="takes no reasoning effort"):
        check_reasoning_effort("low", qwen.chat_template)


def test_stream_over_token_ids(tok):
    stream = HarmonyStream(tok)
    out = [stream.push(i) for i in tok.encode(TOOL_CALL, add_special_tokens=False)] + [stream.finish()]
    assert "".join(d.reasoning for d in out) == "Need the weather."
    assert [c.arguments for d in out for c in d.tool_calls] == ['{"location": "Tokyo"}']


# ---- end to end ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(folder):
    import jaxmap

    return jaxmap.load(str(folder), dtype="float32", max_seq_len=1024, max_batch_size=2, progress=False,
                       devices="0", tp=1)


NEW = 80
PROMPTS = ["What is 2+2?", "Hi", "Tell me a story", "x", "Why is the sky blue?", "Name a colour", "ok", "2+2?"]


def _reference(model, prompt: str, effort: str | None = None):
    """The unstopped greedy reply, cut at its first stop token, and the parser's split of it."""
    ids = model.encode(prompt, chat=True, reasoning_effort=effort)
    raw = model.generate([ids], max_new_tokens=NEW, stop_at_eos=False)[0].token_ids
    stops = model.eos_ids()
    cut = next((i for i, t in enumerate(raw) if t in stops), len(raw))
    return ids, raw[:cut], parse(model.tokenizer.decode(raw[:cut], skip_special_tokens=False))


@pytest.fixture(scope="module")
def stopping(model):
    """A prompt whose greedy reply hits a stop token within NEW tokens when there is one (the template's date
    changes the prompt daily), else the first."""
    first = None
    for p in PROMPTS:
        ref = _reference(model, p)
        first = first or (p, ref)
        if len(ref[1]) < NEW:
            return p, ref
    return first


def test_generate_api_splits_and_stops(model, stopping):
    prompt, (ids, cut, reply) = stopping
    result = model.generate([prompt], max_new_tokens=NEW, chat=True)[0]
    assert result.token_ids == cut and result.finish_reason == ("eos" if len(cut) < NEW else "length")
    assert (result.text, result.reasoning) == (reply.content, reply.reasoning)
    assert result.to_json()["reasoning"] == reply.reasoning




@pytest.fixture(scope="module")
def served(model):
    pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from jaxmap.serving.app import Server

    server = Server(model, "tiny-gpt-oss", 2, max_queue=8)
    with live_server(server.app) as base:
        yield base


def _post(base: str, body: dict):
    import httpx

    return httpx.post(base + "/v1/chat/completions", json=body, timeout=120)


def test_server_splits_channels_and_honours_stop_tokens(model, served, stopping):
    prompt, (ids, cut, reply) = stopping
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": NEW, "temperature": 0}
    r = _post(served, body)
    assert r.status_code == 200, r.text
    out = r.json()
    choice = out["choices"][0]
    assert out["usage"]["prompt_tokens"] == len(ids) and out["usage"]["completion_tokens"] == len(cut)
    want_finish = ("tool_calls" if reply.tool_calls else "stop") if len(cut) < NEW else "length"
    assert choice["finish_reason"] == want_finish
    assert choice["message"]["content"] == reply.content
    assert choice["message"].get("reasoning_content", "") == reply.reasoning

    with __import__("httpx").stream("POST", served + "/v1/chat/completions", json={**body, "stream": True},
                                    timeout=120) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == reply.content
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == reply.reasoning
    assert chunks[-1]["choices"][0]["finish_reason"] == want_finish


def test_server_reasoning_effort_reaches_the_template(model, served):
    messages = [{"role": "user", "content": "Hi"}]
    tokens = {}
    for effort in ("low", "high"):
        r = _post(served, {"messages": messages, "max_tokens": 1, "reasoning_effort": effort})
        assert r.status_code == 200, r.text
        tokens[effort] = r.json()["usage"]["prompt_tokens"]
        assert tokens[effort] == len(model.encode("Hi", chat=True, reasoning_effort=effort))
    assert tokens["high"] - tokens["low"] == 1  # one character a token: "high" is one longer than "low"
    r = _post(served, {"messages": messages, "reasoning_effort": "extreme"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort"
    openai = pytest.importorskip("openai")  # the official client sends the field as it is
    client = openai.OpenAI(base_url=served + "/v1", api_key="none", max_retries=0)
    out = client.chat.completions.create(model="tiny-gpt-oss", messages=messages, max_tokens=1,
                                         reasoning_effort="high")
    assert out.usage.prompt_tokens == tokens["high"]


@pytest.fixture
def main(run_main):
    from jaxmap.cli.generate import main as generate_main

    return lambda *args: run_main(generate_main, *args)


def test_cli(folder, model, main, stopping):
    prompt, (_, cut, reply) = stopping
    out = main("--model", folder, "--dtype", "float32", "--devices", "0", "--tp", "1", "--chat", "-p", prompt,
               "--max-new-tokens", NEW, "--max-seq-len", 1024, "-q", "--show-reasoning", "--reasoning-effort",
               "medium")
    assert out.returncode == 0, out.stderr
    assert out.stdout == reply.content + "".join(f"\n[tool call {c.name}: {c.arguments}]\n"
                                                 for c in reply.tool_calls) + "\n"
    assert reply.reasoning in out.stderr
    out = main("--model", folder, "--dtype", "float32", "--devices", "0", "--tp", "1", "--chat", "-p", prompt,
               "--max-new-tokens", NEW, "--max-seq-len", 1024, "-q", "--json")
    row = json.loads(out.stdout)
    assert (row["text"], row["reasoning"], row["token_ids"]) == (reply.content, reply.reasoning, cut)
    bad = main("--model", folder, "--chat", "-p", "hi", "--reasoning-effort", "extreme")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    for args in (("--model", folder, "-p", "hi", "--reasoning-effort", "low"),
                 ("--model", DATA / "tiny-qwen3", "--chat", "-p", "hi", "--reasoning-effort", "low")):
        bad = main(*args)
        assert bad.returncode == 2 and bad.stderr.count("error:") == 1, bad.stderr


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "description": "the city"}},
                                                "required": ["city"]}}}


def test_server_tools_and_tool_turns_reach_the_template(model, served):
    from jaxmap.loading.harmony import template_messages, template_tools

    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "reasoning_content": "Need Paris.", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    text = model.tokenizer.apply_chat_template(template_messages(messages), tools=template_tools([WEATHER]))
    assert "namespace functions {\n\n// Weather in a city\ntype get_weather = (_: {\n// the city\ncity: string" in text
    assert ('<|start|>assistant<|channel|>analysis<|message|>Need Paris.<|end|>'
            '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}'
            '<|call|><|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"sunny"<|end|>') in text
    r = _post(served, {"messages": messages, "tools": [WEATHER], "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(model.tokenizer.encode(text, add_special_tokens=False))
    r = _post(served, {"messages": messages[:1], "tools": [{"type": "function", "function": {}}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    r = _post(served, {"messages": [{"role": "user", "content": None}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_stream_shapes_tool_calls(model):
    """The server's SSE shaping of a harmony reply with a tool call: the reply's text is hand-written and fed as
    the batcher's token events (the random model does not write one), everything after that is the server's."""
    import asyncio

    from jaxmap.serving.app import Server
    from jaxmap.serving.batcher import Request

    server = Server(model, "tiny-gpt-oss", 1)
    job = Request([1], 10, sampling=None, stop=[], emit=lambda ev: None, keep_special=True)
    pieces = _split(TOOL_CALL[:-len("<|call|>")], [5, 17, 40, 41, 90, 120])  # <|call|> itself ends generation

    async def run():
        events: asyncio.Queue = asyncio.Queue()
        for piece in pieces:
            events.put_nowait((0, {"type": "token", "token": 0, "text": piece, "logprob": None}))
        events.put_nowait((0, {"type": "done", "finish_reason": "stop", "text": ""}))
        return [c async for c in server._stream([job], events, {"id": "x", "created": 0, "model": "m"}, True, False)]

    chunks = [json.loads(c[6:]) for c in asyncio.run(run()) if c.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Need the weather."
    assert "".join(d.get("content") or "" for d in deltas) == ""
    [call] = [t for d in deltas for t in d.get("tool_calls", [])]
    assert call["index"] == 0 and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"location": "Tokyo"}'}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
