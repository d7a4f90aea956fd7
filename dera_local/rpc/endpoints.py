"""Where llama.cpp RPC workers are (HOST:PORT endpoints) and whether one answers.

llama.cpp aborts the whole process when it cannot connect to a worker or the worker
speaks another protocol version, so every endpoint is checked here first, in Python,
with a timeout: connect, send the protocol's HELLO, read the version back.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from ..errors import BadParameterError, WorkerError

DEFAULT_PORT = 50052  # llama.cpp's rpc-server default
LOCAL = "local"  # an endpoint list meaning "no workers: this machine"

# ggml-rpc's wire format: | command (1 byte) | size (uint64) | data |, answered with
# | size (uint64) | data |. HELLO is command 14 forever; its request is the client's
# 24 bytes of transport capabilities (zeros: plain TCP), its answer the version
# (major, minor, patch, padding) and the server's 24 bytes of capabilities.
_HELLO = 14
_CAPS_SIZE = 24
_HELLO_ANSWER = 4 + _CAPS_SIZE
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


def parse_endpoints(value: str | Iterable[str] | None, what: str = "--rpc") -> tuple[str, ...]:
    """'HOST:PORT[,HOST:PORT...]' (or a list of them) as a tuple; None, '' or 'local'
    mean no workers. Raises BadParameterError naming `what` on anything else."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    endpoints: list[str] = []
    for raw in items:
        item = raw.strip()
        if not item or item == LOCAL:
            continue
        endpoints.append(_checked_endpoint(item, what))
    if len(set(endpoints)) != len(endpoints):
        raise BadParameterError(f"{what}: an endpoint is listed twice in {value!r}")
    return tuple(endpoints)


def _checked_endpoint(item: str, what: str) -> str:
    host, sep, port_text = item.rpartition(":")
    if not sep or not host:
        raise BadParameterError(
            f"{what}: {item!r} is not HOST:PORT (e.g. 192.168.1.20:{DEFAULT_PORT})"
        )
    if host.startswith("[") or ":" in host:
        # llama.cpp splits an endpoint at its first ':' and resolves IPv4 names only.
        raise BadParameterError(f"{what}: {item!r}: llama.cpp's RPC takes IPv4 hosts or names")
    if not _HOST.match(host):
        raise BadParameterError(f"{what}: {item!r}: {host!r} is not a host name or address")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadParameterError(f"{what}: {item!r}: the port must be a number from 1 to 65535")
    return f"{host}:{int(port_text)}"


@cache
def client_version() -> tuple[int, int, int] | None:
    """The RPC protocol version the installed llama.cpp speaks, read from the header the
    wheel installs beside its libraries (None when it is not there)."""
    import llama_cpp

    header = Path(llama_cpp.__file__).resolve().parent.parent / "include" / "ggml-rpc.h"
    try:
        text = header.read_text()
    except OSError:
        return None
    parts = [
        re.search(rf"RPC_PROTO_{part}_VERSION\s+(\d+)", text)
        for part in ("MAJOR", "MINOR", "PATCH")
    ]
    if not all(parts):
        return None
    major, minor, patch = (int(m[1]) for m in parts)  # type: ignore[index]
    return major, minor, patch


def compatible(server: tuple[int, int, int], client: tuple[int, int, int]) -> bool:
    """ggml-rpc's own rule: same major version, server minor not newer than ours."""
    return server[0] == client[0] and server[1] <= client[1]


def hello(endpoint: str, timeout: float) -> tuple[int, int, int]:
    """The protocol version of the worker at `endpoint`. Raises WorkerError naming the
    endpoint when nothing listens there, it does not answer within `timeout` seconds
    (a worker serves one host at a time: another may hold it) or the answer is not
    ggml-rpc's."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as conn:
            conn.sendall(struct.pack("<BQ", _HELLO, _CAPS_SIZE) + bytes(_CAPS_SIZE))
            size = struct.unpack("<Q", _read_exactly(conn, 8))[0]
            if size != _HELLO_ANSWER:
                raise WorkerError(
                    f"{endpoint} answered, but not as a llama.cpp RPC worker "
                    f"(a {size}-byte handshake)"
                )
            major, minor, patch = _read_exactly(conn, size)[:3]
            return major, minor, patch
    except TimeoutError:
        raise WorkerError(
            f"the RPC worker at {endpoint} accepted the connection but did not answer "
            f"within {timeout:g} s; a worker serves one host at a time, so another "
            "may be using it"
        ) from None
    except ConnectionError as exc:
        raise WorkerError(
            f"cannot reach an RPC worker at {endpoint} ({_reason(exc)}); start one "
            f"there with `dera-local worker --port {port}`"
        ) from None
    except OSError as exc:
        raise WorkerError(f"cannot reach an RPC worker at {endpoint} ({_reason(exc)})") from None


def check_worker(endpoint: str, timeout: float) -> None:
    """Raises WorkerError unless the worker at `endpoint` answers and speaks a protocol
    version this llama.cpp accepts."""
    server = hello(endpoint, timeout)
    client = client_version()
    if client is not None and not compatible(server, client):
        raise WorkerError(
            f"the RPC worker at {endpoint} speaks protocol {_dotted(server)}, this "
            f"llama.cpp {_dotted(client)}: run the same llama.cpp (dera-local) version on both"
        )


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("the worker closed the connection")
        data += chunk
    return data


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc) or type(exc).__name__).lower()


def _dotted(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
