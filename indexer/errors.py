"""The errors a user can cause. The CLI prints them as one line; the server maps them to 4xx JSON."""
from __future__ import annotations


class LookalikeError(Exception):
    """Base class: a problem the user can fix. ``code`` is a short machine-readable word."""

    code = "error"
    http_status = 400

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status


class NotFound(LookalikeError):
    code = "not_found"
    http_status = 404
