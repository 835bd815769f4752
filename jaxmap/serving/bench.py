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
