"""The worker's bearer token, checked before anything else (pure ASGI): a request without the
token gets its 401 before its body is read or parsed, before body limits and before routing, so
an unauthenticated caller learns nothing from a 413, a 422 or a 404."""

from __future__ import annotations

import hmac

from .limits import reject
from .protocol import HEALTH


class TokenMiddleware:
    """401 (with ``WWW-Authenticate: Bearer``) for every path but :data:`~.protocol.HEALTH`
    unless the ``Authorization`` header is ``Bearer <token>``."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == HEALTH:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        given = header[7:] if header.startswith(b"Bearer ") else b""
        if not hmac.compare_digest(given, self.token):
            return await reject(send, 401, "unauthorized", "missing or wrong bearer token",
                                [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)
