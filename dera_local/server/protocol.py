"""uvicorn's h11 protocol with a deadline for request headers.

uvicorn times out a connection that idles *between* requests (its keep-alive timeout),
but not one that connects and sends nothing, or trickles a request's headers a byte at
a time: such a connection is held forever, and enough of them use up the process's file
descriptors (a "slowloris"). The API key cannot help: it is checked after the headers.
Here every request's headers must arrive within `header_timeout` seconds, counted from
the connection or from the request's first byte; then the client gets a 408 and the
connection is closed. (The body has its own deadline, in app.read_json.)
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def with_header_deadline(header_timeout: float) -> type[asyncio.Protocol]:
    """An H11Protocol class whose requests must send their headers within the timeout
    (pass it as uvicorn.Config(http=...))."""
    message = f"request headers not received within {header_timeout:g} s".encode()
    response = (
        b"HTTP/1.1 408 Request Timeout\r\n"
        b"content-type: text/plain; charset=utf-8\r\n"
        b"connection: close\r\n" + f"content-length: {len(message)}\r\n\r\n".encode() + message
    )

    class HeaderDeadlineProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._awaiting_headers():
                self._arm()  # the first byte of a next request on a kept-alive connection
            super().data_received(data)
            if not self._awaiting_headers():
                self._disarm()  # the headers are in: the request runs

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _awaiting_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                # Written raw: h11 cannot answer a request whose headers it never had.
                self.transport.write(response)
                self.transport.close()

    return HeaderDeadlineProtocol
