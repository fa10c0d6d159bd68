"""The service's HTTP contract, kept in front of BentoML: what a client may send, what it gets back.

BentoML 1.4.40 parses a body by its `Content-Type` (a multipart body without a boundary becomes a
500), answers validation errors with a list under `detail` where its own OpenAPI document says a
string, and logs every client error at ERROR with a full traceback (ARCHITECTURE.md §7). So
`RequestContract`, an ASGI middleware behind `bentos.guard.RequestGuard` (auth, body size):

- answers anything but `application/json` on an API route with 415, before a parser sees it;
- validates the body with the route's own request model (the `input_spec` BentoML validates with
  again, so the two cannot disagree) and answers the first error as `ErrorResponse`
  (`{"error", "field"}`, the shape of every client error the service sends), with one log line
  at INFO and no traceback; the body is then handed on unchanged;
- serves `/docs.json`, BentoML's OpenAPI document completed by `document_contract`: every status
  the service sends with its body, and nullable fields declared nullable (OpenAPI 3.0).

A request that passes costs one more pydantic validation of a small body (tens of µs).
"""

import json
import logging
from collections.abc import Callable, Mapping
from importlib import metadata as package_metadata
from typing import Any

from pydantic import BaseModel, ValidationError

from bentos.api_models import ErrorResponse, EventIn
from shelfwise.settings import Settings

logger = logging.getLogger("bentoml.shelfwise")

JSON = "application/json"
DOCS = "/docs.json"
_MESSAGE_CHARS = 300  # of a logged or answered validation message (inputs are never echoed)

# Statuses the service answers itself on every API route, besides 200 and 400.
COMMON_ERRORS = {
    411: "The body does not declare its length (Content-Length).",
    413: "The body is over SHELFWISE_MAX_BODY_BYTES.",
    415: "The body is not application/json.",
    429: "Too many requests at once for this worker: retry after the Retry-After header.",
    503: "The worker is overloaded or not ready: retry after the Retry-After header.",
    500: "An error of the service (a bug): the body says no more than that.",
}
UNAUTHORIZED = "Authorization: Bearer <SHELFWISE_API_TOKEN> is missing or wrong (when it is set)."
# The document's description, in place of BentoML's README, whose badges the OpenAPI page would
# fetch from the internet (the page must work offline, like the inspector).
API_DESCRIPTION = (
    "Shelfwise's recommendation service: recommendations, similar items, feedback events and a "
    "user's history. The inspector page at `/` looks at a user through this API. Every client "
    "error has the shape `ErrorResponse`, naming the field."
)


API_TITLE = "Shelfwise"


def _package_version() -> str:
    """The installed Shelfwise's version (a bento carries its own tag instead)."""
    try:
        return package_metadata.version("shelfwise")
    except package_metadata.PackageNotFoundError:
        return "unreleased"


class RequestContract:
    """Refuses non-JSON bodies (415) and invalid requests (400) before BentoML parses them."""

    def __init__(
        self,
        app,
        routes: Mapping[str, tuple[type[BaseModel], type[BaseModel]]],
        protected: tuple[str, ...],
        openapi: Callable[[], dict[str, Any]],
    ) -> None:
        self.app = app
        self.apis = dict(routes)
        self.routes = {route: request for route, (request, _) in routes.items()}
        self.protected = protected
        self.openapi = openapi
        self._document: bytes | None = None
        # Read when the worker builds its app (start-up), not at import.
        self.context = {"earliest": Settings.from_env().earliest_event_at}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path == DOCS and scope["method"] == "GET":
            return await self._send_document(send)
        model = self.routes.get(path)
        if model is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        media_type = _header(scope, b"content-type").split(";")[0].strip().lower()
        if media_type != JSON:
            return await refuse(
                send, 415, "Content-Type", f"expected {JSON}, got {media_type or 'nothing'}", path
            )
        body = await _read_body(receive)
        try:
            model.model_validate_json(body or b"{}", context=self.context)
        except ValidationError as error:
            field, message = first_error(error)
            return await refuse(send, 400, field, message, path)
        return await self.app(scope, _replay(body, receive), send)

    async def _send_document(self, send) -> None:
        if self._document is None:
            spec = document_contract(self.openapi(), self.apis, self.protected)
            self._document = json.dumps(spec).encode()
        await _send(send, 200, self._document)


def first_error(error: ValidationError) -> tuple[str, str]:
    """The first error of a validation as (dotted field path, message), without the input."""
    [first, *_] = error.errors(include_input=False, include_url=False)
    field = ".".join(str(part) for part in first["loc"]) or "body"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "is not a field of this request (unknown keys are refused, not ignored)"
    elif first["type"] == "json_invalid":
        message = f"the body is not valid JSON: {message}"
    return field, message[:_MESSAGE_CHARS]


async def refuse(send, status: int, field: str, message: str, path: str = "", extra=()) -> None:
    """Answers a client error as `ErrorResponse`, logged as one line at INFO."""
    logger.info("%s %s: %s: %s", status, path, field, message[:_MESSAGE_CHARS])
    body = ErrorResponse(error=message, field=field).model_dump_json().encode()
    await _send(send, status, body, extra)


async def _send(send, status: int, body: bytes, extra=()) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", JSON.encode()),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


async def _read_body(receive) -> bytes:
    """The whole body (its size is bounded by `RequestGuard`'s Content-Length check)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A `receive` that gives the already read body once, then defers to the real one."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def document_contract(
    spec: dict[str, Any],
    routes: Mapping[str, tuple[type[BaseModel], type[BaseModel]]],
    protected: tuple[str, ...] = (),
) -> dict[str, Any]:
    """BentoML's OpenAPI document, completed with what the service really answers.

    Per API route: the request body is the route's model (unknown keys refused), the 200 body
    its response model (BentoML inlines it and loses `null` on the way); 400 and every
    status of `COMMON_ERRORS` are `ErrorResponse` (on `/events`, a 400 can also be the
    `EventsResponse` listing every event rejected); 401 on protected routes; BentoML's 404,
    which an API route never sends, is dropped. The description is `API_DESCRIPTION` (BentoML's
    links images on the internet). Then `anyOf: [X, {type: null}]`, which OpenAPI
    3.0 cannot read, becomes `X` with `nullable: true` everywhere.

    Args:
        spec: BentoML's document (`Service.openapi_spec.asdict()`).
        routes: API route -> (request model, response model).
        protected: Route prefixes that need the token when one is set.

    Returns:
        The completed document (a new dict).
    """
    spec = json.loads(json.dumps(spec))
    info = spec.setdefault("info", {})
    info.update(title=API_TITLE, description=API_DESCRIPTION)
    info.pop("contact", None)  # BentoML's team, who answer for BentoML, not for this API
    if info.get("version") in (None, "None"):  # served from source: no bento version
        info["version"] = _package_version()
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorResponse, EventIn):
        schemas[model.__name__] = _component(model, schemas)
    error = _json_body(error_schema())
    for route, (request, response) in routes.items():
        operation = spec["paths"][route]["post"]
        for model in (request, response):
            schemas[model.__name__] = _component(model, schemas)
        operation["requestBody"] = {"required": True, **_json_body(_ref(request))}
        responses = operation["responses"]
        responses.pop("404", None)
        ok = _ref(response)
        responses["200"] = {"description": "Successful Response", **_json_body(ok)}
        responses["400"] = {"description": "The request is invalid: the field is named.", **error}
        if route == "/events":
            # The body takes objects, so that one bad event does not refuse the others; each
            # must be an EventIn, which is what the document says. Every event rejected: the
            # per-event verdicts come with a 400.
            schemas[request.__name__]["properties"]["events"]["items"] = _ref(EventIn)
            responses["400"]["content"][JSON]["schema"] = {"oneOf": [error_schema(), ok]}
        if route.startswith(protected):
            responses["401"] = {"description": UNAUTHORIZED, **error}
        for status, description in COMMON_ERRORS.items():
            responses[str(status)] = {"description": description, **error}
    return _nullable(spec)


def error_schema() -> dict[str, str]:
    """The `$ref` of `ErrorResponse` in the document."""
    return _ref(ErrorResponse)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {JSON: {"schema": schema}}}


def _component(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema as a component; the models it uses join the components."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    return schema


def _nullable(node: Any) -> Any:
    """Rewrites `anyOf: [X, {"type": "null"}]` as X with `nullable: true` (OpenAPI 3.0)."""
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable(value) for key, value in node.items()}
    options = node.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options:
        rest = [option for option in options if option != {"type": "null"}]
        del node["anyOf"]
        if len(rest) == 1 and "$ref" not in rest[0]:
            node.update(rest[0])
        elif len(rest) == 1:
            node["allOf"] = rest
        else:
            node["anyOf"] = rest
        node["nullable"] = True
    return node
