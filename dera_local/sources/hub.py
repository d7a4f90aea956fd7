"""Downloads GGUF files with huggingface_hub: its progress bars, resumable downloads and
standard cache, honouring HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN
(read when called, not when imported). A finished download is checked against the known
size and sha256 (or, where the catalog has none, the sha256 the hub publishes: the
X-Linked-Etag header of LFS- and Xet-stored files, which huggingface_hub reads before the
plain ETag); a file that fails the check is removed from the cache, so it never loads
later. A pinned revision is passed through to every request.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
from pathlib import Path

from ..errors import DeraError
from .catalog import RemoteFile

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class RemoteMissingError(DeraError):
    """The hub answered 404: the repository or the file is gone (a fallback may serve)."""


def _settings() -> dict:
    """Hub settings from the environment as it is now (huggingface_hub reads its
    constants once at import)."""
    cache = os.environ.get("HF_HUB_CACHE")
    if not cache and os.environ.get("HF_HOME"):
        cache = str(Path(os.environ["HF_HOME"]) / "hub")
    return {
        "endpoint": os.environ.get("HF_ENDPOINT") or None,
        "cache_dir": cache or None,
        "token": os.environ.get("HF_TOKEN") or None,
    }


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached_path(remote: RemoteFile) -> Path | None:
    """The file's path in the local cache, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        remote.repo, remote.filename, cache_dir=_settings()["cache_dir"], revision=remote.revision
    )
    return Path(found) if isinstance(found, str) else None


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_from_cache(path: Path) -> None:
    """Removes a snapshot link and the blob it points to."""
    blob = path.resolve()
    for item in (path, blob):
        item.unlink(missing_ok=True)


def _expected_sha256(remote: RemoteFile, settings: dict) -> str | None:
    if remote.sha256:
        return remote.sha256
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(
        remote.repo, remote.filename, revision=remote.revision, endpoint=settings["endpoint"]
    )
    etag = get_hf_file_metadata(url, token=settings["token"]).etag or ""
    return etag if _SHA256.match(etag) else None


@contextlib.contextmanager
def _quiet_hub_log():
    """huggingface_hub logs each retry ("Retrying in 1s [Retry 1/5]") as a warning; the
    outcome is reported in one line instead. Its logger at DEBUG (set by the user) wins."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    if level == logging.NOTSET or level > logging.DEBUG:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def download(remote: RemoteFile) -> Path:
    """Downloads (or finds in the cache) one file and checks it; returns its local path."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import hf_hub_download

    settings = _settings()
    was_cached = cached_path(remote) is not None  # checked when it was downloaded
    try:
        with _quiet_hub_log():
            local = Path(
                hf_hub_download(
                    remote.repo,
                    remote.filename,
                    cache_dir=settings["cache_dir"],
                    endpoint=settings["endpoint"],
                    token=settings["token"],
                    revision=remote.revision,
                    local_files_only=offline(),
                )
            )
            if was_cached or offline():
                return local
            expected = _expected_sha256(remote, settings)
    except hub_errors.LocalEntryNotFoundError:
        reason = "HF_HUB_OFFLINE is set" if offline() else "the hub cannot be reached"
        raise DeraError(
            f"{remote}: not in the local cache and {reason}; connect and run dera-local pull again"
        ) from None
    except hub_errors.GatedRepoError:
        raise DeraError(
            f"{remote}: the repository is gated; accept its terms on the hub and set HF_TOKEN"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise RemoteMissingError(
            f"{remote.repo}: no such repository on the hub (or it is private: set HF_TOKEN)"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise RemoteMissingError(f"{remote}: the repository has no such revision") from None
    except (hub_errors.EntryNotFoundError, hub_errors.RemoteEntryNotFoundError):
        raise RemoteMissingError(f"{remote}: the repository has no such file (404)") from None
    except hub_errors.HfHubHTTPError as exc:
        raise DeraError(f"{remote}: the hub answered {exc}".splitlines()[0]) from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DeraError(
                f"{remote}: the disk is full; free space (the partial download "
                "is kept and resumes next time)"
            ) from None
        raise DeraError(f"{remote}: download failed ({exc})") from None
    if remote.size is not None and local.stat().st_size != remote.size:
        size = local.stat().st_size
        _remove_from_cache(local)
        raise DeraError(
            f"{remote}: {size} bytes, expected {remote.size}; removed the file, "
            "run dera-local pull again"
        )
    if expected is not None and file_sha256(local) != expected:
        _remove_from_cache(local)
        raise DeraError(
            f"{remote}: checksum mismatch (sha256 differs from {expected[:12]}...); "
            "removed the file, run dera-local pull again"
        )
    return local
