"""Plain ASGI middleware for the API (not `@app.middleware("http")`: Starlette's
BaseHTTPMiddleware runs each request in a task group of its own and streams the response
through a queue): `HttpMiddleware`, the shape every one shares, and `BodyLimit`.
"""

from __future__ import annotations

from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

BODY_READ_KEY: Final = "ipab.body_bytes_read"  # in the scope: [bytes of the body read so far]


def body_bytes_read(scope: Scope) -> int:
    """How many bytes of the request's body were read (BodyLimit counts them)."""
    counter = scope.get(BODY_READ_KEY)
    return int(counter[0]) if counter else 0


class HttpMiddleware:
    """Sees HTTP requests in `http`; every other scope (lifespan) goes straight to the app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class BodyLimit(HttpMiddleware):
    """Refuse (413 problem) any request body past `limit_bytes`, declared or streamed; count what is
    read (`body_bytes_read`)."""

    def __init__(self, app: ASGIApp, *, limit_bytes: int) -> None:
        super().__init__(app)
        self.limit_bytes = limit_bytes

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit_bytes:
            await self._refuse(send)
            return
        seen = scope[BODY_READ_KEY] = [0]

        async def counted() -> Message:
            message = await receive()
            seen[0] += len(message.get("body", b""))
            if seen[0] > self.limit_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = (
            b'{"type":"https://ipab.dev/problems/too-large","title":"Content too large","status":413,'
            b'"detail":"the body is larger than %d bytes"}' % self.limit_bytes
        )
        headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    """Raised inside the app when the streamed body passes the limit."""
