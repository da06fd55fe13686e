"""What `tunesmith api` refuses before any route runs: a missing API key, a body over the size limit and a
body that stalls.

A plain ASGI middleware, not FastAPI's `@app.middleware("http")`: that wrapper hides a client's
disconnect from the route (which then cannot cancel its job) and reads no body itself. Here the body is
read once, counting bytes whatever the framing (Content-Length or chunked), and the request is answered
413 as soon as the count passes the limit, so a huge body is never held; the route then gets the bytes
read, and later `receive` calls (the disconnect) pass straight through. The whole body must arrive within
BODY_SECONDS of the headers, else the request is answered 408 and its connection closed: uvicorn bounds
the wait between requests (`timeout_keep_alive`) but not a body trickled or abandoned half-way, which
would otherwise hold its request open for as long as the client keeps the socket.
"""

from __future__ import annotations

import asyncio
import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunesmith.inference.api_errors import error_response

MAX_BODY_BYTES = 4 * 2**20
BODY_SECONDS = 60.0  # 4 MB in a minute is 70 kB/s; a client slower than that is stalled, not slow


def authorized(header: str | None, api_key: str) -> bool:
    """`Authorization: Bearer <key>`, the scheme in any case (RFC 7235), the key compared in constant time."""
    scheme, _, token = (header or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class Guard:
    """ASGI middleware: the API-key check, then the body read under MAX_BODY_BYTES within `body_seconds`
    (None: BODY_SECONDS as the app is built, which tests shorten)."""

    def __init__(self, app: ASGIApp, api_key: str | None = None, max_body: int = MAX_BODY_BYTES,
                 body_seconds: float | None = None) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body
        self.body_seconds = BODY_SECONDS if body_seconds is None else body_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.api_key is not None and not authorized(headers.get("authorization"), self.api_key):
            refusal = error_response(401, "Invalid or missing API key: send `Authorization: Bearer <key>`.",
                                     "authentication_error", code="invalid_api_key")
            return await refusal(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        deadline = asyncio.get_running_loop().time() + self.body_seconds
        while more:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                return await self._stalled(scope, receive, send)
            if message["type"] == "http.disconnect":
                return None  # the client left before sending its body: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await self._too_large(scope, receive, send)
            more = message.get("more_body", False)
        body: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return body.pop() if body else await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = error_response(413, f"Request body over {self.max_body // 2**20} MB.")
        refusal.headers["connection"] = "close"  # do not read the rest of the body as the next request
        await refusal(scope, receive, send)

    async def _stalled(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = error_response(408, f"The request body did not arrive within {self.body_seconds:g} seconds.",
                                 code="request_timeout")
        refusal.headers["connection"] = "close"  # the rest of the body may still come: do not read it as a request
        await refusal(scope, receive, send)
