"""An output file from local storage, with byte ranges answered the way this API answers.

Starlette's FileResponse serves ranges (206, multipart), which players need to seek in a clip;
but it answers a range it cannot serve in plain text, and a Range it cannot parse (another unit,
a reversed span) with a 400. RFC 9110 says to ignore a Range with a unit the server does not
know, and lets it ignore an invalid one: the whole file (200) is what a client can always use.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.responses import FileResponse, MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from contract.jobs import ErrorCode
from service.errors import error_response


class OutputFileResponse(FileResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        requested = headers.get("range")
        if_range = headers.get("if-range")
        # A stale If-Range means the whole file, whatever the Range: Starlette does that itself.
        stale = if_range is not None and not self._should_use_range(if_range)
        if requested is not None and not stale and self.stat_result is not None:
            size = self.stat_result.st_size
            try:
                # Starlette's own parser, so this agrees with what the response would do.
                self._parse_range_header(requested, size)
            except RangeNotSatisfiable:
                refused = error_response(
                    416, ErrorCode.INVALID_REQUEST,
                    f"Range {requested!r} starts beyond the output's {size} bytes", "Range",
                    {"Content-Range": f"bytes */{size}"},
                )
                await refused(scope, receive, send)
                return
            except MalformedRangeHeader:
                kept = [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]
                scope = {**scope, "headers": kept}
        await super().__call__(scope, receive, send)
