"""The service's own pages: the inspector at `GET /`, the OpenAPI page at `GET /docs`.

BentoML 1.4.40 answers `GET /` with its Swagger UI page, which also loads Google Tag Manager from
the internet. `ServicePages`, an ASGI middleware like the guard and the contract, answers first:

- `GET /` (any query string: `/?user_id=u17` opens the page on that user) is the inspector,
  `bentos/inspector/index.html`: one static file of HTML, CSS and JavaScript that calls the public
  API from the browser, with no build step and nothing loaded from elsewhere. A
  Content-Security-Policy holds it to that: only this origin, and only the page's own inline
  script and style (by their SHA-256), so no text the API returns (item ids come from shops'
  events) can run as code even if it reached the document as markup;
- `GET /docs` is the Swagger UI on BentoML's own bundled assets (`/static_content/…`) and the
  service's completed OpenAPI document (`/docs.json`, `bentos.contract`), without the tag manager.

The pages hold no data, so they are public; the API routes behind them keep their guard
(`bentos.guard`): the inspector asks for the token and sends it with its calls.
"""

import base64
import hashlib
import re
from pathlib import Path

INSPECTOR_PATH = "/"
DOCS_PATH = "/docs"
INSPECTOR_FILE = Path(__file__).parent / "inspector" / "index.html"

# BentoML's Swagger UI assets (mounted by BentoML at /static_content); the initializer loads
# ./docs.json, which is /docs.json from /docs.
DOCS_PAGE = b"""<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>Shelfwise API</title>
    <link rel="stylesheet" type="text/css" href="/static_content/swagger-ui.css" />
    <link rel="stylesheet" type="text/css" href="/static_content/index.css" />
    <link rel="icon" type="image/png" href="/static_content/favicon-light-32x32.png" />
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="/static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="/static_content/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
    <script src="/static_content/swagger-initializer.js" charset="UTF-8"></script>
  </body>
</html>
"""

_HTML = b"text/html; charset=utf-8"
_COMMON_HEADERS = [
    (b"content-type", _HTML),
    (b"cache-control", b"no-cache"),
    (b"x-content-type-options", b"nosniff"),
    # The page's address may name a user: it is not sent anywhere.
    (b"referrer-policy", b"no-referrer"),
]


def content_security_policy(page: str) -> str:
    """The policy of a page whose only script and style are its inline blocks.

    Args:
        page: The page's HTML.

    Returns:
        A `Content-Security-Policy` allowing this origin for requests and exactly the page's
        inline `<script>` and `<style>` blocks (by SHA-256) as code and style.
    """

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()}'"
            for block in blocks
        )

    return (
        "default-src 'none'; "
        f"script-src {hashes('script')}; "
        f"style-src {hashes('style')}; "
        "connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


class ServicePages:
    """Answers `GET /` with the inspector and `GET /docs` with the OpenAPI page."""

    def __init__(self, app) -> None:
        self.app = app
        # Read when the worker builds its app (start-up); the bento ships the file.
        page = INSPECTOR_FILE.read_text(encoding="utf-8")
        self._inspector = page.encode("utf-8")
        self._policy = content_security_policy(page).encode("ascii")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path == INSPECTOR_PATH:
            extra = [(b"content-security-policy", self._policy)]
            return await _send_page(scope, send, self._inspector, extra)
        if path == DOCS_PATH:
            return await _send_page(scope, send, DOCS_PAGE)
        return await self.app(scope, receive, send)


async def _send_page(scope, send, body: bytes, extra=()) -> None:
    headers = [*_COMMON_HEADERS, (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
