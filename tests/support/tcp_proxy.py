"""A TCP proxy on 127.0.0.1 that can cut and restore the link: network partitions without root.

    with TcpProxy("127.0.0.1", apiserver_port) as proxy:
        client_url = f"https://127.0.0.1:{proxy.port}"
        proxy.cut("blackhole")   # or "reset"
        proxy.restore()

Modes of a cut:
- "reset": every open connection is closed with a RST and new ones are accepted and
  reset at once, so clients fail fast (a crashed peer, a firewall REJECT).
- "blackhole": open connections stay up but every byte is dropped in both directions,
  and new connections are accepted but never connected upstream, so clients hang
  until their own timeouts (a cable pulled, a firewall DROP). On restore, the
  black-holed connections are reset: their streams have lost bytes.

TLS passes through untouched, so a client verifying the server's certificate must
accept the proxy's address (the local apiserver's certificate names 127.0.0.1).
One thread runs a selector loop; `cut` and `restore` return once applied, and
record when, in `history`, for tests that compare timestamps.
"""

from __future__ import annotations

import contextlib
import queue
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType

MODES = ("pass", "reset", "blackhole")


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client = client
        self.upstream = upstream

    def peer(self, sock: socket.socket) -> socket.socket | None:
        return self.upstream if sock is self.client else self.client

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.upstream) if s is not None]


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1", listen_port: int = 0):
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((listen_host, listen_port))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.host, self.port = self._listener.getsockname()[:2]
        self.mode = "pass"
        self.history: list[tuple[float, str]] = []  # (time.time(), mode) of every change
        self.accepted = 0
        self._selector = selectors.DefaultSelector()
        self._pairs: dict[socket.socket, _Pair] = {}
        self._commands: queue.Queue[tuple[Callable[[], None], threading.Event]] = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"tcp-proxy-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def start(self) -> TcpProxy:
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread.start()
        return self

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- control (from any thread)

    def cut(self, mode: str = "reset") -> float:
        """Partition the link; returns the time.time() at which it took effect."""
        if mode not in ("reset", "blackhole"):
            raise ValueError(f"cut mode {mode!r}: expected 'reset' or 'blackhole'")
        return self._run(lambda: self._set_mode(mode))

    def restore(self) -> float:
        return self._run(lambda: self._set_mode("pass"))

    def connections(self) -> int:
        return len({id(p) for p in self._pairs.values()})

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._stopping = True
        self._run(lambda: None)
        self._thread.join(timeout=5)

    def _run(self, action: Callable[[], None]) -> float:
        done = threading.Event()
        self._commands.put((action, done))
        self._wake_w.send(b"x")
        if not done.wait(timeout=5):
            raise RuntimeError("the proxy thread did not answer within 5s")
        return self.history[-1][0] if self.history else time.time()

    # -- the loop (proxy thread only)

    def _set_mode(self, mode: str) -> None:
        if mode == "reset" or (mode == "pass" and self.mode == "blackhole"):
            for pair in list({id(p): p for p in self._pairs.values()}.values()):
                self._drop(pair, reset=True)
        self.mode = mode
        self.history.append((time.time(), mode))

    def _loop(self) -> None:
        try:
            while not self._stopping:
                for key, _ in self._selector.select(timeout=0.5):
                    if key.data == "wake":
                        self._drain_commands()
                    elif key.data == "accept":
                        self._accept()
                    else:
                        self._forward(key.fileobj)  # type: ignore[arg-type]
                self._drain_commands()
        finally:
            for pair in list({id(p): p for p in self._pairs.values()}.values()):
                self._drop(pair, reset=True)
            self._selector.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _drain_commands(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(512):
                pass
        while True:
            try:
                action, done = self._commands.get_nowait()
            except queue.Empty:
                return
            action()
            done.set()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        self.accepted += 1
        if self.mode == "reset":
            _reset(client)
            return
        upstream = None
        if self.mode == "pass":
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                return
            upstream.setblocking(False)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(client, upstream)
        for sock in pair.sockets():
            self._pairs[sock] = pair
            self._selector.register(sock, selectors.EVENT_READ, "data")

    def _forward(self, sock: socket.socket) -> None:
        pair = self._pairs.get(sock)
        if pair is None:
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._drop(pair, reset=True)
            return
        if not data:
            self._drop(pair, reset=False)
            return
        peer = pair.peer(sock)
        if self.mode != "pass" or peer is None:
            return  # black-holed: the bytes vanish
        try:
            peer.setblocking(True)
            peer.settimeout(5)
            peer.sendall(data)
            peer.setblocking(False)
        except OSError:
            self._drop(pair, reset=True)

    def _drop(self, pair: _Pair, reset: bool) -> None:
        for sock in pair.sockets():
            if self._pairs.pop(sock, None) is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)
            if reset:
                _reset(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.close()
