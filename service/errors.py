"""Every error answer has one shape: {"error": {"code", "message", "param"}}.

Handlers live here, in one place: bad input is a 4xx naming the parameter, a dead dependency is
a 503, and only a real bug becomes a 500 (still in the same shape, logged with its traceback).
"""

from __future__ import annotations

import email.message
import logging
from collections.abc import Mapping
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract.jobs import ErrorCode
from contract.state import UnreadableRecord

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers


def error_response(
    status: int,
    code: ErrorCode | str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": str(code), "message": message, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


# The OpenAI-compatible routes answer in OpenAI's error shape, which its client libraries parse.
OPENAI_PREFIX = "/v1/images/"
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error_response(
    status: int,
    code: ErrorCode | str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    # OpenAI reports bad input as 400, not 422.
    status = 400 if status == 422 else status
    kind = _OPENAI_TYPES.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": str(code)}}
    return JSONResponse(body, status_code=status, headers=headers)


def pool_exhausted(exc: BaseException) -> bool:
    """Whether a Redis error is this process's connection pool at its limit, not Redis away:
    redis-py raises MaxConnectionsError from a full pool, and a ConnectionError of its own words
    from a blocking pool that waited in vain (ApiServices.async_redis)."""
    return isinstance(exc, redis.exceptions.MaxConnectionsError) or (
        isinstance(exc, redis.exceptions.ConnectionError)
        and str(exc) == "No connection available."
    )


def error_response_at(
    path: str,
    status: int,
    code: ErrorCode | str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The error in the shape the route at `path` speaks: OpenAI's under its prefix."""
    if path.startswith(OPENAI_PREFIX):
        return openai_error_response(status, code, message, param, headers)
    return error_response(status, code, message, param, headers)


_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}
# FastAPI's words (a 400) for a body whose reading or decoding raised anything but a JSON syntax
# error: the exception it raised is the HTTPException's __cause__.
_FASTAPI_UNPARSEABLE_BODY = "There was an error parsing the body"
# The errors pydantic gives a body that is not an object at all (a model's own validators may
# also report at the body's location: those keep their words).
_NOT_AN_OBJECT = {"missing", "model_attributes_type", "dict_type", "model_type"}


def _whole_body_error(error: Mapping[str, Any], content_type: str | None) -> tuple[int, str] | None:
    """A problem with the body as a whole, in words a caller can act on: pydantic's speak of
    dictionaries and of a character offset as if it were a field. None for a field's error."""
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "invalid JSON")
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        return 422, f"the body is not valid JSON: {reason}{where}"
    if loc != ("body",) or error.get("type") not in _NOT_AN_OBJECT:
        return None
    if not _is_json(content_type):
        # FastAPI reads a body as JSON only when it is labelled so (curl -d labels it a form).
        said = f"'{content_type}'" if content_type else "none"
        return 415, f"send the body as JSON with Content-Type: application/json (got {said})"
    if error.get("type") == "missing":
        return 422, "the body is empty; send a JSON object"
    return 422, "the body must be a JSON object"


def _unparseable_body(cause: BaseException | None) -> tuple[int, str]:
    """What was wrong with a body FastAPI could not decode: a 422 like any other JSON the body
    cannot be read as (_whole_body_error), 400 only for a body that could not be received."""
    if isinstance(cause, RecursionError):
        # json.loads recurses once per array or object: ~1000 levels exhaust Python's stack.
        return 422, "the body could not be parsed as JSON: it is nested too deeply"
    if isinstance(cause, UnicodeError):
        return 422, "the body is not valid JSON: it is not UTF-8 text"
    if isinstance(cause, ValueError):
        if "integer string conversion" in str(cause):  # Python's int_max_str_digits (4300)
            return 422, "the body could not be parsed as JSON: a number in it has too many digits"
        return 422, "the body could not be parsed as JSON"
    return 400, "the body could not be read"


def _is_json(content_type: str | None) -> bool:
    """As FastAPI decides whether to parse a body as JSON: application/json or */*+json."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    main, sub = message.get_content_maintype(), message.get_content_subtype()
    return main == "application" and (sub == "json" or sub.endswith("+json"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response_at(
            request.url.path, exc.status, exc.code, exc.message, exc.param, exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        whole_body = _whole_body_error(first, request.headers.get("content-type"))
        if whole_body is not None:
            status, message = whole_body
            return error_response_at(
                request.url.path, status, ErrorCode.INVALID_REQUEST, message, None
            )
        # loc is ("body", "width") for body fields; the param is the path below the section.
        section, *rest = first.get("loc", ()) or ("",)
        loc = [str(p) for p in rest] if section in ("body", "query", "path", "header") else []
        if section == "header":  # as clients spell it: Idempotency-Key, not idempotency-key
            loc = ["-".join(word.capitalize() for word in name.split("-")) for name in loc]
        # A validator's own words, without pydantic's label for how they were raised.
        detail = str(first.get("msg")).removeprefix("Value error, ")
        if loc[-1:] == ["[key]"]:  # a mapping's key, as pydantic places it: name the mapping
            *loc, key, _ = loc
            detail = f"key {key!r}: {detail}"
        param = ".".join(loc) or None
        message = f"{param}: {detail}" if param else detail
        return error_response_at(request.url.path, 422, ErrorCode.INVALID_REQUEST, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        code = _HTTP_CODES.get(status, ErrorCode.INVALID_REQUEST)
        message = str(exc.detail)
        headers = dict(exc.headers or {})
        if status == 405:
            allowed = next((v for k, v in headers.items() if k.lower() == "allow"), "another")
            message = f"{request.method} is not allowed on {request.url.path}; use {allowed}"
        elif status == 400 and message == _FASTAPI_UNPARSEABLE_BODY:
            status, message = _unparseable_body(exc.__cause__)
        return error_response_at(request.url.path, status, code, message, None, headers)

    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        if pool_exhausted(exc):  # Redis is fine: this process is at its own limit
            log.warning("redis connection pool exhausted: %s", exc)
            return error_response_at(
                request.url.path, 503, ErrorCode.SERVER_BUSY,
                "this API process has all its Redis connections in use; retry shortly",
                None, {"Retry-After": "2"},
            )
        log.warning("redis unavailable: %s: %s", type(exc).__name__, exc)
        return error_response_at(
            request.url.path,
            503,
            ErrorCode.REDIS_UNAVAILABLE,
            "the job store (Redis) is unreachable; retry shortly",
            None,
            {"Retry-After": "2"},
        )

    # Every Redis failure, not only a lost connection: a replica promoted mid-failover answers
    # READONLY, a full one OOM; both are "the store is unavailable", never a bare 500.
    app.add_exception_handler(redis.exceptions.RedisError, redis_down)

    @app.exception_handler(UnreadableRecord)
    async def unreadable(request: Request, exc: UnreadableRecord) -> JSONResponse:
        # Mid-upgrade, an older API instance meets a record a newer worker wrote: say so (the
        # next try may reach a newer instance) rather than a bare "internal error".
        log.error("%s", exc)
        return error_response_at(request.url.path, 500, ErrorCode.INTERNAL, str(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The last resort, for an error in a middleware outside UnexpectedErrors (a route's is
        # answered there). It answers from Starlette's outermost middleware, outside
        # RequestContext, which adds the id to every other response: the one answer worth
        # quoting needs it too. CORS headers it lacks, and uvicorn then closes the connection.
        log.exception("unhandled error", exc_info=exc)
        request_id = request.scope.get("state", {}).get("request_id")
        headers = {"X-Request-ID": request_id} if request_id else None
        return error_response_at(
            request.url.path, 500, ErrorCode.INTERNAL, "internal error", None, headers
        )


class UnexpectedErrors:
    """A 500 in the error shape for an exception no handler took, answered inside the other
    middlewares rather than by Starlette's outermost ServerErrorMiddleware: the answer then
    carries its X-Request-ID and CORS headers like any other (a page on another origin reads
    the error, not "Failed to fetch"), its latency is observed, and the connection stays open
    (ServerErrorMiddleware re-raises, and uvicorn closes a connection whose app raised, so a
    client's next request on it was reset)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:
            if started:
                raise  # a response cut off midway cannot turn into a 500: the connection ends
            log.exception("unhandled error", exc_info=exc)
            path = scope.get("path", "")
            await error_response_at(path, 500, ErrorCode.INTERNAL, "internal error")(
                scope, receive, send
            )
