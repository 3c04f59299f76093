"""Each connection bounded in bytes and time where uvicorn leaves it open: the request head (request
line and headers) before any route runs, a body no route reads, answers the client does not read.

uvicorn's httptools protocol buffers a URL or header of any length and waits for the rest of a
head for ever: one connection that sent a 200 MiB header value took the server from 793 to
1,113 MiB RSS (a few such connections get the pod OOM-killed), and a connection that never
finishes its head, or never sends one, is held open indefinitely. This subclass answers 414 or 431
once the head passes `max_head_bytes` and 408 when it has not arrived within `head_timeout_s` of
the connection opening (or of the previous response, on a kept-alive connection), and closes the
connection. An idle connection that has sent nothing is closed without an answer.

The same goes for a body no route reads (a chunked body sent to a probe): uvicorn answers, then
reads and drops whatever follows for as long as the client sends (2.3 GB/s, half a core of the event
loop per connection, here). The connection is closed once `max_unread_body_bytes` have been dropped.
And for answers a client does not read: once the socket buffers are full uvicorn waits for it for
ever; the connection is dropped when writing has been paused for `write_timeout_s`.

Each of those bounds is per connection, and uvicorn accepts any number of connections: 15,000 of
them, each holding an unfinished 60 KiB head, took the server from 797 to 1,787 MiB RSS. So at most
`max_connections` are open. A cap alone would let one client holding that many slow heads lock
everyone else out (the kubelet's probes too), so a connection that opens at the cap closes the one
that has waited longest for a request (idle, or its head still arriving: 503 with Retry-After: 1
if it had begun one), the way nginx reuses idle connections when it runs out. Only when every
connection is being answered is the new one refused, with the same 503, before it sends anything.
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Callable
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.errors import error_payload

TOO_MANY_CONNECTIONS = "too many open connections; retry"

RejectionCounter = Callable[[str], None]
"""Called with the reason ("evicted", "too_many_connections", "invalid_request", "head_too_large",
"head_timeout", "unread_body", "write_timeout") of each connection closed early, for the metrics."""


def bounded_httptools_protocol(
    max_connections: int,
    max_head_bytes: int,
    head_timeout_s: float,
    max_unread_body_bytes: int,
    write_timeout_s: float,
    count_rejection: RejectionCounter,
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with these limits (uvicorn.Config takes the class as `http`)."""
    return type(
        "BoundedHttpToolsProtocol",
        (_BoundedConnection,),
        {
            "max_connections": max_connections,
            "max_head_bytes": max_head_bytes,
            "head_timeout_s": head_timeout_s,
            "max_unread_body_bytes": max_unread_body_bytes,
            "write_timeout_s": write_timeout_s,
            "count_rejection": staticmethod(count_rejection),
            "waiting": collections.OrderedDict(),  # one per server: the class is made per server
        },
    )


class _BoundedConnection(HttpToolsProtocol):
    max_connections: int
    max_head_bytes: int
    head_timeout_s: float
    max_unread_body_bytes: int
    write_timeout_s: float
    count_rejection: RejectionCounter
    # Connections with no request being answered (idle, or a head arriving), the longest-waiting
    # first: the ones a new connection may close when the cap is reached.
    waiting: ClassVar[collections.OrderedDict[_BoundedConnection, None]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._reading_head = False  # between the first byte of a request and its last header
        self._head_timer: asyncio.TimerHandle | None = None
        self._dropped_body_bytes = 0  # of the current request, arriving after its answer
        self._write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # joins uvicorn's set of this server's open connections
        # A connection closed here leaves the set only when its close is done, so a flood of
        # connections still counts against the cap meanwhile.
        if len(self.connections) > self.max_connections and not self._evict_longest_waiting():
            self._refuse(503, "too_many_connections", TOO_MANY_CONNECTIONS, retry_after_s=1)
            return
        self._wait_for_request()

    def _evict_longest_waiting(self) -> bool:
        while self.waiting:
            oldest, _ = self.waiting.popitem(last=False)
            if oldest.transport.is_closing():
                continue
            if oldest._reading_head:
                oldest._refuse(
                    503, "evicted", TOO_MANY_CONNECTIONS, retry_after_s=1, code="too_many_connections"
                )
            else:  # idle: nothing to answer; a keep-alive client reconnects
                oldest._stop_head_timer()
                oldest.count_rejection("evicted")
                oldest.transport.close()
            return True
        return False

    def _wait_for_request(self) -> None:
        self._start_head_timer()
        self.waiting[self] = None
        self.waiting.move_to_end(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.waiting.pop(self, None)
        self._stop_head_timer()
        if self._write_timer is not None:
            self._write_timer.cancel()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout_s, self._write_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        self.count_rejection("write_timeout")
        self.transport.abort()  # close() would wait to flush what the client is not reading

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._reading_head or self.transport.is_closing():
            return
        # Counted after parsing: a chunk that completes the head (and carries body bytes after it)
        # has already cleared _reading_head, so only bytes of an unfinished head count.
        self._head_bytes += len(data)
        if self._head_bytes > self.max_head_bytes:
            too_long_url = not self.headers  # no header finished: the bytes are the request line
            self._refuse(414 if too_long_url else 431, "head_too_large", "request line and headers too large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head, self._head_bytes, self._dropped_body_bytes = True, 0, 0

    def on_body(self, body: bytes) -> None:
        if self.cycle is not None and self.cycle.response_complete:  # answered: uvicorn drops it
            self._dropped_body_bytes += len(body)
            if self._dropped_body_bytes > self.max_unread_body_bytes and not self.transport.is_closing():
                self.count_rejection("unread_body")
                self.transport.close()
                return
        super().on_body(body)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self.waiting.pop(self, None)  # being answered: not to be closed for a newcomer
        self._stop_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Waiting for the next request on this kept-alive connection, unless a pipelined one
        # (its head already read) has just started.
        if not self.transport.is_closing() and self.cycle.response_complete:
            self._wait_for_request()

    def _start_head_timer(self) -> None:
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # a request is being answered: its body has limits of its own
        if self._reading_head:
            self._refuse(408, "head_timeout", "request head not received in time")
        else:  # idle since it opened or since its last answer: nothing to answer
            if self.cycle is None:
                self.count_rejection("head_timeout")  # never sent a request at all
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, as the documented JSON error, counted."""
        self._refuse(400, "invalid_request", msg)

    def _refuse(
        self,
        status: int,
        reason: str,
        message: str,
        retry_after_s: int | None = None,
        code: str | None = None,
    ) -> None:
        """Answer `status` with error `code` (the metric's `reason` unless given) and close."""
        self.waiting.pop(self, None)
        self._stop_head_timer()
        self.count_rejection(reason)
        body = json.dumps(error_payload("", code or reason, message)).encode()
        # The server's default headers (date, server) as on every other answer: RFC 9110 asks for
        # a Date on 4xx answers from a server with a clock.
        defaults = [b"%s: %s\r\n" % header for header in self.server_state.default_headers]
        self.transport.write(
            b"".join(
                [
                    STATUS_LINE[status],
                    *defaults,
                    b"" if retry_after_s is None else b"retry-after: %d\r\n" % retry_after_s,
                    b"content-type: application/json\r\n",
                    b"content-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        self.transport.close()
