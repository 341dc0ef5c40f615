"""A loopback HTTP proxy that breaks things on purpose, for the client's fault tests.

One request per connection (it answers ``Connection: close``), forwarded to the API port it is pointed at.
Rules match a request (method, path prefix, how many such requests came before) and do one thing to it:
cut the request body after N bytes, answer a status instead of the server's answer (after the server did the
work), cut the response after a marker, or flip one byte of the response body. Every request is logged.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

Action = str  # "drop_request_body" | "replace_status" | "cut_response_after" | "corrupt_body" | "cut_body_after"


@dataclass
class Rule:
    method: str
    path_prefix: str
    action: Action
    nth: int = 1  # act on the nth matching request (1-based)
    value: int | bytes = 0  # bytes of body to let through / status / marker / offset
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers for replace_status
    seen: int = 0
    fired: bool = False


@dataclass
class Logged:
    method: str
    path: str
    headers: dict[str, str]


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return b"", b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


class FaultProxy:
    def __init__(self) -> None:
        self.target_port: int | None = None
        self.rules: list[Rule] = []
        self.log: list[Logged] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._handle(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, rule: Rule) -> Rule:
        with self.lock:
            self.rules.append(rule)
        return rule

    def requests(self, method: str, path_prefix: str = "") -> list[Logged]:
        with self.lock:
            return [r for r in self.log if r.method == method and r.path.startswith(path_prefix)]

    def _match(self, method: str, path: str) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if rule.method == method and path.startswith(rule.path_prefix) and not rule.fired:
                    rule.seen += 1
                    if rule.seen == rule.nth:
                        rule.fired = True
                        return rule
        return None

    def _handle(self, client: socket.socket) -> None:
        head, rest = _read_head(client)
        if not head:
            return
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        with self.lock:
            self.log.append(Logged(method, path, headers))
        rule = self._match(method, path)
        kept = [line for line in lines[1:] if not line.lower().startswith("connection:")]
        upstream = socket.create_connection(("127.0.0.1", self.target_port or 0))
        try:
            upstream.sendall(("\r\n".join([lines[0], *kept, "Connection: close"]) + "\r\n\r\n").encode("latin-1"))
            length = int(headers.get("content-length", "0"))
            sent = 0
            body = rest
            while True:
                if body:
                    if rule is not None and rule.action == "drop_request_body" and sent + len(body) > int(rule.value):
                        upstream.sendall(body[: max(0, int(rule.value) - sent)])
                        return  # both connections close: the client sees its PUT cut mid-body
                    upstream.sendall(body)
                    sent += len(body)
                if sent >= length:
                    break
                body = client.recv(65536)
                if not body:
                    return
            self._respond(client, upstream, rule)
        except OSError:
            return
        finally:
            upstream.close()
            client.close()

    def _respond(self, client: socket.socket, upstream: socket.socket, rule: Rule | None) -> None:
        if rule is not None and rule.action == "replace_status":
            while upstream.recv(65536):  # the server did the work; its answer is lost on the way back
                pass
            status = int(rule.value)
            body = b'{"type":"about:blank","title":"Service Unavailable","status":%d}' % status
            extra = "".join(f"{k}: {v}\r\n" for k, v in rule.headers.items())
            client.sendall(
                (
                    f"HTTP/1.1 {status} Proxy Says No\r\ncontent-type: application/problem+json\r\n"
                    f"content-length: {len(body)}\r\n{extra}connection: close\r\n\r\n"
                ).encode()
                + body
            )
            return
        received = b""
        head_end: int | None = None
        while chunk := upstream.recv(65536):
            if rule is None:
                client.sendall(chunk)
                continue
            received += chunk
            if head_end is None and b"\r\n\r\n" in received:
                head_end = received.index(b"\r\n\r\n") + 4
            if head_end is None:
                continue
            if rule.action == "corrupt_body":
                at = head_end + int(rule.value)
                if len(received) > at:
                    received = received[:at] + bytes([received[at] ^ 0xFF]) + received[at + 1 :]
                    client.sendall(received)
                    rule = None  # the rest passes untouched
                    received = b""
            elif rule.action == "cut_response_after":
                marker = rule.value if isinstance(rule.value, bytes) else b""
                at = received.find(marker, head_end)
                if at >= 0:
                    client.sendall(received[: at + len(marker)])
                    return
            elif rule.action == "cut_body_after" and len(received) >= head_end + int(rule.value):
                client.sendall(received[: head_end + int(rule.value)])
                return
        if received:
            client.sendall(received)


ProxyFactory = Callable[[], FaultProxy]
