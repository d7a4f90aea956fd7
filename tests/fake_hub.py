"""A stand-in for the Hugging Face hub on 127.0.0.1: serves files at
/{owner}/{repo}/resolve/{revision}/{file} with the headers huggingface_hub reads
(X-Repo-Commit, an LFS-style ETag holding the sha256, Content-Length), byte ranges for
resuming, and switches to cut a transfer mid-file, serve a corrupted body, serve other
bytes at a pinned revision, or publish the sha256 the way Xet-stored files do (in
X-Linked-Etag, with a plain ETag that is not the sha256)."""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
ROUTE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>[^?]+)")


class FakeHub:
    def __init__(self) -> None:
        self.files: dict[tuple[str, str], bytes] = {}
        self.cut_next_get: set[tuple[str, str]] = set()  # first GET stops half-way
        self.corrupt: set[tuple[str, str]] = set()  # body differs from its ETag
        self.range_requests: list[str] = []
        self.at_revision: dict[tuple[str, str, str], bytes] = {}  # (repo, revision, file)
        self.xet: set[tuple[str, str]] = set()  # sha256 only in X-Linked-Etag
        self.revisions: list[str] = []  # the revision of every request, in order
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _lookup(self):
                match = ROUTE.match(self.path)
                key = (match["repo"], match["file"]) if match else None
                self.revision = match["revision"] if match else None
                if match:
                    hub.revisions.append(self.revision)
                    pinned = hub.at_revision.get((match["repo"], self.revision, match["file"]))
                    if pinned is not None:
                        return key, (pinned, pinned)
                if key not in hub.files:
                    body = b'{"error": "Entry not found"}'
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if self.command == "GET":
                        self.wfile.write(body)
                    return None, None
                data = hub.files[key]
                served = data
                if key in hub.corrupt:
                    served = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
                return key, (data, served)

            def _headers(self, status: int, data: bytes, length: int, start: int = 0) -> None:
                self.send_response(status)
                # A commit id resolves to itself; a branch to the fixed commit.
                pinned = (
                    self.revision if re.fullmatch(r"[0-9a-f]{40}", self.revision or "") else None
                )
                self.send_header("X-Repo-Commit", pinned or COMMIT)
                sha256 = hashlib.sha256(data).hexdigest()
                if self._key in hub.xet:
                    self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                    self.send_header("X-Linked-Etag", f'"{sha256}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                else:
                    self.send_header("ETag", f'"{sha256}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(length))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()

            def do_HEAD(self) -> None:
                key, payload = self._lookup()
                self._key = key
                if key:
                    self._headers(200, payload[0], len(payload[0]))

            def do_GET(self) -> None:
                key, payload = self._lookup()
                self._key = key
                if not key:
                    return
                data, served = payload
                start = 0
                ranged = self.headers.get("Range")
                if ranged:
                    hub.range_requests.append(ranged)
                    start = int(ranged.removeprefix("bytes=").split("-")[0])
                if key in hub.cut_next_get and not start:
                    hub.cut_next_get.discard(key)
                    self._headers(200, data, len(data))
                    self.wfile.write(served[: len(served) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self._headers(206 if start else 200, data, len(data) - start, start)
                self.wfile.write(served[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def point_hub_clients_at(server: FakeHub, monkeypatch, home) -> None:
    """Sends huggingface_hub (and dera-local) to the stand-in hub with an empty cache
    under `home`, and clears the model environment variables a test must not inherit."""
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("DERA_ALIGNED", "DERA_REFERENCE", "DERA_LORA", "DERA_PAIR"):
        monkeypatch.delenv(name, raising=False)
