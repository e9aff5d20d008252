"""Request errors as the OpenAI API answers them: `APIError` (status, OpenAI's error JSON) and the mapping of
owlvid's exceptions to it (`to_api_error`), shared by the server, batch jobs and Ray replicas."""

from __future__ import annotations

import logging

from ..engine import RequestFailed, RequestTimeout
from ..errors import MediaError, MediaTimeout, OwlvidError
from ..media import MediaTooLargeError
from . import schemas

log = logging.getLogger("owlvid.server")


class QueueFullError(Exception):
    """Too many requests are already waiting (HTTP 503)."""


class APIError(Exception):
    """An error answered to the client as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        """OpenAI's error JSON."""
        return schemas.error_body(self.message, self.type, self.param, self.code)


def to_api_error(e: BaseException) -> APIError:
    """Map an exception from request preparation or generation to the HTTP answer."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, MediaTooLargeError):  # bytes or pixels over the limits
        message = str(e)
        for key, flag in (("max_pixels", "--max-image-pixels"), ("max_bytes", "--max-media-bytes")):
            if key in message and flag not in message:
                message += f" ({flag})"
        return APIError(413, message, code="media_too_large")
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), "server_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, RequestTimeout):
        return APIError(504, str(e), "timeout_error", code="timeout")
    if isinstance(e, MediaTimeout):  # over --media-timeout: this request's media, not the client's request
        return APIError(408, str(e), "timeout_error", code="media_timeout")
    if isinstance(e, MediaError):
        return APIError(400, str(e), code="invalid_media")
    if isinstance(e, OwlvidError):  # InputError, UnsupportedError, ... : the request cannot be served
        return APIError(400, str(e), code="invalid_request")
    if isinstance(e, RequestFailed):  # the engine failed this request (alone, or with its batch): say why
        log.error("request failed: %s", e)
        return APIError(500, str(e), "server_error", code="request_failed")
    log.error("internal error", exc_info=(type(e), e, e.__traceback__))
    # The exception text may carry server paths or internals: the client gets a generic line.
    return APIError(500, "internal server error (the server log has the details)", "server_error",
                    code="internal_error")
