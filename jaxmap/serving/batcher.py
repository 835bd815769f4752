"""Continuous batching over the engine: ``max_batch_size`` slots, each with its own KV rows, cache position,
sampling settings and stop conditions. A request joins at the next step (its prompt prefilled in a batch-1 cache,
whose rows are then copied into its slot; one prefill between decode steps, so running streams keep moving) and
leaves as soon as it is done or cancelled. Decode runs every slot at once with a cache position per row.

Greedy rows take the engine's in-step argmax (so a request's greedy output matches offline generation); rows that
sample, want log-probabilities or a repetition penalty read that step's logits on the host."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmap.engine.engine import StepShape, attend_bucket, prefill_bucket
from jaxmap.engine.sampling import SamplingParams
from jaxmap.serving.text import TextTracker

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


@dataclasses.dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    emit: Callable[[dict], None]  # called from the batcher thread with each event
    logprobs: int | None = None  # top-k alternatives per generated token (None: no log-probabilities)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)
    echo: bool = False  # also score the prompt: an event with each prompt token's log-probability first
    cancelled: bool = False
    submitted: float = dataclasses.field(default_factory=time.perf_counter)


@dataclasses.dataclass
class _Slot:
    request: Request
    text: TextTracker
    pos: int  # cache slot the last token is written to when fed back
    last: int  # the last generated token
    rng: np.random.Generator
    seen: np.ndarray | None
    generated: int = 0
    last_time: float = 0.0


class Batcher:
    def __init__(self, model, max_batch_size: int, max_queue: int = 64, metrics=None):
        self.model = model
        self.engine = model.engine
        self.batch = max_batch_size
        self.max_seq_len = model.max_seq_len
        self.eos = model.eos_ids()
        self.metrics = metrics
        self.pending: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.slots: list[_Slot | None] = [None] * max_batch_size
        self._greedy = SamplingParams()
        self._values = self._greedy.values()
        self._key = jax.random.key(0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.caches = None

    # ---- control ----------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.caches = self.engine.new_cache(self.batch)
        self._thread = threading.Thread(target=self._run, name="jaxmap-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request) -> None:
        try:
            self.pending.put_nowait(request)
        except queue.Full:
            raise QueueFull from None
        self._gauges()

    def in_use(self) -> int:
        return sum(s is not None for s in self.slots)

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._iteration()
            except Exception as exc:  # one request's failure never takes the server down
                log.exception("batcher step failed")
                for i, slot in enumerate(self.slots):
                    if slot is not None:
                        self._finish(i, "error", error=str(exc))
                self.caches = self.engine.new_cache(self.batch)

    def _iteration(self) -> None:
        for i, slot in enumerate(self.slots):
            if slot is not None and slot.request.cancelled:
                self._finish(i, "cancelled")
        free = [i for i, s in enumerate(self.slots) if s is None]
        active = len(free) < self.batch
        if free:
            try:
                request = self.pending.get(timeout=None if active else 0.05) if not active else \
                    self.pending.get_nowait()
            except queue.Empty:
                request = None
            if request is not None:
                self._gauges()
                if request.cancelled:
                    request.emit({"type": "done", "finish_reason": "cancelled"})
                else:
                    try:
                        self._admit(free[0], request)
                    except Exception as exc:
                        log.exception("prefill failed")
                        self.slots[free[0]] = None
                        request.emit({"type": "error", "message": str(exc)})
                        self._count("error")
        if any(s is not None for s in self.slots):
            self._decode()

    def _admit(self, row: int, request: Request) -> None:
        engine, ids = self.engine, request.prompt_ids
        n = len(ids)
        n_slots = prefill_bucket(n, self.max_seq_len)
        tokens = np.asarray([ids], np.int32)
        # chunked as generate's prefill (--prefill-chunk): a long prompt's temporaries follow the chunk
        pieces: list[np.ndarray] = []
        token, caches1, _, logits = self.model._prefill(
            tokens, jnp.zeros(1, jnp.int32), None, self._values, self._key, self._greedy.shape,
            all_logits=request.echo, on_logits=pieces.append if request.echo else None)
        if request.echo:
            logits = np.concatenate(pieces, axis=1)
        self.caches = engine.insert_row(self.caches, caches1, row, n_slots)
        engine.release_cache(caches1)
        seen = None
        if request.sampling.repetition_penalty != 1.0:
            seen = np.zeros(self.model.config.vocab_size, bool)
            seen[ids] = True
        slot = _Slot(request, TextTracker(self.model.tokenizer, request.stop), pos=n, last=0,
                     rng=np.random.default_rng(request.sampling.seed), seen=seen)
        self.slots[row] = slot
        if self.metrics is not None:
            self.metrics.prompt_tokens += n
        if request.echo:
            lp = _log_softmax(np.asarray(logits[0, :n], np.float64))
            k = request.logprobs or 0
            entries = [{"token": ids[0], "logprob": None, "top": []}]
            for j in range(1, n):
                top = np.argsort(-lp[j - 1])[:k]
                entries.append({"token": ids[j], "logprob": float(lp[j - 1, ids[j]]),
                                "top": [(int(t), float(lp[j - 1, t])) for t in top]})
            request.emit({"type": "prompt", "entries": entries})
            logits = logits[:, n - 1]
        self._accept(row, int(np.asarray(token)[0]), logits[0] if self._needs_logits(slot) else None)
        self._gauges()

    def _decode(self) -> None:
        rows = [i for i, s in enumerate(self.slots) if s is not None]
        tokens = np.zeros((self.batch, 1), np.int32)
        starts = np.zeros(self.batch, np.int32)
        for i in rows:
            tokens[i, 0], starts[i] = self.slots[i].last, self.slots[i].pos
        attend = attend_bucket(int(starts.max()) + 1, self.max_seq_len)
        shape = StepShape(self.batch, 1, attend, False, self._greedy.shape)
        token, logits, self.caches, _ = self.engine.step(
            self.caches, jnp.asarray(tokens), jnp.asarray(starts), jnp.zeros(self.batch, jnp.int32), 0, None,
            self._values, self._key, shape)
        host = np.asarray(token)
        host_logits = np.asarray(logits) if any(self._needs_logits(self.slots[i]) for i in rows) else None
        for i in rows:
            slot = self.slots[i]
            slot.pos += 1
            self._accept(i, int(host[i]), None if host_logits is None or not self._needs_logits(slot)
                         else host_logits[i])

    @staticmethod
    def _needs_logits(slot: _Slot) -> bool:
        s = slot.request.sampling
        return s.temperature > 0 or s.repetition_penalty != 1.0 or slot.request.logprobs is not None

    # ---- one token for one row ---------------------------------------------------------------------------------------
    def _accept(self, row: int, token: int, logits) -> None:
        slot = self.slots[row]
        request = slot.request
        logprob = None
        if logits is not None:
            logits = np.asarray(logits, np.float64)
            token = self._sample(slot, logits) if (request.sampling.temperature > 0 or slot.seen is not None) \
                else token
            if request.logprobs is not None:
                lp = _log_softmax(logits)
                top = np.argsort(-lp)[:request.logprobs]
                logprob = {"token": token, "logprob": float(lp[token]),
                           "top": [(int(t), float(lp[t])) for t in top]}
        now = time.perf_counter()
        if self.metrics is not None:
            if slot.generated == 0:
                self.metrics.ttft.observe(now - request.submitted)
            else:
                self.metrics.itl.observe(now - slot.last_time)
        slot.last_time = now
        if token in self.eos and not request.ignore_eos:
            self._finish(row, "stop")
            return
        slot.generated += 1
        slot.last = token
        if slot.seen is not None:
            slot.seen[token] = True
        if self.metrics is not None:
            self.metrics.generated_tokens += 1
        piece = slot.text.push(token)
        request.emit({"type": "token", "token": token, "text": piece, "logprob": logprob})
        if slot.text.stopped:
            self._finish(row, "stop")
        elif slot.generated >= request.max_tokens or slot.pos >= self.max_seq_len:
            self._finish(row, "length")

    def _sample(self, slot: _Slot, logits: np.ndarray) -> int:
        s = slot.request.sampling
        if slot.seen is not None:
            pen = logits[slot.seen]
            logits[slot.seen] = np.where(pen > 0, pen / s.repetition_penalty, pen * s.repetition_penalty)
        if s.temperature == 0:
            return int(np.argmax(logits))
        logits = logits / s.temperature
        if s.top_k:
            kth = np.partition(logits, -s.top_k)[-s.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if s.top_p < 1.0:
            order = np.argsort(-probs)
            cum = np.cumsum(probs[order])
            keep = order[:int(np.searchsorted(cum, s.top_p) + 1)]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(slot.rng.choice(len(probs), p=probs))

    def _finish(self, row: int, reason: str, error: str | None = None) -> None:
        slot = self.slots[row]
        self.slots[row] = None
        request = slot.request
        if reason == "error":
            request.emit({"type": "error", "message": error})
        else:
            rest = slot.text.flush() if reason != "cancelled" else ""
            request.emit({"type": "done", "finish_reason": reason, "text": rest,
                          "prompt_tokens": len(request.prompt_ids), "completion_tokens": slot.generated})
        self._count({"cancelled": "cancelled", "error": "error"}.get(reason, "ok"))
        self._gauges()

    def _count(self, status: str) -> None:
        if self.metrics is not None:
            self.metrics.finished[status] = self.metrics.finished.get(status, 0) + 1

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth = self.pending.qsize()
            self.metrics.slots_in_use = self.in_use()
            self.metrics.kv_slots_in_use = sum(s.pos for s in self.slots if s is not None)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
