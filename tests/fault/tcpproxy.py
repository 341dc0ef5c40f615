"""A loopback TCP proxy that a test can cut and restore, to put an outage between a process and a server.

``cut()`` closes every connection it carries (both sides see a reset) and stops listening, so new
connections are refused, as when the server's host goes away; ``restore()`` listens on the same port again.
Bytes are copied as they come, a thread per direction, so any protocol passes (Postgres, Redis, HTTP).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from functools import partial
from types import TracebackType


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.port = 0
        self.connections = 0  # accepted since start, for tests that want to see traffic went through
        self._listen()

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # The same port again after a cut, though connections accepted on it linger in TIME_WAIT.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name=f"proxy-{self.port}", daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # shut down by cut() or close()
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut while connecting
                    _reset(client)
                    _reset(upstream)
                    return
                self._sockets |= {client, upstream}
                self.connections += 1
            finished = threading.Barrier(2, action=partial(self._forget, client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink, finished), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, finished: threading.Barrier) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)  # pass the half-close on
        except OSError:
            _reset(source)
            _reset(sink)
        finished.wait()  # the second direction to end closes the pair

    def _forget(self, *pair: socket.socket) -> None:
        with self._lock:
            self._sockets.difference_update(pair)
        for sock in pair:
            sock.close()

    def cut(self) -> None:
        """Reset every connection and refuse new ones until :meth:`restore`."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        if listener is not None:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not on Linux)
            listener.close()
        for sock in sockets:
            _reset(sock)

    def restore(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
        self._listen()

    def close(self) -> None:
        self.cut()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


def _reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN: the peer's next read or write fails at once, as after a crash."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sock.close()
