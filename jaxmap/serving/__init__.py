"""The OpenAI-compatible server's parts: continuous batching over the engine (:mod:`.batcher`), text and stop
handling (:mod:`.text`), Prometheus metrics (:mod:`.metrics`) and the HTTP application (:mod:`.app`)."""

# serve's default --prefill-chunk (generate's is 2048). A newcomer's prefill runs one chunk between two decode steps of
# the running streams, so the chunk bounds their stall: on the default model (float32, 2 shared CPU cores) a 256-token
# chunk took ~1 s (five batch-8 decode steps), and prefilling 1023 tokens took 4.7 s in 256-token chunks against
# 5.9 s in 128-token and 7.1 s in 512-token ones.
SERVE_PREFILL_CHUNK = 256
