"""The batcher's admission: a long prompt is prefilled chunk by chunk between the running streams' decode steps, and a
prompt prefix another request left in the KV rows is reused (prefix caching); greedy output stays offline
generation's either way. tiny-qwen3 with 16-token prefill chunks, so prompts of a few dozen tokens span chunks."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

TINY = Path(__file__).parent / "data" / "tiny-qwen3"
CHUNK = 16
BATCH = 8


@pytest.fixture(scope="module")
def model():
    import jaxmap

    return jaxmap.load(str(TINY), max_seq_len=256, max_batch_size=BATCH, prefill_chunk=CHUNK, progress=False)


@pytest.fixture
def batcher(model):
    from jaxmap.serving.batcher import Batcher
    from jaxmap.serving.metrics import Metrics

    b = Batcher(model, BATCH, metrics=Metrics(BATCH, BATCH * model.max_seq_len))
    b.start()
    yield b
    b.stop()


class Log:
    """Every event of every request, in the order the batcher emitted them."""

    def __init__(self):
        self.events: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.done: dict[str, threading.Event] = {}

    def submit(self, batcher, tag: str, ids: list[int], n: int) -> None:
        from jaxmap.engine.sampling import SamplingParams
        from jaxmap.serving.batcher import Request

        self.done[tag] = threading.Event()

        def emit(ev):
            with self.lock:
                self.events.append((tag, ev))
            if ev["type"] in ("done", "error"):
                self.done[tag].set()

        batcher.submit(Request(list(ids), n, SamplingParams(), [], emit=emit, ignore_eos=True))

    def tokens(self, tag: str) -> list[int]:
        return [ev["token"] for t, ev in self.events if t == tag and ev["type"] == "token"]

    def final(self, tag: str) -> dict:
        assert self.done[tag].wait(120), tag
        return next(ev for t, ev in self.events if t == tag and ev["type"] in ("done", "error"))


def _ids(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(1, 512, n)]


def _offline(model, ids, n):
    return model.generate([ids], max_new_tokens=n, stop_at_eos=False)[0].token_ids


def test_long_prompt_is_prefilled_between_decode_steps(model, batcher):
    """Seven streams run; a prompt of 7 chunks joins: each of them gets a token per chunk while it is prefilled, and
    every output is offline generation's."""
    log = Log()
    short = {f"s{i}": _ids(i, 5 + i) for i in range(BATCH - 1)}
    for tag, ids in short.items():
        log.submit(batcher, tag, ids, 40)
    for _ in range(2000):
        if all(log.tokens(t) for t in short):
            break
        time.sleep(0.01)
    long_ids = _ids(99, 7 * CHUNK - 3)
    with log.lock:
        mark = len(log.events)
    log.submit(batcher, "long", long_ids, 8)
    assert log.final("long")["finish_reason"] == "length"
    first = next(i for i, (t, ev) in enumerate(log.events) if t == "long" and ev["type"] == "token")
    during = [t for t, ev in log.events[mark:first] if ev["type"] == "token"]
    for tag in short:
        assert during.count(tag) >= 6, (tag, during.count(tag))  # one decode step after each of the 7 chunks
    assert log.tokens("long") == _offline(model, long_ids, 8)
    for tag, ids in short.items():
        log.final(tag)
        assert log.tokens(tag) == _offline(model, ids, 40), tag


def test_lone_slot_decodes_at_batch_one(model, batcher):
    """A request running alone decodes in a batch-1 cache (offline generation's step); a newcomer sends it back to
    the batched cache; both outputs are offline generation's."""
    log = Log()
    alone = _ids(21, 6)
    log.submit(batcher, "alone", alone, 60)
    for _ in range(2000):
        if len(log.tokens("alone")) >= 5:
            break
        time.sleep(0.01)
    assert batcher.solo is not None and batcher.slots[batcher.solo[0]].request.prompt_ids == alone
    solo_steps = batcher.metrics.decode_steps["solo"]
    assert solo_steps >= 4
    other = _ids(22, 2 * CHUNK + 3)
    log.submit(batcher, "other", other, 10)
    log.final("other")
    assert batcher.metrics.decode_steps["batch"] >= 9  # both ran in the batch
    log.final("alone")
    assert batcher.metrics.decode_steps["solo"] > solo_steps  # alone again after the other left
    assert log.tokens("alone") == _offline(model, alone, 60)
    assert log.tokens("other") == _offline(model, other, 10)
    assert batcher.solo is None and batcher.in_use() == 0


def test_prefix_cache_reuses_rows_and_keeps_output(model, batcher):
    """A prompt sharing 2.5 chunks with an earlier one reuses 2 chunks of its KV rows, from a finished request and
    from a running one; the output is offline generation's; the metrics count the hits."""
    head = _ids(7, 2 * CHUNK + CHUNK // 2)
    first, second, third = head + _ids(8, 9), head + _ids(9, 4), head + _ids(10, 20)
    log = Log()
    log.submit(batcher, "first", first, 6)
    assert log.final("first")["cached_tokens"] == 0
    log.submit(batcher, "second", second, 6)  # the first's rows, now free
    assert log.final("second")["cached_tokens"] == 2 * CHUNK
    log.submit(batcher, "long-running", third, 120)  # from the second's rows
    for _ in range(2000):
        if log.tokens("long-running"):
            break
        time.sleep(0.01)
    log.submit(batcher, "beside", first, 6)  # copies from the running request's rows
    assert log.final("beside")["cached_tokens"] == 2 * CHUNK
    assert log.final("long-running")["cached_tokens"] == 2 * CHUNK
    assert log.tokens("first") == log.tokens("beside") == _offline(model, first, 6)
    assert log.tokens("second") == _offline(model, second, 6)
    assert log.tokens("long-running") == _offline(model, third, 120)
    m = batcher.metrics
    assert m.prefix_requests["hit"] == 3 and m.prefix_reused_tokens == 6 * CHUNK
    page = m.render()
    assert 'jaxmap_prefix_cache_requests_total{result="hit"} 3' in page
    assert f"jaxmap_prefix_cache_reused_tokens_total {6 * CHUNK}" in page


def test_prefix_cache_off_gives_same_tokens(model):
    """The same requests with the prefix cache off: no hits, the same tokens."""
    from jaxmap.serving.batcher import Batcher
    from jaxmap.serving.metrics import Metrics

    b = Batcher(model, BATCH, metrics=Metrics(BATCH, BATCH * model.max_seq_len), prefix_cache=False)
    b.start()
    try:
        head = _ids(7, 2 * CHUNK + CHUNK // 2)
        log = Log()
        for tag, ids in (("a", head + _ids(8, 9)), ("b", head + _ids(9, 4))):
            log.submit(b, tag, ids, 6)
            assert log.final(tag)["cached_tokens"] == 0
            assert log.tokens(tag) == _offline(model, ids, 6)
        assert b.metrics.prefix_requests["hit"] == 0
    finally:
        b.stop()


def test_cached_tokens_in_usage(model):
    """``usage.prompt_tokens_details.cached_tokens``, as OpenAI reports it, through the HTTP app."""
    from starlette.testclient import TestClient

    from jaxmap.serving.app import Server

    server = Server(model, "tiny", BATCH)
    prompt = _ids(3, 3 * CHUNK + 2)
    with TestClient(server.app) as client:
        one = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3}).json()
        two = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3}).json()
    assert one["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert two["usage"]["prompt_tokens_details"]["cached_tokens"] == 3 * CHUNK
    assert one["choices"][0]["text"] == two["choices"][0]["text"]


def test_no_prefix_cache_with_sliding_window_layers():
    """A ring buffer layer's slots are overwritten past its window: such models do not cache prefixes."""
    from types import SimpleNamespace

    from jaxmap.serving.batcher import Batcher

    def fake(kv_slots):
        engine = SimpleNamespace(prefill_chunk=CHUNK, kv_slots=kv_slots)
        return SimpleNamespace(engine=engine, max_seq_len=1024, eos_ids=lambda: {0})

    assert Batcher(fake([1024, 1024]), 2).prefix_cache
    assert not Batcher(fake([512, 1024]), 2).prefix_cache  # Gemma 3's local layers: a ring of 512
