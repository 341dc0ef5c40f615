"""The proxy the fault suite cuts: traffic passes, a cut resets what is open and refuses what is new."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from tests.fault.tcpproxy import TcpProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with TcpProxy(server.server_address[1]) as tcp_proxy:
        yield tcp_proxy
    server.shutdown()
    server.server_close()


def _echo(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_bytes_pass_both_ways(proxy: TcpProxy) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: more than one socket buffer each way
    assert _echo(proxy.port, payload) == payload
    assert proxy.connections == 1


def test_cut_resets_open_connections_and_refuses_new_ones_until_restored(proxy: TcpProxy) -> None:
    open_conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    open_conn.sendall(b"ping")
    assert open_conn.recv(4) == b"ping"

    proxy.cut()
    assert proxy.is_cut
    with pytest.raises(OSError):  # reset by the cut (or, at the latest, on the next write)
        open_conn.sendall(b"still there?")
        if not open_conn.recv(1):
            raise ConnectionResetError("closed")
    open_conn.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5)

    port = proxy.port
    proxy.restore()
    assert proxy.port == port  # the same address: clients' URLs stay valid
    assert _echo(proxy.port, b"back") == b"back"
