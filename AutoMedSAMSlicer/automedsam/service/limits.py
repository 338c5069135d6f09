"""Request body limits, enforced before a body is read (pure ASGI, so streaming uploads are
counted as they arrive and a lying or missing ``Content-Length`` does not get past)."""

from __future__ import annotations

import json

from ..errors import BodyTooLargeError
from .protocol import BUNDLES, SESSIONS, UPLOAD_PARTS

#: Largest JSON request body (prompts, class lists, training options are a few kB).
MAX_JSON_BYTES = 1 << 20


def body_kind(method: str, path: str) -> str:
    """``"bundle"`` (a bundle zip), ``"upload"`` (volume, labels or masks bytes) or ``"json"``."""
    if method == "POST" and path.rstrip("/") == BUNDLES:
        return "bundle"
    parts = path.strip("/").split("/")
    sessions = SESSIONS.strip("/").split("/")
    if method == "PUT" and len(parts) > len(sessions) + 1 and parts[:len(sessions)] == sessions and \
            parts[len(sessions) + 1] in UPLOAD_PARTS:
        return "upload"
    return "json"


class BodyLimitMiddleware:
    """413 for a declared ``Content-Length`` over the limit; :class:`BodyTooLargeError` (turned into
    a 413 by the app's handler) as soon as streamed bytes pass it."""

    def __init__(self, app, upload_bytes: int, bundle_bytes: int, json_bytes: int = MAX_JSON_BYTES):
        self.app = app
        self.limits = {"upload": upload_bytes, "bundle": bundle_bytes, "json": json_bytes}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        kind = body_kind(scope["method"], scope["path"])
        limit = self.limits[kind]
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await reject(send, 400, "invalid_request", "Content-Length must be a byte count")
            if int(declared) > limit:
                return await reject(send, 413, "too_large",
                                     f"the request body has {int(declared)} bytes; this route accepts at most {limit}")
        if declared is None and kind == "json":
            # JSON bodies are small: read them here, so a streamed one over the limit gets its 413
            # (raised later, inside FastAPI's body parsing, it would turn into a vague 400).
            messages, received = [], 0
            while True:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request":
                    break
                received += len(message.get("body", b""))
                if received > limit:
                    return await reject(send, 413, "too_large", f"the request body passed {limit} bytes, the limit "
                                                                 "of this route")
                if not message.get("more_body", False):
                    break

            async def replay():
                return messages.pop(0) if messages else await receive()

            return await self.app(scope, replay, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(f"the request body passed {limit} bytes, the limit of this route")
            return message

        await self.app(scope, limited_receive, send)


async def reject(send, status: int, code: str, message: str, headers: list | None = None) -> None:
    """Answer an error (the app's JSON error shape) without calling the app."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
