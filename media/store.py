"""Media sent once and referred to afterwards by id: the files API's store (http_api.files_api).

Under the store's folder (LLAVA_MEDIA_DIR)::

    blobs/<sha256>        the bytes, once per content, however many ids refer to them
    records/<key>.json    one per id: what the file is and when it expires (key: the id's SHA-256,
                          so that no id, not even a client's vLLM ``uuid``, becomes a path)
    incoming/<pid>-*      uploads being received, renamed into blobs/ once checked
    .lock                 taken (flock) around every change, by every process using the folder

Ids are random (``file-`` and 128 bits), never the content hash: knowing a file's bytes tells
nothing about its id. The store is bounded in bytes (the least recently used ids go first; the
bytes go once no id refers to them) and in age (``expires_at``, fixed at upload as in Gemini's
and OpenAI's files). Workers of one server and replicas on one volume share the folder; the lock
makes each change whole (an id and its blob appear and disappear together).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from media.errors import MediaTooLarge, StoreUnavailable, UnknownMedia
from media.sizes import format_bytes
from media.workdirs import process_running

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)
MediaKind = Literal["image", "video"]
FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")
_INCOMING = re.compile(r"^(\d+)-")


@dataclass(frozen=True)
class StoredMedia:
    """One id of the store: an image or a video, its bytes' digest and its times (Unix seconds)."""

    id: str
    kind: MediaKind
    digest: str  # SHA-256 of the bytes, as media.file_digest gives it
    bytes: int
    filename: str
    purpose: str
    created_at: int
    expires_at: int
    used_at: float  # the last request that read it (least recently used goes first)

    def file_object(self) -> dict[str, object]:
        """OpenAI's file object (what ``client.files.create`` parses), plus the medium's kind."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "kind": self.kind,
        }


def new_file_id() -> str:
    return f"file-{secrets.token_hex(16)}"


class MediaStore:
    """The store in ``folder``, holding at most ``max_bytes`` for at most ``ttl_seconds`` each."""

    def __init__(
        self,
        folder: Path,
        max_bytes: int,
        ttl_seconds: float,
        clock: Callable[[], float] = time.time,
        records: Records | None = None,
    ) -> None:
        self.folder = Path(folder).expanduser()
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self.blobs = self.folder / "blobs"
        self.incoming_dir = self.folder / "incoming"
        for path in (self.blobs, self.incoming_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.records = records or FileRecords(self.folder)

    # -- receiving ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def incoming(self) -> Iterator[Path]:
        """A new file in the store's folder for an upload being received (renamed into the store
        by :meth:`add`, so that the bytes are written once); removed if it is still there after."""
        handle, name = tempfile.mkstemp(prefix=f"{os.getpid()}-", dir=self.incoming_dir)
        os.close(handle)
        path = Path(name)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def check_size(self, size: int) -> None:
        """MediaTooLarge for a file the store could never hold."""
        if size > self.max_bytes:
            raise MediaTooLarge(
                f"the file is {format_bytes(size)}, more than the media store holds "
                f"({format_bytes(self.max_bytes)}, LLAVA_MEDIA_STORE_BYTES)"
            )

    def add(
        self,
        path: Path,
        *,
        kind: MediaKind,
        digest: str,
        filename: str = "",
        purpose: str = "vision",
        media_id: str | None = None,
        keep: bool = False,
    ) -> StoredMedia:
        """Store the checked file at ``path`` under a new id (or ``media_id``, which it replaces)
        and return its record; the least recently used ids go until the store fits its bound.

        The file is moved in (``keep``: linked or copied, the caller still reads it); identical
        bytes already stored are kept once."""
        size = path.stat().st_size
        self.check_size(size)
        now = self.clock()
        record = StoredMedia(
            id=media_id or new_file_id(),
            kind=kind,
            digest=digest,
            bytes=size,
            filename=filename,
            purpose=purpose,
            created_at=int(now),
            expires_at=int(now + self.ttl_seconds),
            used_at=now,
        )
        with self._locked():
            blob = self.blobs / digest
            if not blob.exists():
                self._bring_in(path, blob, keep)
            elif not keep:
                path.unlink()  # the same bytes are stored already
            replaced = self._read(record.id)
            self._write(record)
            if replaced is not None and replaced.digest != digest:
                self._drop_blob_if_unused(replaced.digest)
            self._evict(keep_id=record.id)
        logger.info("stored %s %s (%s, %s)", kind, record.id, format_bytes(size), digest[:12])
        return record

    def _bring_in(self, path: Path, blob: Path, keep: bool) -> None:
        partial = blob.with_name(f".{blob.name}.{os.getpid()}.partial")
        try:
            if keep:
                try:
                    os.link(path, partial)
                except OSError:  # another filesystem, or links not allowed: a copy
                    shutil.copyfile(path, partial)
            else:
                shutil.move(path, partial)
            os.replace(partial, blob)
        finally:
            partial.unlink(missing_ok=True)

    # -- reading --------------------------------------------------------------------------------

    def get(self, media_id: str) -> StoredMedia:
        """The record of ``media_id``; UnknownMedia (404) when there is none or it expired."""
        with self._locked():
            return self._held(media_id)

    def use(self, media_id: str, into: Path) -> tuple[StoredMedia, Path]:
        """The record of ``media_id`` and its bytes as a file under ``into`` (a link: the bytes stay
        readable for the caller even if the id is evicted or deleted meanwhile); its last use is now."""
        with self._locked():
            record = replace(self._held(media_id), used_at=self.clock())
            self._write(record)
            target = into / f"stored-{secrets.token_hex(4)}"
            try:
                os.link(self.blobs / record.digest, target)
            except FileNotFoundError as error:
                if self.records.beyond_folder:
                    # Records in Redis name bytes kept by a replica whose folder this one does not
                    # share: the id is still good there, so it stays.
                    raise UnknownMedia(
                        f"the file {media_id!r} is stored by another replica, whose LLAVA_MEDIA_DIR "
                        "this one does not share; ask that replica or share the folder"
                    ) from error
                self._remove(media_id)  # the blob went without its record: a damaged store
                raise UnknownMedia(f"the file {media_id!r} is no longer stored; upload it again") from error
            except OSError as error:
                if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                shutil.copyfile(self.blobs / record.digest, target)  # the folders are on two filesystems
        return record, target

    def list(self) -> list[StoredMedia]:
        """Every id held and not expired, newest first."""
        now = self.clock()
        held = [record for record in self._all() if record.expires_at > now]
        return sorted(held, key=lambda record: (record.created_at, record.id), reverse=True)

    def delete(self, media_id: str) -> StoredMedia:
        """Remove ``media_id`` (its bytes once no other id refers to them); UnknownMedia if absent."""
        with self._locked():
            record = self._held(media_id)
            self._remove(media_id)
        logger.info("deleted %s %s", record.kind, media_id)
        return record

    def stats(self) -> tuple[int, int]:
        """Bytes held (each content once) and the number of ids, expired ones not counted (their
        records and bytes go at the next change or sweep)."""
        now = self.clock()
        records = [record for record in self._all() if record.expires_at > now]
        return sum(self._blob_sizes(records).values()), len(records)

    def sweep(self) -> int:
        """Remove expired ids, bytes no id refers to (their records expired in Redis) and uploads
        left by processes that stopped; the number of ids removed."""
        for path in self.incoming_dir.iterdir():
            found = _INCOMING.match(path.name)
            if found is not None and not process_running(int(found.group(1))):
                path.unlink(missing_ok=True)
        now = self.clock()
        with self._locked():
            records = self._all()
            expired = [record.id for record in records if record.expires_at <= now]
            for media_id in expired:
                self._remove(media_id)
            referred = {record.digest for record in records if record.expires_at > now}
            for blob in self.blobs.iterdir():
                if blob.name not in referred and not blob.name.startswith("."):
                    blob.unlink(missing_ok=True)
        return len(expired)

    # -- inside the lock ------------------------------------------------------------------------

    def _held(self, media_id: str) -> StoredMedia:
        record = self._read(media_id)
        if record is None:
            raise UnknownMedia(
                f"no file {media_id!r} is stored here; upload it (POST /v1/files) and use the id answered"
            )
        if record.expires_at <= self.clock():
            self._remove(media_id)
            raise UnknownMedia(f"the file {media_id!r} expired; upload it again (POST /v1/files)")
        return record

    def _evict(self, keep_id: str) -> None:
        now = self.clock()
        records = self._all()
        for record in records:
            if record.expires_at <= now:
                self._remove(record.id)
        records = [record for record in records if record.expires_at > now]
        sizes = self._blob_sizes(records)
        held = sum(sizes.values())
        for record in sorted(records, key=lambda record: record.used_at):
            if held <= self.max_bytes:
                break
            if record.id == keep_id:
                continue
            self._remove(record.id)
            records = [other for other in records if other.id != record.id]
            if all(other.digest != record.digest for other in records):
                held -= sizes.pop(record.digest, 0)
            logger.info("evicted %s %s (the store is over LLAVA_MEDIA_STORE_BYTES)", record.kind, record.id)

    def _remove(self, media_id: str) -> None:
        record = self._read(media_id)
        self.records.remove(media_id)
        if record is not None:
            self._drop_blob_if_unused(record.digest)

    def _drop_blob_if_unused(self, digest: str) -> None:
        if all(record.digest != digest for record in self._all()):
            (self.blobs / digest).unlink(missing_ok=True)

    def _blob_sizes(self, records: list[StoredMedia]) -> dict[str, int]:
        return {record.digest: record.bytes for record in records}

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return self.records.locked()

    def _read(self, media_id: str) -> StoredMedia | None:
        return self.records.read(media_id)

    def _write(self, record: StoredMedia) -> None:
        self.records.write(record)

    def _all(self) -> list[StoredMedia]:
        return self.records.all()


class Records(Protocol):
    """Where the store's records live, and the lock every change holds."""

    beyond_folder: bool  # whether processes that do not share the store's folder see them too

    def locked(self) -> contextlib.AbstractContextManager[None]: ...
    def read(self, media_id: str) -> StoredMedia | None: ...
    def write(self, record: StoredMedia) -> None: ...
    def remove(self, media_id: str) -> None: ...
    def all(self) -> list[StoredMedia]: ...


class FileRecords:
    """Records as JSON files beside the bytes, changed under a file lock (flock): every worker
    and every replica using the folder sees the same records."""

    beyond_folder = False

    def __init__(self, folder: Path) -> None:
        self.folder = folder / "records"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_path = folder / ".lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with self._lock_path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _path(self, media_id: str) -> Path:
        return self.folder / f"{hashlib.sha256(media_id.encode()).hexdigest()[:40]}.json"

    def read(self, media_id: str) -> StoredMedia | None:
        try:
            return StoredMedia(**json.loads(self._path(media_id).read_text()))
        except FileNotFoundError:
            return None

    def write(self, record: StoredMedia) -> None:
        path = self._path(record.id)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(asdict(record)))
        os.replace(partial, path)  # readers see the old record or the new one, never half of one

    def remove(self, media_id: str) -> None:
        self._path(media_id).unlink(missing_ok=True)

    def all(self) -> list[StoredMedia]:
        records = []
        for path in self.folder.glob("*.json"):
            try:
                records.append(StoredMedia(**json.loads(path.read_text())))
            except FileNotFoundError:  # removed meanwhile by another process
                continue
        return records


class RedisRecords:
    """Records in Redis (with LLAVA_REDIS_URL: replicas share them), one key per id expiring
    with it, and a Redis lock around every change; the bytes stay in the store's folder, which
    replicas must share (a ReadWriteMany volume). Redis not answering is StoreUnavailable (503)."""

    PREFIX = "llava:media:"
    beyond_folder = True
    LOCK_SECONDS = 30  # a holder that died frees the lock after this

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.index = f"{self.PREFIX}ids"  # a set of the ids, to list them without SCAN

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with self._reachable():
            with self.client.lock(f"{self.PREFIX}lock", timeout=self.LOCK_SECONDS, blocking_timeout=self.LOCK_SECONDS):
                yield

    def _key(self, media_id: str) -> str:
        return f"{self.PREFIX}id:{hashlib.sha256(media_id.encode()).hexdigest()[:40]}"

    def read(self, media_id: str) -> StoredMedia | None:
        with self._reachable():
            text = self.client.get(self._key(media_id))
        return None if text is None else StoredMedia(**json.loads(text))

    def write(self, record: StoredMedia) -> None:
        with self._reachable():
            pipe = self.client.pipeline()
            pipe.set(self._key(record.id), json.dumps(asdict(record)), exat=max(record.expires_at, 1))
            pipe.sadd(self.index, record.id)
            pipe.execute()

    def remove(self, media_id: str) -> None:
        with self._reachable():
            self.client.pipeline().delete(self._key(media_id)).srem(self.index, media_id).execute()

    def all(self) -> list[StoredMedia]:
        with self._reachable():
            ids = sorted(self.client.smembers(self.index))
            texts = self.client.mget([self._key(media_id) for media_id in ids]) if ids else []
            gone = [media_id for media_id, text in zip(ids, texts, strict=True) if text is None]
            if gone:  # expired in Redis: forgotten by the index too
                self.client.srem(self.index, *gone)
        return [StoredMedia(**json.loads(text)) for text in texts if text is not None]

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        import redis

        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.LockError) as error:
            message = f"the media store's records (Redis) are unavailable: {error}; try again shortly"
            raise StoreUnavailable(message) from error
