"""The connection under a local server's request: its declared length, and a reset (RST) of it.

ASGI gives an app no way to reset a connection; ``reset_next_uploads`` needs one, to cut an upload
as a flaky link does. :class:`TransportInScope`, the uvicorn protocol the server runs with (see
``__main__``), hands each request its connection, and :func:`reset_connection` resets it.
"""

from __future__ import annotations

import functools
import socket
import struct
from typing import Any

from fastapi import Request

try:  # what uvicorn's "auto" HTTP protocol picks
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _UvicornProtocol
except ImportError:  # pragma: no cover
    from uvicorn.protocols.http.h11_impl import H11Protocol as _UvicornProtocol  # type: ignore[assignment]

#: The ASGI scope extension under which :class:`TransportInScope` puts a request's connection.
TRANSPORT_EXTENSION = "doc2x.transport"


def declared_length(request: Request) -> int | None:
    """Read the body's size from its ``Content-Length`` header, if it has one."""
    value = request.headers.get("content-length")
    return int(value) if value and value.isdigit() else None


def reset_connection(request: Request) -> None:
    """Reset the request's TCP connection at once: RST, no answer, unread bytes dropped.

    Raises:
        RuntimeError: the server was not started with :class:`TransportInScope` (see ``__main__``).
    """
    transport = request.scope.get("extensions", {}).get(TRANSPORT_EXTENSION, {}).get("transport")
    if transport is None:
        raise RuntimeError("Resetting uploads needs the server's TransportInScope uvicorn protocol")
    sock = transport.get_extra_info("socket")
    if sock is not None:  # linger 0: close() sends RST, not FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class TransportInScope(_UvicornProtocol):
    """uvicorn's HTTP/1.1 protocol, also handing each request its connection's asyncio transport.

    ASGI gives an app no way to reset a connection; ``reset_next_uploads`` needs one. This protocol
    puts the transport in every request's scope, as ``scope["extensions"]["doc2x.transport"]
    ["transport"]``. Use it as ``uvicorn.Config(app, http=TransportInScope)``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Take uvicorn's arguments, and wrap the app it loaded."""
        super().__init__(*args, **kwargs)
        self.app = functools.partial(self._with_transport, self.app)

    async def _with_transport(self, app: Any, scope: Any, receive: Any, send: Any) -> None:
        extensions = scope.setdefault("extensions", {})
        extensions[TRANSPORT_EXTENSION] = {"transport": self.transport}
        await app(scope, receive, send)
