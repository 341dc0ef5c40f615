"""A cap on request bodies, enforced before any route parses one.

JSON bodies are small (a job spec, a webhook endpoint, a list of files to upload); without a cap a
client could make the API read and parse 100 MB. The cap is checked against ``Content-Length`` when
the client sends one, and counted as the body arrives otherwise (chunked), so nothing past the limit
is held in memory. The local storage backend's signed PUT routes stream model files of gigabytes and
bound them themselves (by the size signed into the URL), so they are exempt.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import Problem, problem_response

# Routes that stream large bodies and bound them on their own (app/artifacts/router.py).
STREAMING_PREFIXES = ("/v1/storage/",)


def _too_large(limit: int) -> Problem:
    return Problem(413, "Content Too Large", f"the request body exceeds the limit of {limit} bytes")


class BodyLimitMiddleware:
    """Answer 413 (problem+json) to a request whose body exceeds ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(STREAMING_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await problem_response(_too_large(self.max_bytes), scope["path"])(scope, receive, send)
            return
        # Read the body here, counting, and hand the route one message with all of it (at most max_bytes).
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                first: Message = message
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await problem_response(_too_large(self.max_bytes), scope["path"])(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return first
            return await receive()  # later calls wait for the disconnect, as streaming responses do

        await self.app(scope, replay, send)
