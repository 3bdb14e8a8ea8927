"""The media store with its checks: what an upload to the files API and a request by id go through.

:class:`MediaLibrary` checks an upload in a decode process as a request's medium is checked
(media.identify: Pillow's guards for images, the container probe for videos) before the store
keeps it, and hands requests the stored bytes by id.
"""

from __future__ import annotations

from pathlib import Path

from media.digest import file_digest
from media.errors import WrongMediaKind
from media.identify import identify
from media.store import MediaKind, MediaStore, StoredMedia
from media.worker import DecodePool


class MediaLibrary:
    """``store`` behind the checks of ``decoder``'s processes and the pixel limits of requests."""

    def __init__(self, store: MediaStore, decoder: DecodePool, *, max_image_pixels: int, max_video_pixels: int) -> None:
        self.store = store
        self.decoder = decoder
        self.limits = {"max_image_pixels": max_image_pixels, "max_video_pixels": max_video_pixels}

    def add_upload(self, path: Path, *, filename: str, purpose: str) -> StoredMedia:
        """Check the uploaded file at ``path`` (blocking) and store it (moved in) under a new id;
        raises the media error a request with this file would get, and then stores nothing."""
        self.store.check_size(path.stat().st_size)
        kind = self.decoder.run(identify, path, **self.limits)
        return self.store.add(path, kind=kind, digest=file_digest(path), filename=filename, purpose=purpose)

    def remember(self, path: Path, kind: MediaKind, digest: str, media_id: str) -> StoredMedia:
        """Keep a request's medium, already read by the request, under the client's ``media_id``
        (vLLM's ``uuid``); the request's file stays where it is."""
        return self.store.add(path, kind=kind, digest=digest, media_id=media_id, keep=True)

    def use(
        self, media_id: str, into: Path, kind: MediaKind | None = None, where: str = ""
    ) -> tuple[StoredMedia, Path]:
        """The stored medium ``media_id`` as a file under ``into``; UnknownMedia (404) when it is not
        held, WrongMediaKind (415, as an upload of the other kind) when ``kind`` is the other one."""
        record = self.store.get(media_id)
        if kind is not None and record.kind != kind:
            raise WrongMediaKind(
                f"the file {media_id!r} is {_a(record.kind)}, not {_a(kind)}{where}: send it where "
                f"{record.kind}s go (/analyze_{record.kind}, or a 'file' part in a chat message)"
            )
        return self.store.use(media_id, into)


def _a(kind: MediaKind) -> str:
    return "an image" if kind == "image" else "a video"
