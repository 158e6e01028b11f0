r"""The object store in front of the local server's PDF API: presigned urls and the store's answers.

Doc2X hands out presigned urls on object storage: a PUT url for the upload (Aliyun OSS, signed
the S3 way, ``...?X-Amz-Algorithm=...&X-Amz-Signature=...``) and GET urls for the exports (S3).
The local server signs its own urls the same way, on itself, with a secret of the process; the
store checks the signature over the method, the path and every other query parameter, so that a
url changed on the way (an ``&`` left as ``\u0026``, say) is refused like a forged one.

Refusals come as object stores send them: HTTP 403 (or 404, 503) with an XML ``<Error>`` body,
not the API's JSON.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time
import uuid
from collections.abc import Mapping
from urllib.parse import urlencode
from xml.sax.saxutils import escape

from fastapi.responses import Response

from airflow_provider_doc2x.local.answers import Refused

#: The query parameter that carries the signature.
SIGNATURE = "X-Amz-Signature"
#: What a presigned url carries besides the signature (the signature covers them all).
SIGNED_PARAMETERS = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
)


class Presigner:
    """Sign urls on this server and check them, S3-style (HMAC-SHA256 in the query).

    Args:
        secret: the signing key; a random one by default (urls die with the process).
    """

    def __init__(self, secret: bytes | None = None) -> None:
        """Keep the key."""
        self.secret = secret or os.urandom(32)

    def url(self, base_url: str, method: str, path: str, *, expires: float) -> str:
        """Return ``base_url + path`` with a signed query; ``expires`` (seconds) is shown rounded up."""
        now = time.gmtime()
        query = {
            "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
            "X-Amz-Credential": f"LOCALDOC2X/{time.strftime('%Y%m%d', now)}/local/s3/aws4_request",
            "X-Amz-Date": time.strftime("%Y%m%dT%H%M%SZ", now),
            "X-Amz-Expires": str(max(1, math.ceil(expires))),
            "X-Amz-SignedHeaders": "host",
        }
        query[SIGNATURE] = self.signature(method, path, query)
        return f"{base_url.rstrip('/')}{path}?{urlencode(query)}"

    def signature(self, method: str, path: str, query: Mapping[str, str]) -> str:
        """Sign the method, the path and the query's parameters (all but the signature)."""
        canonical = "\n".join(
            [method.upper(), path, *(f"{key}={query[key]}" for key in sorted(query) if key != SIGNATURE)]
        )
        return hmac.new(self.secret, canonical.encode(), hashlib.sha256).hexdigest()

    def check(self, method: str, path: str, query: Mapping[str, str]) -> None:
        """Check a request's signature.

        Raises:
            Refused: HTTP 403 ``AccessDenied`` (no signature) or ``SignatureDoesNotMatch``.
        """
        given = query.get(SIGNATURE)
        if not given or any(key not in query for key in SIGNED_PARAMETERS):
            raise store_error(403, "AccessDenied", "Query-string authentication requires a signed url", path)
        if not hmac.compare_digest(given, self.signature(method, path, query)):
            raise store_error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
                path,
            )


def store_error(status: int, code: str, message: str, resource: str) -> Refused:
    """Build an object store's refusal, ready to raise: an XML ``<Error>`` with its HTTP status."""
    request_id = uuid.uuid4().hex.upper()[:24]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        "<Error>\n"
        f"  <Code>{escape(code)}</Code>\n"
        f"  <Message>{escape(message)}</Message>\n"
        f"  <Resource>{escape(resource)}</Resource>\n"
        f"  <RequestId>{request_id}</RequestId>\n"
        "</Error>\n"
    )
    return Refused(
        Response(
            body, status_code=status, media_type="application/xml", headers={"x-oss-request-id": request_id}
        )
    )


def multipart_file(body: bytes, content_type: str) -> bytes | None:
    """Return the file of a ``multipart/form-data`` body (its first part with a file name, else its first).

    A PUT like pdfdeal's (httpx ``files=``) wraps the PDF so; None when the body does not parse.
    """
    marker = "boundary="
    if marker not in content_type:
        return None
    boundary = content_type.split(marker, 1)[1].split(";", 1)[0].strip().strip('"').encode()
    if not boundary:
        return None
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        head, separator, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not separator:
            continue
        parts.append((head.lower(), content.removesuffix(b"\r\n")))
    for head, content in parts:
        if b"filename=" in head:
            return content
    return parts[0][1] if parts else None
