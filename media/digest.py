"""Content hashes of media files: the identity under which decoded media is reused."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: Path) -> str:
    """SHA-256 of the file's bytes, hex: the same for an upload, a download or a data: URL of them."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
