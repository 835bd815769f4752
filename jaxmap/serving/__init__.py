"""The OpenAI-compatible server's parts: continuous batching over the engine (:mod:`.batcher`), text and stop
handling (:mod:`.text`), Prometheus metrics (:mod:`.metrics`) and the HTTP application (:mod:`.app`)."""
