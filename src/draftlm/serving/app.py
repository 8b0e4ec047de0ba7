"""The HTTP layer of `draftlm serve`: a FastAPI app over one loaded model.

`build_app` puts what the routes share on `app.state` (`lm`, `drafter`, `worker`,
`settings`), mounts the routers of `serving.routes` (the OpenAI endpoints; health and
metrics), puts the request gate (`serving.gate`: API key, body size) in front of them, and
answers every error in OpenAI's JSON shape. Everything a client can get wrong is
answered with a 4xx status before the request reaches the model; generation itself runs
on one worker thread (`serving.worker`). No endpoint takes a file name, a template or
code from the client: the chat template is the model's own, rendered in a sandbox.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from draftlm.errors import DraftlmError
from draftlm.load import LM
from draftlm.serving import DEFAULT_MAX_BODY_BYTES
from draftlm.serving.gate import RequestGate
from draftlm.serving.protocol import APIError, schema_param
from draftlm.serving.routes import ServerSettings, openai_router, ops_router
from draftlm.serving.worker import GenerationWorker


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
    app = FastAPI(title="draftlm", lifespan=_lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.lm = lm
    app.state.drafter = drafter
    app.state.worker = worker
    app.state.settings = ServerSettings(api_key, max_queue, max_tokens_limit, max_body_bytes)
    app.include_router(openai_router)
    app.include_router(ops_router)
    add_request_gate(app)
    add_error_handlers(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    worker: GenerationWorker = app.state.worker
    worker.start()
    try:
        yield
    finally:
        await asyncio.to_thread(worker.stop)


def add_request_gate(app: FastAPI) -> None:
    """The API key and body-size checks, in front of every route; refusals count as
    rejected requests."""
    settings: ServerSettings = app.state.settings
    metrics = app.state.worker.metrics
    app.add_middleware(RequestGate, api_key=settings.api_key,
                       max_body_bytes=settings.max_body_bytes,
                       on_reject=lambda: metrics.add(requests_rejected_total=1))


# ---- errors: always OpenAI's shape -------------------------------------------------------
def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(DraftlmError, on_user_error)
    app.add_exception_handler(RequestValidationError, on_schema_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_bug)


def error_response(request: Request, err: APIError) -> JSONResponse:
    if 400 <= err.status < 500:
        request.app.state.worker.metrics.add(requests_rejected_total=1)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def on_api_error(request: Request, err: APIError) -> JSONResponse:
    return error_response(request, err)


async def on_user_error(request: Request, err: DraftlmError) -> JSONResponse:
    return error_response(request, APIError(400, str(err)))


async def on_schema_error(request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0] if err.errors() else {}
    param, union = schema_param(first.get("loc", ()))
    message = first.get("msg", "invalid request")
    if union:
        message = f"none of the accepted forms matches ({message})"
    # 400 with OpenAI's error body, not FastAPI's 422: the official clients then raise
    # BadRequestError, as they do against OpenAI for the same request.
    return error_response(request, APIError(
        400, f"{param}: {message}" if param else message, param=param, code="invalid_value",
    ))


async def on_http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    code = "not_found" if err.status_code == 404 else None
    return error_response(request, APIError(err.status_code, str(err.detail), code=code))


async def on_bug(request: Request, err: Exception) -> JSONResponse:
    # Only draftlm's own bugs get here: everything a client sends is checked above.
    return error_response(request, APIError(500, "internal server error; see the server log",
                                            "server_error", code="internal_error"))
