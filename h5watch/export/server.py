"""The small HTTP server behind both exporters' ``/metrics`` and ``/healthz``."""

from __future__ import annotations

import email.message
import email.utils
import http
import http.client
import io
import queue
import re
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable

from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from h5watch import logs

__all__ = ["MetricsServer", "bind_listener"]

_log = logs.get_logger(logger="h5watch.exporter")


class MetricsServer:
    """``/metrics`` (as prometheus_client's own WSGI app makes it: text or
    OpenMetrics by the Accept header, gzip by Accept-Encoding, ``name[]``
    filtering) and ``/healthz``, over HTTP or (``tls``) HTTPS, made to
    survive abuse: many scrapers at once, slow clients, vanishing ones.

    One thread reads the requests of every connection in a ``selectors`` loop,
    so a client that sends half a request and waits costs a socket and a few
    bytes, not a thread (one thread per connection, or a pool whose threads
    each wait on one client, lets a few hundred slow clients starve every
    scrape). A connection whose request is not complete
    ``REQUEST_TIMEOUT_SECONDS`` after it was accepted is dropped. A complete
    request goes to a fixed pool of ``WORKERS`` threads, which build the reply
    and send it, giving up on a client that does not read it within
    ``SEND_TIMEOUT_SECONDS``. At most ``MAX_CONNECTIONS`` are held: beyond
    that the oldest incomplete one is dropped. One request per connection
    (``Connection: close``). Clients that go away are not logged. A TLS
    handshake is made step by step in the loop, within the same deadline
    as the request it precedes.
    """

    WORKERS = 4
    REQUEST_TIMEOUT_SECONDS = 5.0
    SEND_TIMEOUT_SECONDS = 10.0
    MAX_REQUEST_BYTES = 16 * 1024
    MAX_CONNECTIONS = 512
    LISTEN_BACKLOG = 256

    def __init__(self, registry: CollectorRegistry, addr: str, port: int, healthy: Callable[[], bool] = lambda: True,
                 tls: ssl.SSLContext | None = None) -> None:
        self._app = make_wsgi_app(registry)
        self._tls = tls
        self._healthy = healthy
        listener = _listen(addr, port, self.LISTEN_BACKLOG)
        self._listener = listener
        self.port: int = listener.getsockname()[1]
        # Owned by the loop thread: connections still sending their request,
        # in the order accepted (so the first is the next to time out).
        self._reading: dict[socket.socket, tuple[float, bytearray]] = {}
        # Owned by the loop thread: TLS connections whose handshake is not
        # done (within the same deadline as the request).
        self._handshaking: set[ssl.SSLSocket] = set()
        # poll rather than epoll: no kernel object that a forked child of an
        # instrumented process would share with this loop.
        self._selector = selectors.PollSelector() if hasattr(selectors, "PollSelector") else selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_writer.setblocking(False)
        self._requests: queue.SimpleQueue[tuple[socket.socket, bytes] | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="h5watch-metrics", daemon=True)
        self._workers = [threading.Thread(target=self._work, name=f"h5watch-metrics-{i}", daemon=True) for i in range(self.WORKERS)]

    def start(self) -> MetricsServer:
        for worker in self._workers:
            worker.start()
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._wake_writer.send(b"x")
        except OSError:
            pass
        if self.thread.is_alive():
            self.thread.join(5)
        for _ in self._workers:
            self._requests.put(None)
        for sock in (self._listener, self._wake_reader, self._wake_writer):
            sock.close()

    # -- the loop thread: accept, read requests, drop slow clients ---------------

    def _serve(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                try:
                    self._serve_once()
                except Exception as exc:  # never let one bad round end the server
                    _log.error("metrics.server_error", error=repr(exc))
                    time.sleep(0.1)
        finally:
            for conn in list(self._reading):
                self._drop(conn)
            self._selector.close()

    def _serve_once(self) -> None:
        timeout = None
        if self._reading:
            first_deadline = next(iter(self._reading.values()))[0]
            timeout = max(0.0, first_deadline - time.monotonic())
        for key, _ in self._selector.select(timeout):
            if key.fileobj is self._listener:
                self._accept()
            elif key.fileobj is self._wake_reader:
                self._wake_reader.recv(64)
            else:
                self._read(key.fileobj)  # type: ignore[arg-type]
        now = time.monotonic()
        while self._reading:
            conn, (deadline, _) = next(iter(self._reading.items()))
            if deadline > now:
                break
            self._drop(conn)

    def _accept(self) -> None:
        for _ in range(64):  # a burst per round; the backlog keeps the rest
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError:
                # Out of descriptors (EMFILE, ENFILE) or memory: make room by
                # dropping the oldest slow client, or wait for the workers.
                if self._reading:
                    self._drop(next(iter(self._reading)))
                else:
                    time.sleep(0.05)
                return
            if len(self._reading) + self._requests.qsize() >= self.MAX_CONNECTIONS:
                if not self._reading:
                    conn.close()
                    continue
                self._drop(next(iter(self._reading)))
            conn.setblocking(False)
            if self._tls is not None:
                try:
                    conn = self._tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
                except (ssl.SSLError, OSError):
                    conn.close()
                    continue
                self._handshaking.add(conn)
            self._reading[conn] = (time.monotonic() + self.REQUEST_TIMEOUT_SECONDS, bytearray())
            self._selector.register(conn, selectors.EVENT_READ)

    def _handshake(self, conn: ssl.SSLSocket) -> bool:
        """One step of a TLS handshake; True once it is done."""
        try:
            conn.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            # The server's part is a few kilobytes: it fits the socket's
            # buffer, so waiting is only ever for the client's next bytes.
            return False
        except OSError:  # not TLS, a refused certificate, gone: nothing to tell
            self._drop(conn)
            return False
        self._handshaking.discard(conn)
        return True

    def _read(self, conn: socket.socket) -> None:
        entry = self._reading.get(conn)
        if entry is None:
            return
        if conn in self._handshaking and not self._handshake(conn):
            return
        try:
            chunk = conn.recv(4096)
            # TLS: bytes already decrypted beyond those, which poll does not report.
            while isinstance(conn, ssl.SSLSocket) and conn.pending() and len(chunk) <= self.MAX_REQUEST_BYTES:
                chunk += conn.recv(conn.pending())
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        data = entry[1]
        data += chunk
        end = _end_of_head(data)
        if end is None:
            if len(data) > self.MAX_REQUEST_BYTES:
                self._drop(conn)
            return
        self._selector.unregister(conn)
        del self._reading[conn]
        self._requests.put((conn, bytes(data[:end])))

    def _drop(self, conn: socket.socket) -> None:
        self._reading.pop(conn, None)
        self._handshaking.discard(conn)
        try:
            self._selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    # -- the worker threads: answer complete requests ----------------------------

    def _work(self) -> None:
        while True:
            item = self._requests.get()
            if item is None:
                return
            conn, head = item
            try:
                self._answer(conn, head, time.monotonic() + self.SEND_TIMEOUT_SECONDS)
            except OSError:
                pass  # the client went away or stopped reading: nothing to tell
            except Exception as exc:
                _log.error("metrics.request_failed", error=repr(exc))
            finally:
                conn.close()

    def _answer(self, conn: socket.socket, head: bytes, deadline: float) -> None:
        request_line, _, header_lines = head.partition(b"\n")
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            _send_reply(conn, deadline, 400, b"bad request\n", _TEXT, head_only=False)
            return
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            _send_reply(conn, deadline, 405, b"only GET and HEAD\n", _TEXT, head_only=False, extra="Allow: GET, HEAD\r\n")
            return
        head_only = method == "HEAD"
        try:
            headers = http.client.parse_headers(io.BytesIO(header_lines))
        except http.client.HTTPException:
            _send_reply(conn, deadline, 400, b"bad request headers\n", _TEXT, head_only)
            return
        path, _, query = target.partition("?")
        if path == "/metrics":
            try:
                code, body, metric_headers = self._metrics(headers, query)
            except Exception as exc:
                _log.error("metrics.collect_failed", error=repr(exc))
                _send_reply(conn, deadline, 500, b"collect failed\n", _TEXT, head_only)
                return
            content_type = metric_headers.pop("Content-Type", _TEXT)
            extra = "".join(f"{name}: {value}\r\n" for name, value in metric_headers.items())
            _send_reply(conn, deadline, code, body, content_type, head_only, extra=extra + "Vary: Accept, Accept-Encoding\r\n")
        elif path == "/healthz":
            ok = self._healthy()
            _send_reply(conn, deadline, 200 if ok else 503, b"ok\n" if ok else b"unhealthy\n", _TEXT, head_only)
        else:
            _send_reply(conn, deadline, 404, b"not found: try /metrics or /healthz\n", _TEXT, head_only)

    def _metrics(self, headers: email.message.Message, query: str) -> tuple[int, bytes, dict[str, str]]:
        """The reply of prometheus_client's own WSGI app (the format by Accept,
        gzip by Accept-Encoding, ``name[]`` filtering), called in this thread.
        A HEAD is answered as the GET it stands for, without the body."""
        environ = {
            "REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": query, "SCRIPT_NAME": "",
            "SERVER_NAME": "h5watch", "SERVER_PORT": str(self.port), "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http" if self._tls is None else "https", "wsgi.input": io.BytesIO(),
            "wsgi.errors": io.StringIO(),
            "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        }
        for name in ("Accept", "Accept-Encoding"):
            value = headers.get(name)
            if value is not None:
                environ["HTTP_" + name.upper().replace("-", "_")] = value
        started: list[tuple[str, list[tuple[str, str]]]] = []

        def start_response(status: str, response_headers: list[tuple[str, str]], exc_info: object = None) -> None:
            started.append((status, response_headers))

        body = b"".join(self._app(environ, start_response))
        status, response_headers = started[-1]
        return int(status.split()[0]), body, {name: value for name, value in response_headers if name}


def bind_listener(addr: str, port: int) -> socket.socket:
    """A TCP socket bound to ``addr:port``, not listening yet, on ``addr`` (a
    name, an IPv4 or IPv6 address; "" for every address, IPv6 and IPv4 alike
    where the host has IPv6); ``OSError`` (``socket.gaierror`` for an unknown
    name) if it cannot be."""
    if addr == "" and socket.has_ipv6:
        try:
            return _bind(socket.AF_INET6, ("::", port), dual_stack=True)
        except OSError:
            pass  # no IPv6 on this host after all: every IPv4 address
    family, _, _, _, sockaddr = socket.getaddrinfo(addr or "0.0.0.0", port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return _bind(family, sockaddr)


def _listen(addr: str, port: int, backlog: int) -> socket.socket:
    """A non-blocking listening socket on ``addr``, as :func:`bind_listener`."""
    listener = bind_listener(addr, port)
    try:
        listener.listen(backlog)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener


def _bind(family: int, sockaddr: tuple[object, ...], dual_stack: bool = False) -> socket.socket:
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if dual_stack:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(sockaddr)
    except OSError:
        listener.close()
        raise
    return listener


_TEXT = "text/plain; charset=utf-8"
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")


def _end_of_head(data: bytearray) -> int | None:
    """Where a request's head (request line and headers) ends, or None if it has not yet."""
    match = _END_OF_HEAD.search(data)
    return None if match is None else match.end()


def _send_reply(conn: socket.socket, deadline: float, code: int, body: bytes, content_type: str, head_only: bool,
                extra: str = "") -> None:
    head = (
        f"HTTP/1.1 {code} {http.HTTPStatus(code).phrase}\r\nServer: h5watch\r\n"
        f"Date: {email.utils.formatdate(usegmt=True)}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    ).encode("latin-1")
    view = memoryview(head if head_only else head + body)
    while view:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("client did not read the reply in time")
        conn.settimeout(remaining)
        view = view[conn.send(view):]
