"""Serve the console at ``/console`` with a strict Content-Security-Policy on every response.

The console is a static shell plus plain ES modules that call the public ``/v1`` API with the key the
user signed in with (kept in ``sessionStorage``, sent as the bearer header). Pages are not rendered on the
server because a browser navigation cannot carry a bearer header: every byte of tenant data travels through
the API the console sits beside, so the console can see exactly what the key's scopes allow, no more.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings, get_settings

STATIC_DIR = Path(__file__).parent / "static"
PREFIX = "/console"


def storage_origins(settings: Settings) -> list[str]:
    """Origins the browser must reach besides the API: the S3 endpoint that presigned URLs point at.

    The local backend signs URLs on the API's own origin, so nothing is added in the embedded mode.
    """
    if settings.storage_backend != "s3":
        return []
    endpoint = settings.s3_public_endpoint_url or settings.s3_endpoint_url
    if endpoint:
        parts = urlsplit(endpoint)
        return [f"{parts.scheme}://{parts.netloc}"]
    # AWS itself: virtual-hosted and path-style URLs of the configured region.
    return [
        f"https://{settings.s3_bucket}.s3.{settings.s3_region}.amazonaws.com",
        f"https://s3.{settings.s3_region}.amazonaws.com",
    ]


def content_security_policy(settings: Settings) -> str:
    """No inline script or style anywhere, no third-party origin, no framing."""
    extra = " ".join(storage_origins(settings))
    storage = f" {extra}" if extra else ""
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            f"img-src 'self' blob: data:{storage}",
            f"connect-src 'self'{storage}",
            "form-action 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
        ]
    )


def security_headers(settings: Settings) -> dict[str, str]:
    """Headers every console response carries, errors and redirects included."""
    return {
        "Content-Security-Policy": content_security_policy(settings),
        "X-Content-Type-Options": "nosniff",
        # Signed download URLs must not leak to other sites through the Referer header.
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cross-Origin-Opener-Policy": "same-origin",
    }


class ConsoleHeaders:
    """ASGI middleware: add :func:`security_headers` to every response under ``/console``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.headers: dict[str, str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != PREFIX and not path.startswith(PREFIX + "/"):
            await self.app(scope, receive, send)
            return
        if self.headers is None:  # settings are read once, at the first console request
            self.headers = security_headers(get_settings())
        extra = self.headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in extra.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _index(_request: Request) -> Response:
    # The shell is tiny and names its modules: always revalidate so a deploy is picked up at once.
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _to_slash(_request: Request) -> Response:
    return RedirectResponse(PREFIX + "/", status_code=308)


class _Static(StaticFiles):
    """Static files revalidated on every load (ETag), so a new release is never mixed with cached modules."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = "no-cache"
        return response


def install_console(app: FastAPI) -> None:
    """Mount the console at ``/console`` and wrap the app with the console's security headers."""
    console = Starlette(
        routes=[
            Route("/", _index, methods=["GET", "HEAD"]),
            Mount("/static", app=_Static(directory=STATIC_DIR), name="static"),
        ]
    )
    app.add_route(PREFIX, _to_slash, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount(PREFIX, console, name="console")
    app.add_middleware(ConsoleHeaders)
