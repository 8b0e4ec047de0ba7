"""The HTTP layer of `draftlm serve`: a FastAPI app over one loaded model.

Endpoints: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (streamed as SSE or
not), `/health` and `/metrics`. Everything a client can get wrong is answered with
OpenAI's error JSON and a 4xx status before the request reaches the model; generation
itself runs on one worker thread (`serving.worker`). No endpoint takes a file name, a
template or code from the client: the chat template is the model's own, rendered in a
sandbox.

`/metrics` answers JSON by default and Prometheus text with `?format=prometheus`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from draftlm.errors import DraftlmError
from draftlm.generate import check_context
from draftlm.load import LM
from draftlm.sampling import SamplingParams
from draftlm.serving import DEFAULT_MAX_BODY_BYTES
from draftlm.serving.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    ResponseWriter,
    SamplingFields,
    chat_prompt_ids,
    completion_prompt_ids,
    error_body,
    schema_param,
)
from draftlm.serving.worker import GenerationWorker, Job


class RequestGate:
    """ASGI middleware in front of every route: the API key, then the body size.

    Both are checked before the body is parsed, so a client without the key cannot make
    the server buffer or validate anything, and an oversized upload is refused (413)
    whether or not it declares its Content-Length. The accepted body (small by
    construction) is buffered here and replayed to the app."""

    def __init__(
        self, app: Any, api_key: str | None, max_body_bytes: int,
        on_reject: Callable[[], None], open_paths: tuple[str, ...] = ("/health",),
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.on_reject = on_reject
        self.open_paths = open_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope["path"] not in self.open_paths:
            problem = key_problem(headers.get(b"authorization", b""), self.api_key)
            if problem:
                await self._reject(send, APIError(401, problem, code="invalid_api_key",
                                                  headers={"WWW-Authenticate": "Bearer"}))
                return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reject(send, self._too_large())
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                await self._reject(send, self._too_large())
                return
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later receives only report a disconnect

        await self.app(scope, replay, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"request body is larger than {self.max_body_bytes} bytes",
                        code="request_too_large")

    async def _reject(self, send: Any, err: APIError) -> None:
        self.on_reject()
        response = JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        await response({"type": "http"}, _no_receive, send)


def key_problem(authorization: bytes, api_key: str) -> str | None:
    """Why an Authorization header does not carry `api_key`; None when it does."""
    scheme, _, token = authorization.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "missing API key: send 'Authorization: Bearer <key>'"
    # Constant time: how much of a guess matches must not show in the response time.
    if not hmac.compare_digest(token.strip().encode("latin-1"), api_key.encode()):
        return "incorrect API key"
    return None


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


class JobStream(StreamingResponse):
    """An SSE response that cancels its job however the response ends (finished, client
    gone, server shutting down), so an abandoned stream never keeps the model busy."""

    def __init__(self, content: AsyncIterator[str], job: Job) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def build_app(
    lm: LM,
    drafter: Any = None,
    *,
    api_key: str | None = None,
    max_queue: int = 64,
    max_tokens_limit: int = 1024,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    worker: GenerationWorker | None = None,
) -> FastAPI:
    """The ASGI app serving an already-loaded `lm` (and optional speculative `drafter`).

    The worker thread starts and stops with the app's lifespan; pass `worker` to supply
    one built elsewhere (tests do, to control timing)."""
    if max_tokens_limit < 1:
        raise DraftlmError(f"max_tokens_limit must be >= 1, got {max_tokens_limit}")
    worker = worker or GenerationWorker(lm, drafter, max_queue)
    metrics = worker.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="draftlm", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.worker = worker
    app.state.lm = lm
    app.add_middleware(RequestGate, api_key=api_key, max_body_bytes=max_body_bytes,
                       on_reject=lambda: metrics.add(requests_rejected_total=1))

    # ---- errors: always OpenAI's shape -------------------------------------------------
    def error_response(err: APIError) -> JSONResponse:
        if 400 <= err.status < 500:
            metrics.add(requests_rejected_total=1)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(DraftlmError)
    async def on_user_error(request: Request, err: DraftlmError) -> JSONResponse:
        return error_response(APIError(400, str(err)))

    @app.exception_handler(RequestValidationError)
    async def on_schema_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        param, union = schema_param(first.get("loc", ()))
        message = first.get("msg", "invalid request")
        if union:
            message = f"none of the accepted forms matches ({message})"
        return error_response(APIError(
            422, f"{param}: {message}" if param else message, param=param,
            code="invalid_value",
        ))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        return error_response(APIError(err.status_code, str(err.detail), code=code))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, err: Exception) -> JSONResponse:
        # Only draftlm's own bugs get here: everything a client sends is checked above.
        return error_response(APIError(500, "internal server error; see the server log",
                                       "server_error", code="internal_error"))

    # ---- endpoints ---------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        # 503 once the generation thread is gone, so a supervisor can restart the server.
        body = {"status": "ok" if worker.alive else "stopped", "model": lm.name,
                "queue_depth": worker.queue_depth, "in_flight": worker.in_flight}
        return JSONResponse(body, status_code=200 if worker.alive else 503)

    @app.get("/metrics", response_model=None)
    async def get_metrics(format: str = "json") -> dict[str, Any] | PlainTextResponse:
        snap = metrics.snapshot(worker.queue_depth, worker.in_flight, drafter is not None)
        if format == "prometheus":
            return PlainTextResponse(prometheus_text(snap))
        if format != "json":
            raise APIError(400, "format must be json or prometheus", param="format")
        return {"model": lm.name, "speculative": drafter is not None, **snap}

    model_card = {"id": lm.name, "object": "model", "created": int(metrics.started_at),
                  "owned_by": "draftlm"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != lm.name:
            raise APIError(404, f"no model {model_id!r}; this server serves {lm.name!r}",
                           param="model", code="model_not_found")
        return model_card

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        # Tokenizing a large prompt takes a while: keep it off the event loop.
        ids = await asyncio.to_thread(completion_prompt_ids, lm, body.prompt)
        return await respond(request, body, ids, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        messages = [m.as_template_message() for m in body.messages]
        ids = await asyncio.to_thread(chat_prompt_ids, lm, messages)
        return await respond(request, body, ids, body.requested_max_tokens(), chat=True)

    async def respond(
        request: Request, body: SamplingFields, prompt_ids: list[int],
        max_tokens: int | None, chat: bool,
    ) -> Any:
        job = make_job(body, prompt_ids, max_tokens)
        worker.submit(job)
        writer = ResponseWriter(chat, lm.name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return JobStream(stream_events(job, writer, include_usage), job)
        try:
            kind, payload = await wait_for_end(job, request)
        finally:
            job.cancel()  # a no-op once finished; stops the work if this handler is cancelled
        if kind == "error":
            raise payload
        if kind == "cancelled":  # the client is gone; this response goes nowhere
            return JSONResponse(error_body("request cancelled", "cancelled"), status_code=499)
        return writer.full(payload)

    def make_job(body: SamplingFields, prompt_ids: list[int], max_tokens: int | None) -> Job:
        if body.model and body.model != lm.name:
            raise APIError(404, f"no model {body.model!r}; this server serves {lm.name!r}",
                           param="model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, f"n must be 1 (one choice per request), got {body.n}",
                           param="n")
        unsupported = body.unsupported()
        if unsupported:
            raise APIError(400, f"{unsupported[0]} is not supported by draftlm",
                           param=unsupported[0], code="unsupported_parameter")
        if max_tokens is None:
            max_tokens = max_tokens_limit
        elif max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens} but this server allows at most "
                           f"{max_tokens_limit}", param="max_tokens")
        try:
            budget = check_context(len(prompt_ids), max_tokens, lm.config.max_seq_len)
        except DraftlmError as err:
            raise APIError(400, str(err), param="messages" if isinstance(body, ChatRequest)
                           else "prompt", code="context_length_exceeded") from None
        top_p = body.top_p if body.top_p < 1.0 else None
        SamplingParams(body.temperature, body.top_k, top_p)  # raises DraftlmError -> 400
        return Job(
            prompt_ids=prompt_ids, max_new_tokens=budget, temperature=body.temperature,
            top_k=body.top_k, top_p=top_p, seed=body.seed, stop=body.stop_strings(),
            stream=body.stream, loop=asyncio.get_running_loop(),
        )

    return app


async def wait_for_end(job: Job, request: Request, poll_s: float = 0.25) -> tuple[str, Any]:
    """The job's final event, cancelling it if the client disconnects while it waits."""
    get = asyncio.ensure_future(_final_event(job))
    try:
        while True:
            done, _ = await asyncio.wait({get}, timeout=poll_s)
            if done:
                return get.result()
            if await request.is_disconnected():
                job.cancel()
    finally:
        get.cancel()


async def _final_event(job: Job) -> tuple[str, Any]:
    while True:
        kind, payload = await job.events.get()
        if kind != "text":
            return kind, payload


async def stream_events(
    job: Job, writer: ResponseWriter, include_usage: bool
) -> AsyncIterator[str]:
    """SSE lines for one streamed request, ending with `data: [DONE]`."""
    if writer.chat:
        yield sse(writer.chunk("", first=True))
    while True:
        kind, payload = await job.events.get()
        if kind == "text":
            yield sse(writer.chunk(payload))
        elif kind == "done":
            yield sse(writer.chunk(None, payload.finish_reason))
            if include_usage:
                yield sse(writer.usage_chunk(payload))
            break
        elif kind == "error":
            yield sse(payload.body())
            break
        else:  # cancelled: the client is gone, nothing more to say
            return
    yield sse("[DONE]")


def prometheus_text(snap: dict[str, Any]) -> str:
    """The numeric metrics in Prometheus' text exposition format."""
    lines = []
    for key, value in snap.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        name = f"draftlm_{key}"
        lines.append(f"# TYPE {name} {'counter' if key.endswith('_total') else 'gauge'}")
        lines.append(f"{name} {value}")
    return "\n".join(lines) + "\n"
