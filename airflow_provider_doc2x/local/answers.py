"""The answers the local Doc2X server gives: the API's JSON envelope, its refusals, a gateway's HTML.

Below the server (:mod:`~airflow_provider_doc2x.local.server`) and its two APIs
(:mod:`~airflow_provider_doc2x.local.image_service`, :mod:`~airflow_provider_doc2x.local.pdf_service`),
so that each raises the same refusals without importing the others.
"""

from __future__ import annotations

import json
from typing import Any
from xml.sax.saxutils import escape

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


def html_failure(status: int, title: str, trace_id: str, quote: str = "") -> HTMLResponse:
    """Answer as a gateway in front of the API does when it fails: HTML, not the API's JSON.

    ``quote`` (see :func:`authorization_quote`) is added to the page's text, as a careless gateway
    shows the request it refused.
    """
    text = f"<p>{escape(quote)}</p>" if quote else ""
    return HTMLResponse(
        f"<html><head><title>{status} {title}</title></head>"
        f"<body><h1>{status} {title}</h1>{text}</body></html>",
        status_code=status,
        headers={"trace-id": trace_id},
    )


def authorization_quote(authorization: str | None) -> str:
    """The words an echoing server adds to its errors: the request's ``Authorization`` header, quoted.

    Empty for a request without the header (there is nothing to echo).
    """
    return f"(Authorization: {authorization})" if authorization is not None else ""


def echoed(response: Response, quote: str) -> Response:
    """Return an error answer with ``quote`` added to its message, as an echoing server gives it.

    The API's JSON envelope gets it in ``msg``, FastAPI's own errors in ``detail`` (when it is
    text), the object store's XML in ``<Message>``; the status and the headers stay. Another answer,
    or an empty quote, is returned as it is.
    """
    if not quote:
        return response
    headers = {
        name: value
        for name, value in response.headers.items()
        if name not in ("content-length", "content-type")
    }
    body = bytes(response.body)
    if response.media_type == "application/xml" and b"</Message>" in body:
        body = body.replace(b"</Message>", f" {escape(quote)}</Message>".encode(), 1)
        return Response(body, status_code=response.status_code, media_type="application/xml", headers=headers)
    if not isinstance(response, JSONResponse):
        return response
    answer = json.loads(body)
    if not isinstance(answer, dict):
        return response
    for field in ("msg", "detail"):
        if isinstance(answer.get(field), str):
            answer[field] = f"{answer[field]} {quote}"
            return JSONResponse(answer, status_code=response.status_code, headers=headers)
    return response
