"""The request gate of `draftlm serve`: ASGI middleware in front of every route that
checks the API key and the body size before FastAPI parses anything."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse

from draftlm.serving.protocol import APIError


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
        try:
            headers = dict(scope.get("headers") or [])
            self._check_headers(scope["path"], headers)
            body = await self._read_body(receive)
        except APIError as err:
            await self._reject(send, err)
            return
        if body is None:  # the client left before sending it all
            return
        await self.app(scope, _replay(body, receive), send)

    def _check_headers(self, path: str, headers: dict[bytes, bytes]) -> None:
        """Raise the 401 or 413 that the headers alone already call for."""
        if self.api_key is not None and path not in self.open_paths:
            problem = key_problem(headers.get(b"authorization", b""), self.api_key)
            if problem:
                raise APIError(401, problem, code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()

    async def _read_body(self, receive: Any) -> bytes | None:
        """The whole body (413 as soon as it outgrows the limit); None on a disconnect."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                raise self._too_large()
        return b"".join(chunks)

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


def _replay(body: bytes, receive: Any) -> Callable[[], Awaitable[dict]]:
    """A `receive` that hands the app the buffered body, then defers to the client's."""
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later receives only report a disconnect

    return replay
