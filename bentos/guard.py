"""An ASGI middleware in front of every route: the bearer-token check and the body-size limit.

BentoML serves without authentication and accepts bodies of any size (ARCHITECTURE.md §7). When
`SHELFWISE_API_TOKEN` is set, write and admin routes (`/events`, `/admin/…`), the experiments
with their results (`/experiments`: revenue per impression is the shop's own business) and
`/history` (what a shopper viewed and bought is not for shop front-ends to read) require
`Authorization: Bearer <token>` (the scheme in any case, the token compared as UTF-8 bytes in
constant time); the recommendation routes stay open, as shop front-ends call them, and so do the
inspector page and the API docs (`GET /`, `/docs`: pages that hold no data; the page sends the
token it is given with its API calls). Every request
body must declare its length and stay under `SHELFWISE_MAX_BODY_BYTES` (default 1 MiB), so an
oversized body is refused before it is read.
"""

import hmac

from bentos.contract import refuse
from shelfwise.settings import Settings

PROTECTED_PREFIXES = ("/events", "/admin", "/experiments", "/history")


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
            if not self._authorized(headers.get("authorization", b"")):
                return await refuse(
                    send,
                    401,
                    "Authorization",
                    "this route needs 'Authorization: Bearer <SHELFWISE_API_TOKEN>'",
                    scope["path"],
                    extra=[(b"www-authenticate", b"Bearer")],
                )
        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length is None:
                message = "the body must declare its size"
                return await refuse(send, 411, "Content-Length", message, scope["path"])
            try:
                size = int(length)
            except ValueError:
                return await refuse(send, 400, "Content-Length", "not a number", scope["path"])
            if size > self.max_body_bytes:
                message = f"{size} bytes is over the limit of {self.max_body_bytes}"
                return await refuse(send, 413, "body", message, scope["path"])
        return await self.app(scope, receive, send)

    def _authorized(self, header: bytes) -> bool:
        """`Bearer <token>`: the scheme in any case (RFC 7235), the token as its UTF-8 bytes."""
        scheme, _, offered = header.strip().partition(b" ")
        expected = self.token.encode("utf-8")
        return scheme.lower() == b"bearer" and hmac.compare_digest(offered.strip(), expected)
