"""Content-addressed storage of attachment bytes under `data_dir/blobs/`.

A blob's key is the SHA-256 of its bytes, so storing the same attachment twice (a
re-fetched mail, a picture in every reply of a thread) costs nothing and a key can never
point at other bytes than the ones it was made from. Files are written to a temporary
name, fsynced and renamed: an event never refers to a half-written blob, even after a
crash, because the event is committed only after `put` returned.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

URL_PREFIX = "blob:"
_KEY = re.compile(r"^[0-9a-f]{64}$")


class BlobTooLarge(ValueError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes is over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class BlobStore:
    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"not a blob key: {key[:80]!r}")
        # Two levels of fan-out keep directories small with millions of blobs.
        return self.root / key[:2] / key[2:4] / key

    def put(self, data: bytes) -> str:
        """Store bytes, returning the attachment URL ("blob:<sha256>"). Blocking I/O:
        call it from a thread in async code."""
        if self.max_bytes is not None and len(data) > self.max_bytes:
            raise BlobTooLarge(len(data), self.max_bytes)
        key = hashlib.sha256(data).hexdigest()
        path = self._path(key)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return URL_PREFIX + key

    def path_of(self, url: str) -> Path | None:
        """The file behind a "blob:" URL, or None if it is not one of ours or is missing."""
        if not url.startswith(URL_PREFIX):
            return None
        try:
            path = self._path(url[len(URL_PREFIX) :])
        except ValueError:
            return None
        return path if path.exists() else None

    def get(self, url: str) -> bytes | None:
        path = self.path_of(url)
        return path.read_bytes() if path is not None else None
