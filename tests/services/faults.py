"""Fault injectors for the reliability tests: a TCP proxy in front of the S3 server that can
drop the storage "network" on demand, or on the first request that matches a pattern."""

from __future__ import annotations

import re
import socket
import threading
import time


class FlakyProxy:
    """Forwards 127.0.0.1:<port> to ``target`` until told to fail.

    ``down()``/``up()`` cut and restore the link: while down, every open connection is reset
    and new ones are closed at once (what a client sees when an endpoint dies). ``arm(pattern,
    skip, outage_s)`` does the same automatically on the ``skip+1``-th request whose bytes
    match ``pattern``, in the middle of that request, and comes back after ``outage_s``.
    """

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.is_down = False
        self.outages: list[tuple[float, float]] = []  # (start, end) monotonic times
        self.cut_requests: list[bytes] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._armed: tuple[re.Pattern[bytes], int, float] | None = None
        self._seen = 0
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    # -- control ---------------------------------------------------------------------------
    def down(self) -> None:
        with self._lock:
            self.is_down = True
            self.outages.append((time.monotonic(), float("inf")))
            conns, self._conns = self._conns, []
        for conn in conns:
            _reset(conn)

    def up(self) -> None:
        with self._lock:
            self.is_down = False
            start, _ = self.outages[-1]
            self.outages[-1] = (start, time.monotonic())

    def arm(self, pattern: bytes, skip: int = 0, outage_s: float = 5.0) -> None:
        with self._lock:
            self._armed, self._seen = (re.compile(pattern), skip, outage_s), 0

    def close(self) -> None:
        self._stopped = True
        self.down()
        self.listener.close()

    # -- forwarding --------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.is_down:
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream and self._should_cut(data):
                    # Forward half of the request, then die: the server holds a partial upload.
                    dst.sendall(data[: len(data) // 2])
                    self._outage()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _reset(src)
            _reset(dst)

    def _should_cut(self, data: bytes) -> bool:
        with self._lock:
            if self._armed is None or self.is_down:
                return False
            pattern, skip, _ = self._armed
            match = pattern.search(data)
            if match is None:
                return False
            self._seen += 1
            if self._seen <= skip:
                return False
            self.cut_requests.append(data.split(b"\r\n", 1)[0])
            return True

    def _outage(self) -> None:
        assert self._armed is not None
        outage_s = self._armed[2]
        self._armed = None
        self.down()
        threading.Timer(outage_s, self.up).start()


def _reset(conn: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a dead peer would, not a polite FIN."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()
    except OSError:
        pass
