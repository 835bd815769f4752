"""Continuous batching over the engine: ``max_batch_size`` slots, each with its own KV rows, cache position,
sampling settings and stop conditions. A request joins when its prompt is prefilled and leaves as soon as it is done
or cancelled. Decode runs every slot at once with a cache position per row.

Admission is interleaved with decoding: each iteration runs prefill chunks (the engine's ``prefill_chunk`` tokens
each, in a batch-1 cache whose rows are then copied into the newcomer's slot) worth at most one chunk of tokens,
then one decode step of the running slots, so a long prompt stalls the streams for one chunk at a time, not for its
whole length. Short prompts fill the budget together (several newcomers per iteration).

Prefix caching: each row remembers the prompt tokens whose KV its prefill left there (whole chunks only, the last
chunk excluded); a newcomer whose prompt starts with such a prefix copies those rows and prefills the rest. The reuse
is in whole chunks, so the newcomer's remaining chunks are the very steps an uncached prefill would run, and its
output is the same. Models with sliding-window (ring buffer) layers do not cache: a ring's slots are overwritten as
a row decodes past the window, and an idle row's decode write lands inside the ring.

A slot running alone (nothing queued or being prefilled) decodes in a batch-1 cache instead: its rows are copied out
once, and each step is the very step offline batch-1 generation runs (same shape, scalar position), at batch 1's
cost instead of all slots'; the rows go back into the batched cache when a newcomer arrives.

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
    index: int = 0  # the choice's index in its response
    copy: int = 0  # which of the request's ``n`` copies of its prompt (sampling draws its own stream for each)
    keep_special: bool = False  # text keeps special tokens (a harmony chat reply, split into channels afterwards)
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
    cached: int = 0  # prompt tokens whose KV came from the prefix cache
    generated: int = 0
    last_time: float = 0.0


@dataclasses.dataclass
class _Prefill:
    """A newcomer being prefilled, one chunk per iteration, into its own batch-1 cache; ``row`` is reserved for it."""

    request: Request
    row: int
    caches: list
    tokens: np.ndarray  # [1, prompt length]
    start: int  # the next chunk's first slot
    cached: int  # prompt tokens copied from the prefix cache
    pieces: list = dataclasses.field(default_factory=list)  # echo: each chunk's logits
    token: object = None
    logits: object = None


class Batcher:
    def __init__(self, model, max_batch_size: int, max_queue: int = 64, metrics=None, prefix_cache: bool = True):
        self.model = model
        self.engine = model.engine
        self.batch = max_batch_size
        self.max_seq_len = model.max_seq_len
        self.chunk = self.engine.prefill_chunk
        self.eos = model.eos_ids()
        self.metrics = metrics
        self.pending: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.slots: list[_Slot | None] = [None] * max_batch_size
        self.prefilling: _Prefill | None = None
        self.solo: tuple[int, list] | None = None  # (row, its batch-1 cache) while one slot decodes alone
        # Prefix caching needs every layer to keep the whole context (see the module docstring).
        self.prefix_cache = prefix_cache and all(n >= self.max_seq_len for n in self.engine.kv_slots)
        self.prefixes: list[list[int] | None] = [None] * max_batch_size  # prompt tokens whose KV each row holds
        self._last_used = [0] * max_batch_size
        self._tick = 0
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
        """Batch slots taken: running requests and the newcomer being prefilled."""
        return sum(s is not None for s in self.slots) + (self.prefilling is not None)

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._iteration()
            except Exception as exc:  # one request's failure never takes the server down
                log.exception("batcher step failed")
                self.solo = None  # its buffers may be gone with the failed step
                for i, slot in enumerate(self.slots):
                    if slot is not None:
                        self._finish(i, "error", error=str(exc))
                self._drop_prefill("error", str(exc))
                self.caches = self.engine.new_cache(self.batch)
                self.prefixes = [None] * self.batch

    def _iteration(self) -> None:
        for i, slot in enumerate(self.slots):
            if slot is not None and slot.request.cancelled:
                self._finish(i, "cancelled")
        if self.prefilling is not None and self.prefilling.request.cancelled:
            self._drop_prefill("cancelled")
        self._admit()
        if any(s is not None for s in self.slots):
            self._decode()

    def _admit(self) -> None:
        """Prefill chunks worth at most one chunk of tokens: the newcomer in progress first, then new ones while
        a slot is free and the budget lasts (the first chunk always runs, so a full chunk is never starved)."""
        spent = 0
        while True:
            pf = self.prefilling
            if pf is None:
                free = [i for i, s in enumerate(self.slots) if s is None]
                if not free:
                    return
                idle = spent == 0 and len(free) == self.batch
                try:  # nothing running: wait a little for work instead of spinning
                    request = self.pending.get(timeout=0.05) if idle else self.pending.get_nowait()
                except queue.Empty:
                    return
                self._gauges()
                if request.cancelled:
                    request.emit({"type": "done", "finish_reason": "cancelled"})
                    self._count("cancelled")
                    continue
                try:
                    self._leave_solo()  # the newcomer's prefill takes the batch-1 cache; it joins the batch
                    pf = self.prefilling = self._begin(request, free)
                except Exception as exc:
                    log.exception("prefill failed")
                    request.emit({"type": "error", "message": str(exc)})
                    self._count("error")
                    continue
            real = min(self.chunk, pf.tokens.shape[1] - pf.start)
            if spent and spent + real > self.chunk:
                return
            spent += real
            try:
                self._prefill_step(pf)
            except Exception as exc:
                log.exception("prefill failed")
                self._drop_prefill("error", str(exc))
                continue
            if pf.start < pf.tokens.shape[1]:
                return  # more chunks: the running slots decode first
            self.prefilling = None
            try:
                self._join(pf)
            except Exception as exc:
                log.exception("joining the batch failed")
                self.slots[pf.row] = None
                pf.request.emit({"type": "error", "message": str(exc)})
                self._count("error")

    def _begin(self, request: Request, free: list[int]) -> _Prefill:
        """Reserve a slot for ``request`` and start its prefill, from the longest cached prefix there is."""
        ids = request.prompt_ids
        donor, reuse = None, 0
        if self.prefix_cache and not request.echo:  # echo scores every prompt token: nothing to skip
            usable = self.chunk * ((len(ids) - 1) // self.chunk)  # whole chunks, at least one token left to run
            for i, cached in enumerate(self.prefixes):
                if cached is None:
                    continue
                common = _common_prefix(cached, ids, usable)
                n = self.chunk * (common // self.chunk)
                if n > reuse:
                    donor, reuse = i, n
            if self.metrics is not None:
                self.metrics.prefix_requests["hit" if reuse else "miss"] += 1
                self.metrics.prefix_reused_tokens += reuse
        if donor is not None and self.slots[donor] is None:
            row = donor  # a finished request's rows: the newcomer takes them over
        else:  # an empty row, else the one whose cached prefix was used longest ago
            row = min(free, key=lambda i: (self.prefixes[i] is not None, self._last_used[i]))
        caches = self.engine.new_cache(1)
        if reuse:
            caches = self.engine.extract_row(self.caches, donor, caches, reuse)
            self._tick += 1
            self._last_used[donor] = self._tick
        self.prefixes[row] = None  # its rows are about to be overwritten
        return _Prefill(request, row, caches, np.asarray([ids], np.int32), reuse, reuse)

    def _prefill_step(self, pf: _Prefill) -> None:
        """One chunk of the newcomer's prompt: the same step (shape, history, padding) as offline generation's."""
        echo = pf.request.echo
        pf.token, pf.logits, pf.caches, _ = self.model._prefill_chunk(
            pf.caches, pf.tokens, pf.start, jnp.zeros(1, jnp.int32), None, self._values, self._key,
            self._greedy.shape, all_logits=echo, on_logits=pf.pieces.append if echo else None)
        pf.start = min(pf.start + self.chunk, pf.tokens.shape[1])

    def _drop_prefill(self, reason: str, error: str | None = None) -> None:
        pf, self.prefilling = self.prefilling, None
        if pf is None:
            return
        if reason == "error":
            pf.request.emit({"type": "error", "message": error})
        else:
            pf.request.emit({"type": "done", "finish_reason": reason})
            self.engine.release_cache(pf.caches)
        self._count(reason)
        self._gauges()

    def _join(self, pf: _Prefill) -> None:
        """The prefilled newcomer takes its slot: its rows copied in, its first token accepted."""
        request, row = pf.request, pf.row
        ids = request.prompt_ids
        n = len(ids)
        self.caches = self.engine.insert_row(self.caches, pf.caches, row, prefill_bucket(n, self.max_seq_len))
        self.engine.release_cache(pf.caches)
        if self.prefix_cache and not request.echo:
            self.prefixes[row] = list(ids[:self.chunk * ((n - 1) // self.chunk)]) or None
            self._tick += 1
            self._last_used[row] = self._tick
        seen = None
        if request.sampling.repetition_penalty != 1.0:
            seen = np.zeros(self.model.config.vocab_size, bool)
            seen[ids] = True
        slot = _Slot(request, TextTracker(self.model.tokenizer, request.stop, request.keep_special), pos=n, last=0,
                     rng=np.random.default_rng(request.sampling.seed if request.copy == 0
                                               else [request.sampling.seed, request.copy]),
                     seen=seen, cached=pf.cached)
        self.slots[row] = slot
        if self.metrics is not None:
            self.metrics.prompt_tokens += n
        logits = pf.logits
        if request.echo:
            logits = np.concatenate(pf.pieces, axis=1)
            lp = _log_softmax(np.asarray(logits[0, :n], np.float64))
            k = request.logprobs or 0
            entries = [{"token": ids[0], "logprob": None, "top": []}]
            for j in range(1, n):
                top = np.argsort(-lp[j - 1])[:k]
                entries.append({"token": ids[j], "logprob": float(lp[j - 1, ids[j]]),
                                "top": [(int(t), float(lp[j - 1, t])) for t in top]})
            request.emit({"type": "prompt", "entries": entries})
            logits = logits[:, n - 1]
        self._accept(row, int(np.asarray(pf.token)[0]), logits[0] if self._needs_logits(slot) else None)
        self._gauges()

    def _enter_solo(self, row: int) -> None:
        """Copy the lone running slot's rows into a batch-1 cache, where it decodes at batch 1's cost."""
        caches = self.engine.extract_row(self.caches, row, self.engine.new_cache(1),
                                         attend_bucket(self.slots[row].pos + 1, self.max_seq_len))
        self.solo = (row, caches)

    def _leave_solo(self, finished: bool = False) -> None:
        """Back to batched decoding: the slot's rows go back into the batched cache (not when it has finished: its
        prompt rows, which the prefix cache may use, are still there)."""
        if self.solo is None:
            return
        (row, caches), self.solo = self.solo, None
        if not finished:
            self.caches = self.engine.insert_row(self.caches, caches, row,
                                                 attend_bucket(self.slots[row].pos + 1, self.max_seq_len))
        self.engine.release_cache(caches)

    def _decode_solo(self, row: int) -> None:
        """One decode step of the lone slot: offline batch-1 generation's step (scalar position, no padding)."""
        slot = self.slots[row]
        _, caches = self.solo
        shape = StepShape(1, 1, attend_bucket(slot.pos + 1, self.max_seq_len), False, self._greedy.shape)
        token, logits, caches, _ = self.engine.step(
            caches, jnp.asarray([[slot.last]], jnp.int32), slot.pos, jnp.zeros(1, jnp.int32), 0, None,
            self._values, self._key, shape)
        self.solo = (row, caches)
        if self.metrics is not None:
            self.metrics.decode_steps["solo"] += 1
        slot.pos += 1
        self._accept(row, int(np.asarray(token)[0]), np.asarray(logits)[0] if self._needs_logits(slot) else None)

    def _decode(self) -> None:
        rows = [i for i, s in enumerate(self.slots) if s is not None]
        alone = len(rows) == 1 and self.prefilling is None and self.pending.empty()
        if self.solo is not None and not (alone and self.solo[0] == rows[0]):
            self._leave_solo()
        if alone:
            if self.solo is None:
                self._enter_solo(rows[0])
            self._decode_solo(rows[0])
            return
        tokens = np.zeros((self.batch, 1), np.int32)
        # An idle row still runs (the step shape is fixed); it writes its junk key at the last cache slot, which no
        # cached prefix covers and which a request writes itself before it reads it.
        starts = np.full(self.batch, self.max_seq_len - 1, np.int32)
        for i in rows:
            tokens[i, 0], starts[i] = self.slots[i].last, self.slots[i].pos
        attend = attend_bucket(int(starts[rows].max()) + 1, self.max_seq_len)
        shape = StepShape(self.batch, 1, attend, False, self._greedy.shape)
        token, logits, self.caches, _ = self.engine.step(
            self.caches, jnp.asarray(tokens), jnp.asarray(starts), jnp.zeros(self.batch, jnp.int32), 0, None,
            self._values, self._key, shape)
        if self.metrics is not None:
            self.metrics.decode_steps["batch"] += 1
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
        if self.solo is not None and self.solo[0] == row:
            self._leave_solo(finished=True)
        slot = self.slots[row]
        self.slots[row] = None
        request = slot.request
        if reason == "error":
            request.emit({"type": "error", "message": error})
        else:
            rest = slot.text.flush() if reason != "cancelled" else ""
            request.emit({"type": "done", "finish_reason": reason, "text": rest,
                          "prompt_tokens": len(request.prompt_ids), "completion_tokens": slot.generated,
                          "cached_tokens": slot.cached})
        self._count({"cancelled": "cancelled", "error": "error"}.get(reason, "ok"))
        self._gauges()

    def _count(self, status: str) -> None:
        if self.metrics is not None:
            self.metrics.finished[status] = self.metrics.finished.get(status, 0) + 1

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth = self.pending.qsize()
            self.metrics.slots_in_use = self.in_use()
            self.metrics.kv_slots_in_use = sum(s.pos for s in self.slots if s is not None) + \
                (self.prefilling.start if self.prefilling is not None else 0)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens ``a`` and ``b`` share, up to ``limit``."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
