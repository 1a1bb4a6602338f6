"""The OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions, /v1/completions, /health.

FastAPI on uvicorn: the request and response shapes are pydantic models like the rest of
fewtune's configuration, streaming is a plain server-sent-events response, and uvicorn finishes
in-flight requests on SIGINT/SIGTERM before the worker thread is stopped.

What a request gets is what the run was trained for: its prompt is rendered by the run's own
template (the one render function), the run's stop strings always apply (the request's are added),
and settings the request leaves out come from the run's ``generate`` section. Content parts other
than text (images, audio, files) are refused with a 400 and never fetched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fewtune.config import GenerateSection
from fewtune.data.formats import Message
from fewtune.generate import is_empty, prompt_ids
from fewtune.serve.engine import Batcher, Job, QueueFull, Served, describe, prompt_limit_error

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- request shapes


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """Settings both endpoints take; None: the run's own generate settings."""

    model_config = ConfigDict(extra="ignore")  # clients send fields this server has no use for (logit_bias, user)

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]
    echo: bool = False


def _text(message: ChatMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        kind = part.get("type")
        if kind == "text":
            parts.append(str(part.get("text", "")))
        else:
            raise APIError(400, f"messages[{index}] has a '{kind}' content part: this server's models take text only "
                           "(nothing was fetched)", param=f"messages[{index}].content")
    return "".join(parts)


def settings(served: Served, req: Sampling) -> GenerateSection:
    """The run's generate section with the request's values on top."""
    base = served.loaded.config.generate if served.loaded.config is not None else GenerateSection()
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise APIError(400, "at most 4 stop sequences", param="stop")
    update: dict[str, Any] = {"num_return_sequences": req.n, "stop": list(dict.fromkeys(list(base.stop) + stops))}
    if req.temperature is not None:
        update["temperature"] = req.temperature
    if req.top_p is not None:
        update["top_p"] = req.top_p
    if req.top_k is not None:
        update["top_k"] = req.top_k
    limit = req.max_completion_tokens or req.max_tokens
    if limit is not None:
        update["max_new_tokens"] = limit
    return base.model_copy(update=update)


# ---------------------------------------------------------------- the app


def create_app(models: dict[str, Served], api_key: str | None = None, batcher: Batcher | None = None):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    batcher = batcher or Batcher()

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        # uvicorn has finished the open requests by now; the worker ends once its queue is empty
        await asyncio.get_running_loop().run_in_executor(None, batcher.stop)

    app = FastAPI(title="fewtune", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    app.state.models = models

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        return JSONResponse(APIError(400, message, param=where or None).body(), status_code=400)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if given != f"Bearer {api_key}":
                what = "no API key given" if not given else "the API key is wrong"
                return JSONResponse(APIError(401, f"{what}: send 'Authorization: Bearer KEY'",
                                             code="invalid_api_key").body(), status_code=401)
        return await call_next(request)

    def model_for(name: str) -> Served:
        if name not in models:
            raise APIError(404, f"The model `{name}` does not exist; served here: {', '.join(models)}",
                           code="model_not_found", param="model")
        return models[name]

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(models), "waiting": batcher.waiting()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": describe(models)}

    async def run(served: Served, req: Sampling, conversations: list[list[Message]], kind: str):
        gen = settings(served, req)
        prompts = []
        for i, conversation in enumerate(conversations):
            if is_empty(conversation):
                raise APIError(400, "the last message (or the prompt) is empty: give some text to answer",
                               param="messages" if kind == "chat" else "prompt")
            ids = prompt_ids(served.loaded, conversation)
            problem = prompt_limit_error(served, ids, gen.max_new_tokens)
            if problem:
                raise APIError(400, problem, code="context_length_exceeded",
                               param="messages" if kind == "chat" else "prompt")
            prompts.append(ids)
        loop = asyncio.get_running_loop()
        stops = list(dict.fromkeys(served.loaded.template.stop_strings(served.loaded.tokenizer) + list(gen.stop)))
        job = Job(served, prompts, gen, req.seed, loop, loop.create_future(),
                  asyncio.Queue() if req.stream else None, stops)
        try:
            batcher.submit(job)
        except QueueFull as err:
            raise APIError(429, f"the server is busy: {err}", type_="rate_limit_error", code="queue_full") from None
        return job, prompts

    def usage(prompts: list[list[int]], results) -> dict:
        p = sum(len(ids) for ids in prompts)
        c = sum(out.tokens for outs in results for out in outs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        served = model_for(req.model)
        conversation = [Message("system" if m.role == "developer" else m.role, _text(m, i))
                        for i, m in enumerate(req.messages)]
        if conversation[-1].role == "assistant":
            raise APIError(400, "the last message is the assistant's: end with a user message", param="messages")
        job, prompts = await run(served, req, [conversation], "chat")
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(_stream(job, prompts, req, ident, created, chat=True),
                                     media_type="text/event-stream")
        results = await job.future
        choices = [{"index": k, "message": {"role": "assistant", "content": out.text}, "logprobs": None,
                    "finish_reason": out.finish_reason} for k, out in enumerate(results[0])]
        return {"id": ident, "object": "chat.completion", "created": created, "model": req.model,
                "choices": choices, "usage": usage(prompts, results), "system_fingerprint": None}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        served = model_for(req.model)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not texts:
            raise APIError(400, "prompt is empty", param="prompt")
        # a prompt is one user turn in the run's training template: the model answers as it was trained to
        job, prompts = await run(served, req, [[Message("user", t)] for t in texts], "completion")
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(_stream(job, prompts, req, ident, created, chat=False),
                                     media_type="text/event-stream")
        results = await job.future
        choices = [{"index": i * req.n + k, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
                   for i, outs in enumerate(results) for k, out in enumerate(outs)]
        return {"id": ident, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, "usage": usage(prompts, results), "system_fingerprint": None}

    async def _stream(job: Job, prompts, req: Sampling, ident: str, created: int, chat: bool):
        """Server-sent events as OpenAI sends them: for chat a first chunk with the assistant role, then text
        chunks, a chunk with each output's finish_reason, a usage chunk when asked for, then [DONE]."""
        with_usage = bool(req.stream_options and req.stream_options.include_usage)
        fields = {"object": "chat.completion.chunk" if chat else "text_completion", "system_fingerprint": None}

        def chunk(choices: list, **extra) -> str:
            body = {"id": ident, "created": created, "model": req.model, **fields, "choices": choices, **extra}
            if with_usage and "usage" not in body:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def choice(prompt: int, seq: int, text: str | None, finish: str | None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": seq, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": prompt * req.n + seq, "text": text or "", "logprobs": None, "finish_reason": finish}

        if chat:
            yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for k in range(req.n)])
        async for event in _events(job):
            if event[0] == "delta":
                _, prompt, seq, text = event
                yield chunk([choice(prompt, seq, text, None)])
            elif event[0] == "done":
                results = event[1]
                yield chunk([choice(i, k, None, out.finish_reason) for i, outs in enumerate(results)
                             for k, out in enumerate(outs)])
                if with_usage:
                    yield chunk([], usage=usage(prompts, results))
            else:
                yield f"data: {json.dumps(APIError(500, str(event[1]), 'server_error').body())}\n\n"
        yield "data: [DONE]\n\n"

    return app


async def _events(job: Job):
    """The job's stream events up to and including its end ('done' or 'error')."""
    while True:
        event = await job.events.get()
        yield event
        if event[0] in ("done", "error"):
            return
