"""The serving workload of ``python -m jaxmap.bench --serving``: a server on 127.0.0.1 over a loaded model, streaming
clients at several concurrencies (aggregate generated tokens/s, time to first token p50/p99), against the same
requests sent one after another."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import statistics
import threading
import time

import numpy as np


def _request(port: int, prompt: str, max_tokens: int) -> tuple[float, int]:
    """One streamed completion: (time to first token, completion tokens)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    ttft, tokens = None, 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if ttft is None and chunk.get("choices"):
            ttft = time.perf_counter() - t0
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    return ttft or 0.0, tokens


def serving_bench(model, concurrencies=(1, 4, 8), requests: int = 16, max_tokens: int = 64,
                  max_batch_size: int = 8) -> list[dict]:
    import uvicorn

    from jaxmap.serving.app import Server

    server = Server(model, "bench", max_batch_size, max_queue=max(64, requests))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    web = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    while not web.started:
        time.sleep(0.05)
    prompts = [f"Write a short story about a {w}." for w in
               ("cat", "dog", "ship", "tree", "robot", "river", "city", "star")]
    work = [prompts[i % len(prompts)] for i in range(requests)]
    rows = []
    try:
        _request(port, work[0], max_tokens)  # compile the prefill and decode programs
        for label, clients in [("one after another", 1)] + [(f"{c} concurrent", c) for c in concurrencies]:
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(lambda p: _request(port, p, max_tokens), work))
            wall = time.perf_counter() - t0
            ttfts = sorted(r[0] for r in results)
            tokens = sum(r[1] for r in results)
            rows.append({"clients": label, "requests": requests, "tokens": tokens, "seconds": wall,
                         "tokens_per_s": tokens / wall, "ttft_p50_ms": 1000 * statistics.median(ttfts),
                         "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]})
    finally:
        web.should_exit = True
        thread.join(60)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| clients | requests | generated tokens | tokens/s (aggregate) | TTFT p50 ms | TTFT p99 ms |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['tokens_per_s']:.1f} | "
                     f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} |")
    return "\n".join(lines)


def prefill_stall(model, streams: int = 7, prompt_tokens: int = 1536, max_tokens: int = 40) -> dict:
    """``streams`` greedy streams decode; a prompt of ``prompt_tokens`` tokens joins them. Measures the streams'
    longest gap between two tokens while it is prefilled (what chunked admission bounds), their median gap, and the
    newcomer's time to first token. Run on the batcher directly (no HTTP), after a warm-up that compiles every
    chunk's program."""
    from jaxmap.engine.sampling import SamplingParams
    from jaxmap.serving.batcher import Batcher, Request

    batcher = Batcher(model, streams + 1, max_queue=64)
    batcher.start()
    long_ids = [int(t) for t in np.random.default_rng(0).integers(100, model.config.vocab_size, prompt_tokens)]

    def run(ids: list[int], n: int) -> tuple[threading.Event, list[float]]:
        done, times = threading.Event(), []

        def emit(ev):
            if ev["type"] == "token":
                times.append(time.perf_counter())
            elif ev["type"] in ("done", "error"):
                done.set()

        batcher.submit(Request(ids, n, SamplingParams(), [], emit=emit, ignore_eos=True))
        return done, times

    try:
        for warm in (run(long_ids, 2), run([1, 2, 3], 2)):  # compile the chunks' and the decode programs
            warm[0].wait(600)
        running = [run([1 + i, 2, 3, 4], max_tokens) for i in range(streams)]
        while not all(len(t) >= 3 for _, t in running):
            time.sleep(0.01)
        t0 = time.perf_counter()
        done, first = run(long_ids, 1)
        done.wait(600)
        t1 = first[0]
        for d, _ in running:
            d.wait(600)
    finally:
        batcher.stop()
    gaps_during, gaps = [], []
    for _, times in running:
        for a, b in zip(times, times[1:], strict=False):
            gaps.append(b - a)
            if b > t0 and a < t1:
                gaps_during.append(b - a)
    return {"chunk": model.engine.prefill_chunk, "prompt_tokens": prompt_tokens, "streams": streams,
            "longest_gap_s": max(gaps_during), "median_gap_s": statistics.median(gaps), "ttft_s": t1 - t0}


def format_stall(rows: list[dict]) -> str:
    lines = ["| --prefill-chunk | streams' longest gap s | streams' median gap s | newcomer's TTFT s |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['chunk']} | {r['longest_gap_s']:.2f} | {r['median_gap_s']:.2f} | {r['ttft_s']:.2f} |")
    return "\n".join(lines)
