"""What every request passes before a route sees it: the API key and the body-size bound.

A plain ASGI middleware rather than FastAPI dependencies, so that it also covers unknown routes
(an unauthenticated client learns nothing, not even which paths exist) and reads no more than
``max_body_bytes`` of any body, whatever the route: a body over the bound is answered 413 before
JSON parsing allocates anything for it.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .protocol import error_body

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Guard:
    """Refuses a request without ``Authorization: Bearer <api_key>`` (401; ``open_paths`` are
    exempt: the health check) and one whose body is over ``max_body_bytes`` (413). The body of an
    accepted request is read here and handed on whole, so a route never waits on a slow sender
    with the engine's work already queued."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, open_paths: Iterable[str] = ("/health",)):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        if self.api_key and scope["path"] not in self.open_paths and not self._authorized(headers):
            await _refuse(
                send,
                401,
                "missing or wrong API key: send `Authorization: Bearer <key>`",
                "invalid_api_key",
                extra_headers=[(b"www-authenticate", b"Bearer")],
            )
            return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await self._too_large(send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before its request was complete: nothing to answer
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:  # chunked bodies declare no length
                await self._too_large(send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        # compare_digest takes time independent of where the strings differ: the key cannot be
        # found a byte at a time by timing refusals.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def _too_large(self, send: Send) -> None:
        await _refuse(send, 413, f"request body over {self.max_body_bytes} bytes", "request_too_large")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the body already read, then the client's own (which later reports
    a disconnect: how a running request learns that its client has gone)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _refuse(
    send: Send, status: int, message: str, code: str, extra_headers: list[tuple[bytes, bytes]] = ()
) -> None:
    payload = json.dumps(error_body(status, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    # A refused body may still be on its way: closing the connection spares reading it.
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers + list(extra_headers)})
    await send({"type": "http.response.body", "body": payload})
