"""An ASGI middleware in front of every route: the bearer-token check and the body-size limit.

BentoML serves without authentication and accepts bodies of any size (ARCHITECTURE.md §7). When
`SHELFWISE_API_TOKEN` is set, write and admin routes (`/events`, `/admin/…`) require
`Authorization: Bearer <token>`; read routes stay open, as shop front-ends call them. Every request
body must declare its length and stay under `SHELFWISE_MAX_BODY_BYTES` (default 1 MiB), so an
oversized body is refused before it is read.
"""

import hmac
import json

from shelfwise.settings import Settings

PROTECTED_PREFIXES = ("/events", "/admin")


class RequestGuard:
    """Refuses unauthenticated writes (401) and oversized or unsized bodies (413, 411)."""

    def __init__(self, app) -> None:
        self.app = app
        # Read when the worker builds its app (start-up), not at import.
        settings = Settings.from_env()
        self.token = settings.api_token
        self.max_body_bytes = settings.max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value for key, value in scope["headers"]}
        if self.token and scope["path"].startswith(PROTECTED_PREFIXES):
            offered = headers.get("authorization", b"").decode("latin-1")
            if not hmac.compare_digest(offered.encode(), f"Bearer {self.token}".encode()):
                return await _refuse(
                    send,
                    401,
                    "Authorization",
                    "this route needs 'Authorization: Bearer <SHELFWISE_API_TOKEN>'",
                    extra=[(b"www-authenticate", b"Bearer")],
                )
        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length is None:
                return await _refuse(send, 411, "Content-Length", "the body must declare its size")
            try:
                size = int(length)
            except ValueError:
                return await _refuse(send, 400, "Content-Length", "not a number")
            if size > self.max_body_bytes:
                return await _refuse(
                    send, 413, "body", f"{size} bytes is over the limit of {self.max_body_bytes}"
                )
        return await self.app(scope, receive, send)


async def _refuse(send, status: int, field: str, message: str, extra=()) -> None:
    body = json.dumps({"error": message, "field": field}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
