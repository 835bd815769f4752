"""The OpenAI-compatible server against the real ``openai`` client, on 127.0.0.1, one server per module."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import pytest
from live_server import live_server

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

TINY = Path(__file__).parent / "data" / "tiny-qwen3"
BATCH = 8




@pytest.fixture(scope="module")
def served():
    import jaxmap
    from jaxmap.serving.app import Server

    model = jaxmap.load(str(TINY), max_seq_len=256, max_batch_size=BATCH, progress=False)
    server = Server(model, "tiny", BATCH, max_queue=64)
    with live_server(server.app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        yield model, server, client, base


def _offline(model, prompt: str, n: int) -> str:
    return model.generate([prompt], max_new_tokens=n)[0].text


def test_completion_matches_offline_greedy(served):
    model, _, client, _ = served
    out = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0)
    assert out.choices[0].text == _offline(model, "Hello there", 12)
    assert out.usage.prompt_tokens == len(model.encode("Hello there"))
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 12


def test_streamed_completion_and_usage(served):
    model, _, client, _ = served
    stream = client.completions.create(model="tiny", prompt="Once upon", max_tokens=10, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == _offline(model, "Once upon", 10)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_chat_streamed_and_not(served):
    model, _, client, _ = served
    messages = [{"role": "user", "content": "Say hi"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
    ids = model.encode("Say hi", chat=True)
    assert out.usage.prompt_tokens == len(ids)
    expected = model.generate([ids], max_new_tokens=8)[0].text
    message = out.choices[0].message
    assert (getattr(message, "reasoning_content", None) or "") + (message.content or "") in (expected,
                                                                                               expected.strip())
    parts = [c.choices[0].delta.content or "" for c in
             client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, stream=True)
             if c.choices]
    assert "".join(parts) == (message.content or "")


def test_stop_string(served):
    model, _, client, _ = served
    full = _offline(model, "The cat", 20)
    stop = full[3:6] if len(full) > 6 else None
    if not stop or not stop.strip():
        pytest.skip("offline text too short to pick a stop string")
    out = client.completions.create(model="tiny", prompt="The cat", max_tokens=20, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == full[:full.find(stop)]


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400),
    (b'{"prompt": "\xff\xfe"}', 400),
    (b'{"model": "nope", "prompt": "hi"}', 404),
    (b'{"prompt": "hi", "max_tokens": -3}', 400),
    (b'{"prompt": "hi", "max_tokens": 100000}', 400),
    (b'{"prompt": "hi", "best_of": 3}', 400),
    (b'{"prompt": "hi", "n": 1, "user": "x", "presence_penalty": 0}', 200),
    (b'{"prompt": "hi", "n": 0}', 400),
    (b'{"prompt": ["a", "b"], "n": 9}', 400),
    (b'{"prompt": [[1, 2], 3]}', 400),
    (b'{"prompt": [1, 99999]}', 400),
])
def test_bad_requests_are_error_objects(served, body, status):
    _, _, _, base = served
    r = httpx.post(base + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    if status != 200:
        assert "message" in r.json()["error"]
    assert httpx.get(base + "/health").status_code == 200


def test_prompt_list_and_n(served):
    """Several prompts and ``n`` copies of each: choice ``i * n + j``, each offline generation's text; usage counts
    each prompt once; streamed, the chunks carry their choice's index."""
    model, _, client, _ = served
    prompts = ["The sky is", "My name is"]
    expected = [_offline(model, p, 6) for p in prompts]
    out = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=6)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [expected[0], expected[0], expected[1], expected[1]]
    assert out.usage.prompt_tokens == sum(len(model.encode(p)) for p in prompts)
    parts: dict[int, list[str]] = {}
    for c in client.completions.create(model="tiny", prompt=prompts, max_tokens=6, stream=True):
        for choice in c.choices:
            parts.setdefault(choice.index, []).append(choice.text)
    assert {i: "".join(t) for i, t in parts.items()} == {0: expected[0], 1: expected[1]}
    sampled = [[c.text for c in client.completions.create(model="tiny", prompt="Once", n=3, max_tokens=8,
                                                          temperature=1.0, seed=5).choices] for _ in range(2)]
    assert len(set(sampled[0])) > 1  # each copy draws its own samples
    assert sampled[0] == sampled[1]  # and the same ones for the same seed


def test_chat_logprobs(served):
    """Chat ``logprobs`` / ``top_logprobs``: one entry per generated token, the greedy token first among the
    alternatives, the first one equal to ``forward_logits``' at the prompt's end."""
    import numpy as np

    model, _, client, _ = served
    messages = [{"role": "user", "content": "Count"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, logprobs=True,
                                         top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    ids = model.encode("Count", chat=True)
    logits = model.forward_logits([ids])[0][-1].astype(np.float64)
    lp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    assert content[0].logprob == pytest.approx(lp.max(), abs=1e-4)
    message = out.choices[0].message
    assert "".join(e.token for e in content) in ((getattr(message, "reasoning_content", None) or "")
                                                 + (message.content or ""),
                                                 model.generate([ids], max_new_tokens=5)[0].text)
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, logprobs=True, stream=True) if c.choices]
    assert sum(len(lp.content) for lp in streamed if lp) == len(content)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=messages, top_logprobs=2)


def test_empty_messages_and_models(served):
    _, _, client, base = served
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    assert [m.id for m in client.models.list()] == ["tiny"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")


def test_load_32_streams_some_cancelled(served):
    model, server, client, base = served
    prompts = [f"Story number {i}:" for i in range(32)]
    expected = {i: _offline(model, p, 14) for i, p in enumerate(prompts) if i % 4}  # batch-1 offline greedy

    def one(i):
        stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=14, stream=True)
        text = []
        for n, c in enumerate(stream):
            if c.choices:
                text.append(c.choices[0].text)
            if i % 4 == 0 and n == 2:
                stream.close()  # cancels midway
                return i, None
        return i, "".join(text)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = dict(pool.map(one, range(32)))
    for i, text in expected.items():
        assert results[i] == text, i
    for _ in range(100):
        if server.batcher.in_use() == 0:
            break
        time.sleep(0.05)
    page = httpx.get(base + "/metrics").text
    assert "jaxmap_batch_slots_in_use 0" in page
    assert "jaxmap_kv_slots_in_use 0" in page
    assert "jaxmap_queue_depth 0" in page
    assert "jaxmap_time_to_first_token_seconds_count" in page


def test_logprobs_and_echo_match_forward_logits(served):
    import numpy as np

    model, _, client, _ = served
    out = client.completions.create(model="tiny", prompt="Hello world again", max_tokens=1, echo=True, logprobs=2,
                                    temperature=0)
    ids = model.encode("Hello world again")
    logits = model.forward_logits([ids])[0].astype(np.float64)
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    got = out.choices[0].logprobs.token_logprobs
    assert got[0] is None and len(got) == len(ids) + 1
    np.testing.assert_allclose(got[1:len(ids)], [lp[j - 1, ids[j]] for j in range(1, len(ids))], atol=1e-4)
    np.testing.assert_allclose(got[len(ids)], lp[-1].max(), atol=1e-4)  # greedy: the top token's log-probability
    assert out.choices[0].text.startswith(model.tokenizer.decode(ids))
    assert len(out.choices[0].logprobs.top_logprobs[-1]) <= 2


def test_full_queue_is_429(served):
    from starlette.testclient import TestClient

    from jaxmap.engine.sampling import SamplingParams
    from jaxmap.serving.app import Server
    from jaxmap.serving.batcher import Request

    model = served[0]
    idle = Server(model, "tiny", 1, max_queue=1)  # its batcher never starts: the queue stays full
    idle.batcher.submit(Request([1, 2], 4, SamplingParams(), [], emit=lambda ev: None))
    r = TestClient(idle.app).post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
