"""The endpoints of `draftlm serve`, as two routers that `build_app` mounts.

- `openai_router`: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (SSE or not).
- `ops_router`: `/health` and `/metrics` (JSON, or Prometheus text with
  `?format=prometheus`).

The routes hold no state of their own: they read what they serve from `app.state`, which
`build_app` fills with `lm`, `drafter`, `worker` and `settings` (`ServerSettings`).
A request is validated here (`make_job`, 4xx before it reaches the model), then handed
to the worker thread, whose events become one response or an SSE stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from draftlm.errors import DraftlmError
from draftlm.generate import check_context
from draftlm.load import LM
from draftlm.sampling import SamplingParams
from draftlm.serving.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    ResponseWriter,
    SamplingFields,
    chat_prompt_ids,
    completion_prompt_ids,
    error_body,
)
from draftlm.serving.worker import GenerationWorker, Job


@dataclass(frozen=True)
class ServerSettings:
    """The limits `build_app` was given, kept on `app.state.settings`."""

    api_key: str | None
    max_queue: int
    max_tokens_limit: int
    max_body_bytes: int


openai_router = APIRouter()
ops_router = APIRouter()


# ---- /health, /metrics -------------------------------------------------------------------
@ops_router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request) -> JSONResponse:
    state = request.app.state
    worker: GenerationWorker = state.worker
    # 503 once the generation thread is gone, so a supervisor can restart the server.
    body = {"status": "ok" if worker.alive else "stopped", "model": state.lm.name,
            "queue_depth": worker.queue_depth, "in_flight": worker.in_flight}
    return JSONResponse(body, status_code=200 if worker.alive else 503)


@ops_router.get("/metrics", response_model=None)
async def get_metrics(request: Request, format: str = "json") -> dict[str, Any] | PlainTextResponse:
    state = request.app.state
    worker: GenerationWorker = state.worker
    speculative = state.drafter is not None
    snap = worker.metrics.snapshot(worker.queue_depth, worker.in_flight, speculative)
    if format == "prometheus":
        return PlainTextResponse(prometheus_text(snap))
    if format != "json":
        raise APIError(400, "format must be json or prometheus", param="format")
    return {"model": state.lm.name, "speculative": speculative, **snap}


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


# ---- /v1 ---------------------------------------------------------------------------------
@openai_router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(request)]}


@openai_router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    check_model(model_id, request.app.state.lm)
    return model_card(request)


@openai_router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Any:
    # Tokenizing a large prompt takes a while: keep it off the event loop.
    ids = await asyncio.to_thread(completion_prompt_ids, request.app.state.lm, body.prompt)
    return await respond(request, body, ids, body.max_tokens, chat=False)


@openai_router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatRequest, request: Request) -> Any:
    messages = [m.as_template_message() for m in body.messages]
    ids = await asyncio.to_thread(chat_prompt_ids, request.app.state.lm, messages)
    return await respond(request, body, ids, body.requested_max_tokens(), chat=True)


def model_card(request: Request) -> dict[str, Any]:
    state = request.app.state
    return {"id": state.lm.name, "object": "model",
            "created": int(state.worker.metrics.started_at), "owned_by": "draftlm"}


def check_model(model_id: str, lm: LM) -> None:
    if model_id != lm.name:
        raise APIError(404, f"no model {model_id!r}; this server serves {lm.name!r}",
                       param="model", code="model_not_found")


async def respond(
    request: Request, body: SamplingFields, prompt_ids: list[int],
    max_tokens: int | None, chat: bool,
) -> Any:
    """Queue the generation, then answer with its SSE stream or its full response."""
    state = request.app.state
    job = make_job(body, prompt_ids, max_tokens, state.lm, state.settings.max_tokens_limit)
    state.worker.submit(job)
    writer = ResponseWriter(chat, state.lm.name)
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


def make_job(
    body: SamplingFields, prompt_ids: list[int], max_tokens: int | None, lm: LM,
    max_tokens_limit: int,
) -> Job:
    """The worker's job for a request, or the APIError (4xx) that refuses it."""
    if body.model:
        check_model(body.model, lm)
    check_supported(body)
    max_tokens = resolve_max_tokens(max_tokens, max_tokens_limit)
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


def check_supported(body: SamplingFields) -> None:
    if body.n != 1:
        raise APIError(400, f"n must be 1 (one choice per request), got {body.n}", param="n")
    unsupported = body.unsupported()
    if unsupported:
        raise APIError(400, f"{unsupported[0]} is not supported by draftlm",
                       param=unsupported[0], code="unsupported_parameter")


def resolve_max_tokens(max_tokens: int | None, max_tokens_limit: int) -> int:
    """The request's max_tokens, the server's limit when it names none."""
    if max_tokens is None:
        return max_tokens_limit
    if max_tokens > max_tokens_limit:
        raise APIError(400, f"max_tokens is {max_tokens} but this server allows at most "
                       f"{max_tokens_limit}", param="max_tokens")
    return max_tokens


# ---- from the worker's events to a response ----------------------------------------------
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
