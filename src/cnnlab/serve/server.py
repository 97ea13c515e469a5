"""The HTTP server of `cnnlab serve`: waitress, with deadlines and JSON errors.

Why waitress: it is a production WSGI server in pure Python (no C extension, so it
installs and runs alike on Linux, macOS and Windows), with no dependencies, and it is
built the way a server facing slow or hostile clients must be: one asynchronous loop
reads every connection and buffers each request whole (bodies over `inbuf_overflow`
go to a temporary file) before a fixed pool of threads runs the app, so a slow client
holds a socket, never a thread. It caps connections (`connection_limit`; the kernel's
listen backlog queues the rest), request headers (`max_request_header_size`), bodies
(`max_request_body_size`, checked against Content-Length before reading) and idle
time (`channel_timeout`), and sends no version banner when `ident` is empty.
(Gunicorn needs fork, so no Windows; uvicorn/hypercorn are ASGI servers; Werkzeug's
server is for development: a thread per connection and no timeouts.)

What is added here:
- a request deadline: a request must arrive whole within `timeout` seconds of its
  first byte, else the client gets 408 and the connection is closed. waitress's
  `channel_timeout` alone counts idle time, so a client trickling a byte a second
  (slowloris) or a body shorter than its Content-Length would never be closed.
- a chunk larger than the rest of the body limit is refused (413) as soon as its size
  line arrives, and a request line over MAX_URL bytes gets 414 (waitress: 431);
- every error the server answers itself (400 malformed HTTP, 408, 413, 414, 431, 501)
  is the app's one-line JSON `{"error": "..."}`.

The pool: `threads` threads take requests from one FIFO queue (waitress's task
dispatcher). A connection has at most one request in the queue or running, so the
queue is at most `connection_limit` long.
"""
from __future__ import annotations

import logging
import socket
import sys
import time

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher
from waitress.utilities import BadRequest, Error, RequestEntityTooLarge

from .app import (CONNECTIONS, MAX_BYTES, MAX_HEADER, MAX_URL, REASONS, THREADS, TIMEOUT,
                  error_body)

INBUF = 256 * 1024        # request bodies above this are buffered in a temporary file
LINGER = 3.0              # seconds and bytes read and dropped after an error answer
LINGER_BYTES = 64 * 1024 * 1024


def fixed_mmap_threshold(nbytes=128 * 1024) -> bool:
    """glibc: allocate blocks over nbytes (decoded images) with mmap always, so that
    freeing them gives the memory back to the system. By default glibc raises that
    threshold to the largest block freed so far (up to 32 MiB), after which freed images
    stay in the heap of each thread: 226 MiB resident after a burst of large uploads,
    84 MiB with the threshold fixed. Returns whether it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        return bool(ctypes.CDLL(None).mallopt(-3, nbytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


class URITooLong(BadRequest):
    code = 414
    reason = "URI Too Long"


class RequestTimeout(Error):
    code = 408
    reason = "Request Timeout"


def message(error) -> str:
    """One line for the client for a waitress error."""
    detail = error.body if isinstance(error.body, str) else ""
    return {
        400: f"malformed HTTP request: {detail}",
        408: "the request did not arrive in time",
        413: "the request is too large (at most "
             f"{getattr(error, 'limit', MAX_BYTES) / (1024 * 1024):g} MiB)",
        414: f"the URL is too long (at most {MAX_URL // 1024} KiB)",
        431: "the request headers are too large (at most "
             f"{getattr(error, 'limit', MAX_HEADER) // 1024} KiB)",
        501: f"not implemented: {detail}",
    }.get(error.code, f"{error.reason}: {detail}")


def error_response(error, version="1.1") -> bytes:
    """A whole HTTP response carrying the JSON error (the connection closes after it)."""
    body = error_body(message(error))
    reason = REASONS.get(error.code, error.reason)
    head = (f"HTTP/{version} {error.code} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
            "X-Content-Type-Options: nosniff\r\n\r\n")
    return head.encode("latin-1") + body


class JsonErrorTask(ErrorTask):
    def execute(self):
        self.channel.linger = True  # the client may still be sending the refused body
        e = self.request.error
        body = error_body(message(e))
        self.status = f"{e.code} {REASONS.get(e.code, e.reason)}"
        self.response_headers.extend([("Content-Type", "application/json"),
                                      ("X-Content-Type-Options", "nosniff")])
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class Parser(HTTPRequestParser):
    """waitress's parser, plus 414 for a long request line and an early 413 for a chunk
    announced larger than the body may be."""

    def received(self, data):
        if self.body_rcv is None and not self.completed:
            head = (self.header_plus + data).lstrip()
            end = head.find(b"\n")
            if (end < 0 and len(head) > MAX_URL + 64) or end > MAX_URL + 64:
                self.parse_header(b"GET / HTTP/1.0\r\n")
                self.error = URITooLong("")
                self.completed = True
                return len(data)
        n = super().received(data)
        rcv = self.body_rcv
        if self.chunked and rcv is not None and not self.completed and \
                self.body_bytes_received + rcv.chunk_remainder >= self.adj.max_request_body_size:
            self.error = RequestEntityTooLarge("")
            self.completed = True
        if self.error is not None and self.error.code in (413, 431):
            # waitress refuses sizes >= its limit; the server sets it one above max_bytes
            self.error.limit = (self.adj.max_request_body_size - 1 if self.error.code == 413
                                else self.adj.max_request_header_size)
        return n


class Channel(HTTPChannel):
    """A connection; `started` is when the request being received began (None between
    requests).

    After an error answer the connection closes gracefully ("lingering close"): the
    sending side is shut, and what the client still sends (the rest of a refused body)
    is read and dropped for up to LINGER seconds and LINGER_BYTES, so that the client
    reads the answer instead of a connection reset."""
    parser_class = Parser
    error_task_class = JsonErrorTask
    started = None
    _receiving = None
    linger = False        # set by an error answer
    lingering = None      # time the lingering close began
    drained = 0

    def handle_close(self):
        if self.linger and self.lingering is None and self.connected:
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                return super().handle_close()
            self.lingering = time.time()
            self.will_close = False
            return None
        return super().handle_close()

    def readable(self):
        return True if self.lingering is not None else super().readable()

    def writable(self):
        return False if self.lingering is not None else super().writable()

    def handle_read(self):
        if self.lingering is None:
            return super().handle_read()
        try:
            data = self.recv(self.adj.recv_bytes)
        except OSError:
            data = b""
        self.drained += len(data)
        if not data or self.drained > LINGER_BYTES:
            self.linger = False
            super().handle_close()
        return None

    def received(self, data):
        out = super().received(data)
        if self.request is None:
            self.started = self._receiving = None
        elif self.request is not self._receiving:
            self._receiving, self.started = self.request, time.time()
        return out

    def time_out(self):
        """Answer 408 and close (called by the server's loop, no task running)."""
        version = getattr(self.request, "version", None) or "1.1"
        data = error_response(RequestTimeout(""), version if version in ("1.0", "1.1")
                              else "1.1")
        with self.outbuf_lock:
            self.outbufs[-1].append(data)
            self.current_outbuf_count += len(data)
            self.total_outbufs_len += len(data)
        if self.request is not None:
            self.request.close()  # a body buffered so far (maybe a temporary file)
        self.request = None
        self.started = self._receiving = None
        self.will_close = True


class Server(TcpWSGIServer):
    """waitress's TCP server on a given listening socket, with the request deadline."""
    channel_class = Channel

    def __init__(self, app, sock, *, timeout=TIMEOUT, threads=THREADS,
                 connections=CONNECTIONS, max_bytes=MAX_BYTES, quiet=True):
        adj = Adjustments(threads=threads, connection_limit=connections,
                          channel_timeout=max(1, round(timeout)), cleanup_interval=1,
                          max_request_header_size=MAX_HEADER,
                          max_request_body_size=max_bytes + 1, inbuf_overflow=INBUF,
                          ident="", expose_tracebacks=False, asyncore_use_poll=True,
                          backlog=1024, url_scheme="http")
        self.request_timeout = timeout
        dispatcher = ThreadedTaskDispatcher()
        dispatcher.set_thread_count(threads)
        if quiet:  # "Task queue depth is N": a busy queue is normal under load here
            logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        super().__init__(app, map={}, _sock=sock, dispatcher=dispatcher, adj=adj,
                         bind_socket=False,
                         sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()))

    def maintenance(self, now):
        for channel in list(self.active_channels.values()):
            if getattr(channel, "lingering", None) is not None:
                if now - channel.lingering > LINGER:
                    channel.linger = False
                    channel.handle_close()
                continue
            started = getattr(channel, "started", None)
            if started is not None and not channel.requests and not channel.will_close \
                    and now - started > self.request_timeout:
                channel.time_out()
        super().maintenance(now)  # then idle connections (channel_timeout)

    def serve(self):
        """Run until KeyboardInterrupt or SystemExit (the threads are then stopped)."""
        self.run()

    def stop(self):
        self.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
        self.close()
