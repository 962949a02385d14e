"""API key for the write endpoints, and the security headers on every response.

Writes (POST/DELETE /v1/images) need ``Authorization: Bearer <IMGSEARCH_API_KEY>``. With
no key configured they are disabled (403), never open. The comparison is constant-time
(``hmac.compare_digest`` over the UTF-8 bytes), so response timing does not leak how much
of a guess was right.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError

bearer = HTTPBearer(auto_error=False, description="IMGSEARCH_API_KEY, required for POST/DELETE /v1/images")

# The page and its assets come from this origin only. blob: is the query preview
# (URL.createObjectURL); nothing else is loaded from anywhere.
CSP = "; ".join([
    "default-src 'self'",
    "img-src 'self' blob: data:",
    "script-src 'self'",
    "style-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])

SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]


def check_api_key(request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
    configured = request.app.state.settings.api_key
    expected = configured.get_secret_value() if configured is not None else ""
    if not expected:
        raise ApiError(403, "writes_disabled",
                       "write endpoints are disabled: set IMGSEARCH_API_KEY on the gateway to enable them")
    check_bearer(credentials, expected, "API key")


def check_bearer(credentials: HTTPAuthorizationCredentials | None, expected: str, what: str) -> None:
    """401 unless ``Authorization: Bearer <expected>`` (``expected`` non-empty)."""
    given = credentials.credentials if credentials and credentials.scheme.lower() == "bearer" else ""
    # compare_digest on bytes: constant time in the length of the expected key, any characters
    if not given or not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        raise ApiError(401, "unauthorized", f"missing or wrong {what} (Authorization: Bearer <key>)",
                       headers={"WWW-Authenticate": "Bearer"})


class SecurityHeadersMiddleware:
    """Adds the headers above to every HTTP response (errors and sheds included) that lacks them."""

    def __init__(self, app: ASGIApp, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        self.app = app
        self.headers = SECURITY_HEADERS + (extra or [])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                have = {k.lower() for k, _ in headers}
                # a route that sets its own header (the /docs page's CSP) keeps it
                message = dict(message, headers=headers + [(k, v) for k, v in self.headers if k not in have])
            await send(message)

        await self.app(scope, receive, send_wrapper)
