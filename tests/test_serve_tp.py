"""The server on a tensor-parallel layout (tp=2 over the test's virtual CPU devices) and on host-offloaded ones:
same answers as offline."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest
from live_server import live_server

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

TINY = Path(__file__).parent / "data" / "tiny-qwen3"


def _serve_and_compare(model, prompts, max_tokens=10):
    """Serve ``model`` on 127.0.0.1 (4 slots), send ``prompts`` at once through the openai client, compare each
    answer with offline greedy generation."""
    from jaxmap.serving.app import Server

    server = Server(model, "tiny", 4)
    with live_server(server.app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)

        def one(p):
            return client.completions.create(model="tiny", prompt=p, max_tokens=max_tokens).choices[0].text

        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(one, prompts))
        assert got == [model.generate([p], max_new_tokens=max_tokens)[0].text for p in prompts]
    return server


def test_tp2_server_matches_offline():
    import jaxmap

    model = jaxmap.load(str(TINY), max_seq_len=128, max_batch_size=4, progress=False, tp=2, pp=1)
    assert model.device_map is None or max(s.tp for s in model.device_map.stages) == 2
    _serve_and_compare(model, [f"Item {i} is" for i in range(6)])


def test_host_offloaded_server_matches_offline():
    """--max-memory leaves cpu[0] room for the streaming buffers and the KV cache only: the layers live in host
    memory and stream in per layer. Prompts of several 16-token chunks sharing a prefix: chunked admission and
    the prefix cache run on the streamed layers too."""
    from memory_caps import caps

    import jaxmap
    from jaxmap.loading import open_source

    source = open_source(TINY)
    config = source.config
    source.close()
    max_memory = caps(config, 1, 3, seq=128)
    max_memory["0"] += 400_000  # the KV cache of 4 rows, not caps' one
    model = jaxmap.load(str(TINY), max_seq_len=128, max_batch_size=4, progress=False, prefill_chunk=16,
                        max_memory=max_memory)
    assert "host" in {s.memory_kind for s in model.device_map.stages}
    head = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun by the old barn. "
    server = _serve_and_compare(model, [head + tail for tail in ("Then", "After that", "Later, the fox", "So")])
    assert server.metrics.prefix_requests["hit"] >= 1


def test_batcher_on_host_and_disk_tiers_matches_offline(tmp_path):
    """Continuous batching on an offloaded layout (host and disk tiers, streamed per layer), token ids in."""
    import queue

    from memory_caps import caps

    import jaxmap
    from jaxmap.engine.sampling import SamplingParams
    from jaxmap.families import preset_config
    from jaxmap.serving.batcher import Batcher, Request

    model = jaxmap.load("preset:tiny", max_seq_len=64, progress=False,
                        max_memory=caps(preset_config("tiny"), 1, 1), offload_folder=tmp_path)
    assert {s.memory_kind for s in model.device_map.stages} - {"device"}
    batcher = Batcher(model, 4)
    batcher.start()
    try:
        prompts = [[1, 5, 9, 3], [7, 2], [4, 4, 4, 4, 4, 8], [11, 3, 6]]
        outs = []
        for ids in prompts:
            q: queue.Queue = queue.Queue()
            batcher.submit(Request(ids, 6, SamplingParams(), [], emit=q.put, ignore_eos=True))
            outs.append(q)
        got = []
        for q in outs:
            tokens = []
            while (ev := q.get(timeout=120))["type"] == "token":
                tokens.append(ev["token"])
            got.append(tokens)
    finally:
        batcher.stop()
    expected = [model.generate([ids], max_new_tokens=6, stop_at_eos=False)[0].token_ids for ids in prompts]
    assert got == expected
