"""A TCP proxy in front of the test Redis that loses what a flaky network loses.

`lose_reply_to(*markers)`: the next command whose bytes hold every marker reaches Redis and
runs, but its reply never comes back; the connection drops, as when a link fails mid-request.
`lose_request_to(*markers)`: that command never reaches Redis; the connection drops.
With `then_refuse=True` new connections are refused afterwards, until `restore()`: Redis stays
away, so the caller cannot ask what happened. `cut()` drops every connection and refuses new
ones, until `restore()`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from urllib.parse import urlsplit

from tests.conftest import free_port


class FlakyRedisProxy:
    def __init__(self, redis_url: str) -> None:
        target = urlsplit(redis_url)
        self.target = (target.hostname or "127.0.0.1", target.port or 6379)
        self.database = target.path.lstrip("/") or "0"
        self.port = free_port()
        self.refusing = False
        self.faults = 0  # replies lost so far
        self._markers: tuple[bytes, ...] = ()
        self._then_refuse = False
        self._drop_request = False
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{self.database}"

    def lose_reply_to(self, *markers: bytes, then_refuse: bool = False) -> None:
        with self._lock:
            self._markers, self._then_refuse, self._drop_request = markers, then_refuse, False

    def lose_request_to(self, *markers: bytes) -> None:
        with self._lock:
            self._markers, self._then_refuse, self._drop_request = markers, False, True

    def cut(self) -> None:
        self.refusing = True
        self._drop_all()

    def restore(self) -> None:
        self.refusing = False

    def close(self) -> None:
        self._listener.close()
        self._drop_all()

    def _drop_all(self) -> None:
        with self._lock:
            doomed, self._sockets = list(self._sockets), set()
        for sock in doomed:
            _shut(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if self.refusing:
                _shut(client)
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets |= {client, upstream}
            lost = threading.Event()
            threading.Thread(target=self._up, args=(client, upstream, lost), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, lost), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, lost: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                # Decided before forwarding: a fast reply must not slip back to the client
                # first, leaving the fault to hit whichever command comes next.
                faulty, drop_request = self._take_fault(data)
                if faulty:
                    lost.set()  # the reply on its way back is dropped
                if not drop_request:
                    upstream.sendall(data)
                if faulty:
                    time.sleep(0.2)  # Redis runs the command meanwhile
                    _shut(client)
                    _shut(upstream)
                    return
        except OSError:
            pass

    def _down(self, upstream: socket.socket, client: socket.socket, lost: threading.Event) -> None:
        try:
            while data := upstream.recv(65536):
                if lost.is_set():
                    return
                client.sendall(data)
        except OSError:
            pass

    def _take_fault(self, data: bytes) -> tuple[bool, bool]:
        """(whether `data` meets the armed fault, whether its request is to be dropped)."""
        with self._lock:
            if not self._markers or not all(m in data for m in self._markers):
                return False, False
            self._markers = ()
            self.faults += 1
            if self._then_refuse:
                self.refusing = True
            return True, self._drop_request


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
