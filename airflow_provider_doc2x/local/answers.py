"""The answers the local Doc2X server gives: the API's JSON envelope, its refusals, a gateway's HTML.

Below both :mod:`~airflow_provider_doc2x.local.server` and :mod:`~airflow_provider_doc2x.local.pdf`,
so that each raises the same refusals without importing the other.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import HTMLResponse, JSONResponse, Response


class Refused(Exception):
    """A call refused with an API answer: ``response`` is what the client gets."""

    def __init__(self, response: Response) -> None:
        """Carry the answer."""
        super().__init__(response.status_code)
        self.response = response


class ConnectionGone(Exception):
    """The upload's connection is gone (reset by the server, or closed by the client): nothing to answer."""


def api_error(code: str, msg: str, status: int = 200, headers: dict[str, str] | None = None) -> Refused:
    """Build an API error, ready to raise: ``{"code": ..., "msg": ...}`` with its HTTP status."""
    return Refused(JSONResponse({"code": code, "msg": msg}, status_code=status, headers=headers))


def success(data: dict[str, Any]) -> JSONResponse:
    """Build an API success: ``{"code": "success", "data": ...}``."""
    return JSONResponse({"code": "success", "data": data})


def html_failure(status: int, title: str, trace_id: str) -> HTMLResponse:
    """Answer as a gateway in front of the API does when it fails: HTML, not the API's JSON."""
    return HTMLResponse(
        f"<html><head><title>{status} {title}</title></head><body><h1>{status} {title}</h1></body></html>",
        status_code=status,
        headers={"trace-id": trace_id},
    )
