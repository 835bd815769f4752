"""The OpenAI-compatible HTTP application (starlette): /v1/completions, /v1/chat/completions (streamed as server-sent
events or not), /v1/models, /health and /metrics, over one :class:`~jaxmap.serving.batcher.Batcher`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from jaxmap.engine.sampling import SamplingParams
from jaxmap.errors import UserError
from jaxmap.loading.harmony import check_reasoning_effort, template_messages, template_tools
from jaxmap.serving.batcher import Batcher, QueueFull, Request
from jaxmap.serving.metrics import Metrics
from jaxmap.serving.text import HarmonySplitter, ThinkSplitter

log = logging.getLogger(__name__)

COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
          "repetition_penalty", "ignore_eos", "stream", "stream_options", "n", "user", "presence_penalty",
          "frequency_penalty"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = COMMON | {"messages", "logprobs", "top_logprobs", "tools", "tool_choice", "reasoning_effort"}
MAX_CHOICES = 16  # n x prompts in one request: each choice takes a batch slot
NO_OP = {"presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None),
         "tools": ([], None), "tool_choice": ("none", "auto", None)}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


class Server:
    def __init__(self, model, name: str, max_batch_size: int, max_queue: int = 64, prefix_cache: bool = True):
        self.model, self.name = model, name
        self.metrics = Metrics(max_batch_size, max_batch_size * model.max_seq_len)
        self.batcher = Batcher(model, max_batch_size, max_queue, self.metrics, prefix_cache=prefix_cache)
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_page, methods=["GET"]),
        ], lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.batcher.start()
        yield
        self.batcher.stop()

    # ---- small endpoints ---------------------------------------------------------------------------------------------
    async def models(self, request: HttpRequest):
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model", "created": 0,
                                                         "owned_by": "jaxmap"}]})

    async def health(self, request: HttpRequest):
        return JSONResponse({"status": "ok"})

    async def metrics_page(self, request: HttpRequest):
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    # ---- generation --------------------------------------------------------------------------------------------------
    async def completions(self, request: HttpRequest):
        return await self._handle(request, chat=False)

    async def chat(self, request: HttpRequest):
        return await self._handle(request, chat=True)

    async def _handle(self, http: HttpRequest, chat: bool):
        try:
            body = await self._body(http)
            jobs = self._parse(body, chat)
        except ApiError as exc:
            self._status(exc.status)
            return exc.response()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()  # (job number, event) of every choice
        for k, job in enumerate(jobs):
            job.emit = lambda ev, k=k: loop.call_soon_threadsafe(events.put_nowait, (k, ev))
        submitted = []
        try:
            for job in jobs:
                self.batcher.submit(job)
                submitted.append(job)
        except QueueFull:
            for job in submitted:
                job.cancelled = True
            self._status(429)
            return ApiError(429, "the server's queue is full; retry later", "rate_limit_error").response()
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": self.name}
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            self._status(200)
            return StreamingResponse(self._stream(jobs, events, meta, chat, usage), media_type="text/event-stream")
        try:
            results = await self._collect(jobs, events)
        except asyncio.CancelledError:
            for job in jobs:
                job.cancelled = True
            raise
        failed = next((done for _, _, done in results if done["type"] == "error"), None)
        if failed is not None:
            for job in jobs:
                job.cancelled = True
            self._status(500)
            return ApiError(500, f"generation failed: {failed['message']}", "server_error").response()
        self._status(200)
        usage = _usage(jobs, [done for _, _, done in results])
        choices = []
        for job, (text, logprobs, done) in zip(jobs, results, strict=True):
            if chat:
                splitter = self._splitter()
                reasoning, content = splitter.push(text, final=True)
                message = {"role": "assistant", "content": content}
                if reasoning:
                    message["reasoning_content"] = reasoning
                finish = done["finish_reason"]
                if splitter.new_calls:
                    message["tool_calls"] = [_tool_call(c) for c in splitter.new_calls]
                    finish = "tool_calls" if finish == "stop" else finish
                choices.append({"index": job.index, "message": message, "finish_reason": finish,
                                "logprobs": self._chat_logprobs(logprobs) if job.logprobs is not None else None})
            else:
                choices.append({"index": job.index, "text": text, "finish_reason": done["finish_reason"],
                                "logprobs": self._completion_logprobs(logprobs) if job.logprobs is not None
                                else None})
        kind = "chat.completion" if chat else "text_completion"
        return JSONResponse({**meta, "object": kind, "choices": choices, "usage": usage})

    async def _collect(self, jobs: list[Request], events) -> list[tuple[str, list, dict]]:
        """Every choice's text, log-probability entries and final event (an error ends them all)."""
        texts: list[list[str]] = [[] for _ in jobs]
        logprobs: list[list] = [[] for _ in jobs]
        finals: list[dict | None] = [None] * len(jobs)
        while any(f is None for f in finals):
            k, ev = await events.get()
            if ev["type"] == "prompt":  # echo: the prompt's tokens and their log-probabilities come first
                texts[k].append(self.model.tokenizer.decode([e["token"] for e in ev["entries"]]))
                logprobs[k].extend(ev["entries"])
            elif ev["type"] == "token":
                texts[k].append(ev["text"])
                logprobs[k].append(ev["logprob"])
            else:
                texts[k].append(ev.get("text", ""))
                finals[k] = ev
                if ev["type"] == "error":
                    finals = [f or ev for f in finals]
        return [("".join(t), lp, f) for t, lp, f in zip(texts, logprobs, finals, strict=True)]

    async def _stream(self, jobs: list[Request], events, meta: dict, chat: bool, include_usage: bool):
        splitters = [self._splitter() for _ in jobs] if chat else None
        kind = "chat.completion.chunk" if chat else "text_completion"

        def data(choice: dict) -> str:
            return f"data: {json.dumps({**meta, 'object': kind, 'choices': [choice]})}\n\n"

        def chunk(k: int, piece: str, finish=None, final=False, logprob=None):
            job = jobs[k]
            if chat:
                splitter = splitters[k]
                reasoning, content = splitter.push(piece, final=final)
                delta = {}
                if reasoning:
                    delta["reasoning_content"] = reasoning
                if content or not delta:
                    delta["content"] = content
                if splitter.new_calls:
                    delta["tool_calls"] = [{"index": splitter.calls_before + i, **_tool_call(c)}
                                           for i, c in enumerate(splitter.new_calls)]
                if finish == "stop" and splitter.any_calls:
                    finish = "tool_calls"
                return data({"index": job.index, "delta": delta, "finish_reason": finish,
                             "logprobs": self._chat_logprobs([logprob]) if logprob else None})
            return data({"index": job.index, "text": piece, "finish_reason": finish,
                         "logprobs": self._completion_logprobs([logprob]) if logprob else None})

        finals: list[dict | None] = [None] * len(jobs)
        try:
            if chat:
                for job in jobs:
                    yield data({"index": job.index, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None})
            while any(f is None for f in finals):
                k, ev = await events.get()
                if ev["type"] == "prompt":
                    text = self.model.tokenizer.decode([e["token"] for e in ev["entries"]])
                    yield data({"index": jobs[k].index, "text": text, "finish_reason": None,
                                "logprobs": self._completion_logprobs(ev["entries"]) if jobs[k].logprobs is not None
                                else None})
                    continue
                if ev["type"] == "token":
                    if ev["text"] or ev["logprob"]:
                        yield chunk(k, ev["text"], logprob=ev["logprob"])
                    continue
                finals[k] = ev
                if ev["type"] == "error":
                    err = {"error": {"message": f"generation failed: {ev['message']}", "type": "server_error"}}
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                yield chunk(k, ev.get("text", ""), finish=ev["finish_reason"], final=True)
            else:  # every choice finished
                if include_usage:
                    usage = {**meta, "object": kind, "choices": [], "usage": _usage(jobs, finals)}
                    yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): a running request frees its slot at the next step
            for job in jobs:
                job.cancelled = True

    def _chat_logprobs(self, entries) -> dict:
        """Chat's shape: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``."""
        tok = self.model.tokenizer

        def one(t: int, lp: float) -> dict:
            piece = tok.decode([t])
            return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

        return {"content": [{**one(e["token"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"]]}
                            for e in entries if e is not None]}

    def _completion_logprobs(self, entries) -> dict:
        tok = self.model.tokenizer
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        for e in entries:
            if e is None:
                continue
            piece = tok.decode([e["token"]])
            out["tokens"].append(piece)
            out["text_offset"].append(offset)
            offset += len(piece)
            out["token_logprobs"].append(e["logprob"])
            out["top_logprobs"].append({tok.decode([t]): lp for t, lp in e["top"]} if e["logprob"] is not None
                                       else None)
        return out

    # ---- parsing -----------------------------------------------------------------------------------------------------
    async def _body(self, http: HttpRequest) -> dict:
        raw = await http.body()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "the request body is not UTF-8") from None
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _parse(self, body: dict, chat: bool) -> list[Request]:
        """The request's jobs: one per choice (``n`` per prompt; completions take a list of prompts), in choice
        order; every check is done before any of them runs."""
        allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
        for field in body:
            if field not in allowed:
                raise ApiError(400, f"field {field!r} is not supported by jaxmap", param=field)
        tokenizer = self.model.tokenizer
        harmony = chat and tokenizer is not None and tokenizer.harmony
        for field, ok in NO_OP.items():
            if field == "tools" and harmony:
                continue  # harmony models take tools: their calls come back as tool_calls
            if field in body and body[field] not in ok:
                raise ApiError(400, f"field {field!r} is supported only at its default ({ok[0]!r})", param=field)
        model = body.get("model")
        if model is not None and model != self.name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")
        tokenizer = self.model.tokenizer
        if tokenizer is None:
            raise ApiError(400, "the model has no tokenizer, so text cannot be encoded")
        logprobs, echo = None, False
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "messages must be a non-empty list", param="messages")
            extra = {}
            if harmony:  # assistant tool calls and tool results are messages too; tools go to the template
                messages = _or_400(template_messages, messages, param="messages")
                if body.get("tools") and body.get("tool_choice") != "none":
                    extra["tools"] = _or_400(template_tools, body["tools"], param="tools")
            for m in messages:
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                        or not (isinstance(m.get("content"), str) or harmony and m.get("tool_calls")):
                    raise ApiError(400, "each message needs a string role and a string content", param="messages")
            want, top = body.get("logprobs"), body.get("top_logprobs")
            if want not in (None, False, True):
                raise ApiError(400, "logprobs must be true or false", param="logprobs")
            if top is not None:
                if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20:
                    raise ApiError(400, "top_logprobs must be a whole number from 0 to 20", param="top_logprobs")
                if want is not True:
                    raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            if want is True:
                logprobs = top or 0
            try:
                effort = check_reasoning_effort(body.get("reasoning_effort"), tokenizer.chat_template)
            except UserError as exc:
                raise ApiError(400, str(exc), param="reasoning_effort") from None
            if effort:
                extra["reasoning_effort"] = effort
            try:
                prompt = tokenizer.apply_chat_template(messages, **extra)
                prompts = [tokenizer.encode(prompt, add_special_tokens=False)]
            except UserError as exc:
                raise ApiError(400, str(exc), param="messages") from None
        else:
            prompts = _prompts(body.get("prompt"), tokenizer)
            lp = body.get("logprobs")
            if lp not in (None, False):
                if not isinstance(lp, int) or isinstance(lp, bool) or not 0 <= lp <= 20:
                    raise ApiError(400, "logprobs must be a whole number from 0 to 20", param="logprobs")
                logprobs = lp
            echo = body.get("echo", False)
            if not isinstance(echo, bool):
                raise ApiError(400, "echo must be true or false", param="echo")
        n = body.get("n")
        n = 1 if n is None else n
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ApiError(400, f"n must be a whole number >= 1, got {n!r}", param="n")
        if n * len(prompts) > MAX_CHOICES:
            raise ApiError(400, f"{n * len(prompts)} choices (n x prompts) asked; at most {MAX_CHOICES} per request",
                           param="n")
        context = self.model.max_seq_len
        vocab = self.model.config.vocab_size
        for ids in prompts:
            self._check_prompt(ids, context, vocab, chat)
        longest = max(len(ids) for ids in prompts)
        field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = body.get(field)
        if max_tokens is None:
            max_tokens = context - longest if chat else 16
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, f"{field} must be a whole number >= 1, got {max_tokens!r}", param=field)
        if longest + max_tokens > context:
            raise ApiError(400, f"the prompt ({longest} tokens) plus {field} ({max_tokens}) exceeds this server's "
                                f"context of {context} tokens", param=field, code="context_length_exceeded")
        settings = self._settings(body)
        keep = chat and tokenizer.harmony  # the reply's channel markers are parsed, not dropped
        return [Request(list(ids), max_tokens, emit=lambda ev: None, logprobs=logprobs, echo=echo, index=i * n + j,
                        copy=j, keep_special=keep, **settings) for i, ids in enumerate(prompts) for j in range(n)]

    def _check_prompt(self, ids: list[int], context: int, vocab: int, chat: bool) -> None:
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", param="prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (size {vocab})", param="prompt")
        if len(ids) >= context:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this server's context is {context}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")

    def _settings(self, body: dict) -> dict:
        """Stop strings, sampling and ``ignore_eos``: what every choice of the request shares."""
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
        try:
            sampling = SamplingParams(
                temperature=_number(body, "temperature", 1.0 if False else 0.0),
                top_k=body.get("top_k") if body.get("top_k") is not None else 0,
                top_p=_number(body, "top_p", 1.0),
                repetition_penalty=_number(body, "repetition_penalty", 1.0),
                seed=body.get("seed") if body.get("seed") is not None else 0)
        except UserError as exc:
            raise ApiError(400, str(exc)) from None
        if not isinstance(body.get("ignore_eos", False), bool):
            raise ApiError(400, "ignore_eos must be true or false", param="ignore_eos")
        if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        return {"sampling": sampling, "stop": stop, "ignore_eos": body.get("ignore_eos", False)}

    def _splitter(self):
        """How a chat reply splits into reasoning and content: harmony's channels for a tokenizer with harmony's
        special tokens (gpt-oss), Qwen3's ``<think>`` block otherwise."""
        return HarmonySplitter() if self.model.tokenizer.harmony else ThinkSplitter()

    def _status(self, status: int) -> None:
        self.metrics.requests[status] = self.metrics.requests.get(status, 0) + 1


def _or_400(fn, value, param: str):
    try:
        return fn(value)
    except UserError as exc:
        raise ApiError(400, str(exc), param=param) from None


def _tool_call(call) -> dict:
    """A harmony tool call in OpenAI's shape."""
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def _prompts(prompt, tokenizer) -> list[list[int]]:
    """Completions' ``prompt``: a string, a list of token ids, or a list of either (several prompts)."""
    def one(p):
        if isinstance(p, str):
            return tokenizer.encode(p)
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return p
        raise ApiError(400, "prompt must be a string, a list of token ids, or a list of those", param="prompt")

    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        return [one(p) for p in prompt]
    return [one(prompt)]


def _number(body: dict, name: str, default: float):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name} must be a number, got {value!r}", param=name)
    return float(value)


def _usage(jobs: list[Request], finals: list[dict]) -> dict:
    """Usage over every choice: each prompt counted once (as OpenAI does with ``n`` > 1), completions summed."""
    firsts = [f for job, f in zip(jobs, finals, strict=True) if job.copy == 0]
    p = sum(f.get("prompt_tokens", 0) for f in firsts)
    c = sum(f.get("completion_tokens", 0) for f in finals)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": sum(f.get("cached_tokens", 0) for f in firsts)}}


def serve(model, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8, name: str | None = None,
          max_queue: int = 64, prefix_cache: bool = True) -> None:
    """Serve a loaded :class:`jaxmap.api.Model` until SIGTERM / Ctrl-C (running requests are drained first)."""
    import uvicorn

    server = Server(model, name or "jaxmap", max_batch_size, max_queue, prefix_cache)
    cache = server.batcher
    log.info("serving %s on http://%s:%d/v1 (%d batch slots, context %d, prefill chunk %d, prefix cache %s)",
             server.name, host, port, max_batch_size, model.max_seq_len, cache.chunk,
             "on" if cache.prefix_cache else "off (sliding-window layers)" if prefix_cache else "off")
    def exit_cleanly(signum, frame):  # uvicorn drains, restores this handler and raises the signal again
        raise SystemExit(0)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, exit_cleanly)
    uvicorn.run(server.app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)
    log.info("stopped")
