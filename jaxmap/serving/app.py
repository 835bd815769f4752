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
from jaxmap.serving.batcher import Batcher, QueueFull, Request
from jaxmap.serving.metrics import Metrics
from jaxmap.serving.text import ThinkSplitter

log = logging.getLogger(__name__)

COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
          "repetition_penalty", "ignore_eos", "stream", "stream_options", "n", "user", "presence_penalty",
          "frequency_penalty"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = COMMON | {"messages", "logprobs", "top_logprobs", "tools", "tool_choice"}
NO_OP = {"n": (1, None), "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None),
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
            job = self._parse(body, chat)
        except ApiError as exc:
            self._status(exc.status)
            return exc.response()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.emit = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
        try:
            self.batcher.submit(job)
        except QueueFull:
            self._status(429)
            return ApiError(429, "the server's queue is full; retry later", "rate_limit_error").response()
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": self.name}
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            self._status(200)
            return StreamingResponse(self._stream(job, events, meta, chat, usage), media_type="text/event-stream")
        try:
            text, logprobs, done = await self._collect(events)
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if done["type"] == "error":
            self._status(500)
            return ApiError(500, f"generation failed: {done['message']}", "server_error").response()
        self._status(200)
        usage = _usage(done)
        if chat:
            splitter = ThinkSplitter()
            reasoning, content = splitter.push(text, final=True)
            message = {"role": "assistant", "content": content}
            if reasoning:
                message["reasoning_content"] = reasoning
            choice = {"index": 0, "message": message, "finish_reason": done["finish_reason"], "logprobs": None}
            return JSONResponse({**meta, "object": "chat.completion", "choices": [choice], "usage": usage})
        choice = {"index": 0, "text": text, "finish_reason": done["finish_reason"],
                  "logprobs": self._completion_logprobs(logprobs) if job.logprobs is not None else None}
        return JSONResponse({**meta, "object": "text_completion", "choices": [choice], "usage": usage})

    async def _collect(self, events):
        text, logprobs = [], []
        while True:
            ev = await events.get()
            if ev["type"] == "prompt":  # echo: the prompt's tokens and their log-probabilities come first
                text.append(self.model.tokenizer.decode([e["token"] for e in ev["entries"]]))
                logprobs.extend(ev["entries"])
            elif ev["type"] == "token":
                text.append(ev["text"])
                logprobs.append(ev["logprob"])
            else:
                text.append(ev.get("text", ""))
                return "".join(text), logprobs, ev

    async def _stream(self, job: Request, events, meta: dict, chat: bool, include_usage: bool):
        splitter = ThinkSplitter() if chat else None
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str, finish=None, final=False, logprob=None):
            if chat:
                reasoning, content = splitter.push(piece, final=final)
                delta = {}
                if reasoning:
                    delta["reasoning_content"] = reasoning
                if content or not delta:
                    delta["content"] = content
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": piece, "finish_reason": finish,
                          "logprobs": self._completion_logprobs([logprob]) if logprob else None}
            return f"data: {json.dumps({**meta, 'object': kind, 'choices': [choice]})}\n\n"

        try:
            if chat:
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield f"data: {json.dumps({**meta, 'object': kind, 'choices': [first]})}\n\n"
            while True:
                ev = await events.get()
                if ev["type"] == "prompt":
                    text = self.model.tokenizer.decode([e["token"] for e in ev["entries"]])
                    choice = {"index": 0, "text": text, "finish_reason": None,
                              "logprobs": self._completion_logprobs(ev["entries"]) if job.logprobs is not None
                              else None}
                    yield f"data: {json.dumps({**meta, 'object': kind, 'choices': [choice]})}\n\n"
                    continue
                if ev["type"] == "token":
                    if ev["text"] or ev["logprob"]:
                        yield chunk(ev["text"], logprob=ev["logprob"])
                    continue
                if ev["type"] == "error":
                    err = {"error": {"message": f"generation failed: {ev['message']}", "type": "server_error"}}
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                yield chunk(ev.get("text", ""), finish=ev["finish_reason"], final=True)
                if include_usage:
                    yield f"data: {json.dumps({**meta, 'object': kind, 'choices': [], 'usage': _usage(ev)})}\n\n"
                break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): a running request frees its slot at the next step
            job.cancelled = True

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

    def _parse(self, body: dict, chat: bool) -> Request:
        allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
        for field in body:
            if field not in allowed:
                raise ApiError(400, f"field {field!r} is not supported by jaxmap", param=field)
        for field, ok in NO_OP.items():
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
            for m in messages:
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                        or not isinstance(m.get("content"), str):
                    raise ApiError(400, "each message needs a string role and a string content", param="messages")
            if body.get("logprobs") not in (None, False):
                raise ApiError(400, "field 'logprobs' is not supported for chat", param="logprobs")
            try:
                prompt = tokenizer.apply_chat_template(messages)
                ids = tokenizer.encode(prompt, add_special_tokens=False)
            except UserError as exc:
                raise ApiError(400, str(exc), param="messages") from None
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = tokenizer.encode(prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                ids = prompt
            else:
                raise ApiError(400, "prompt must be a string or a list of token ids", param="prompt")
            lp = body.get("logprobs")
            if lp not in (None, False):
                if not isinstance(lp, int) or isinstance(lp, bool) or not 0 <= lp <= 20:
                    raise ApiError(400, "logprobs must be a whole number from 0 to 20", param="logprobs")
                logprobs = lp
            echo = body.get("echo", False)
            if not isinstance(echo, bool):
                raise ApiError(400, "echo must be true or false", param="echo")
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", param="prompt")
        context = self.model.max_seq_len
        if len(ids) >= context:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this server's context is {context}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = body.get(field)
        if max_tokens is None:
            max_tokens = context - len(ids) if chat else 16
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, f"{field} must be a whole number >= 1, got {max_tokens!r}", param=field)
        if len(ids) + max_tokens > context:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus {field} ({max_tokens}) exceeds this server's "
                                f"context of {context} tokens", param=field, code="context_length_exceeded")
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
        return Request(list(ids), max_tokens, sampling, stop, emit=lambda ev: None, logprobs=logprobs,
                       echo=echo, ignore_eos=body.get("ignore_eos", False))

    def _status(self, status: int) -> None:
        self.metrics.requests[status] = self.metrics.requests.get(status, 0) + 1


def _number(body: dict, name: str, default: float):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name} must be a number, got {value!r}", param=name)
    return float(value)


def _usage(done: dict) -> dict:
    p, c = done.get("prompt_tokens", 0), done.get("completion_tokens", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": done.get("cached_tokens", 0)}}


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
