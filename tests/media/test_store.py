"""The media store on a real folder: ids, dedup by content, the byte bound, expiry, deletion,
several processes at once, and identify() on real files (tests/test_files_api.py covers HTTP)."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import media
from media.identify import identify
from media.store import FILE_ID, MediaStore, Records, RedisRecords
from testing.mediafiles import corrupt_file, write_image, write_video


class Clock:
    def __init__(self) -> None:
        self.now = float(int(time.time()))  # Redis expires records at their real expires_at

    def __call__(self) -> float:
        return self.now


def payload(folder: Path, name: str, content: bytes) -> tuple[Path, str]:
    path = folder / name
    path.write_bytes(content)
    return path, media.file_digest(path)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["files", "redis"])
def records(request: pytest.FixtureRequest) -> Iterator[Records | None]:
    """The store's records beside the bytes (the default) or in a real Redis (LLAVA_REDIS_URL)."""
    if request.param == "files":
        yield None
        return
    from jobs.redis_store import connect

    client = connect(request.getfixturevalue("redis_server").url)
    client.flushdb()
    yield RedisRecords(client)
    client.flushdb()


@pytest.fixture
def make_store(tmp_path: Path, clock: Clock, records: Records | None):
    def make(max_bytes: int = 10_000, ttl_seconds: float = 3600) -> MediaStore:
        return MediaStore(
            tmp_path / "store", max_bytes=max_bytes, ttl_seconds=ttl_seconds, clock=clock, records=records
        )

    return make


def test_a_file_gets_a_random_id_its_bytes_are_read_back_and_identical_bytes_are_kept_once(tmp_path, clock, make_store):
    store = make_store(10_000, 3600)
    first_path, digest = payload(tmp_path, "a", b"x" * 1000)
    second_path, _ = payload(tmp_path, "b", b"x" * 1000)
    first = store.add(first_path, kind="video", digest=digest, filename="clip.mp4")
    second = store.add(second_path, kind="video", digest=digest, filename="again.mp4")

    assert FILE_ID.match(first.id) and FILE_ID.match(second.id) and first.id != second.id
    assert digest[:32] not in first.id  # the id says nothing of the content
    assert not first_path.exists() and not second_path.exists()  # moved in, not copied
    assert list((tmp_path / "store" / "blobs").iterdir()) == [tmp_path / "store" / "blobs" / digest]
    assert store.stats() == (1000, 2)
    assert first.file_object() == {
        "id": first.id,
        "object": "file",
        "bytes": 1000,
        "created_at": int(clock.now),
        "expires_at": int(clock.now) + 3600,
        "filename": "clip.mp4",
        "purpose": "vision",
        "status": "processed",
        "kind": "video",
    }
    into = tmp_path / "request"
    into.mkdir()
    record, path = store.use(first.id, into)
    assert record.id == first.id and path.parent == into and path.read_bytes() == b"x" * 1000
    assert [each.id for each in store.list()] == sorted([first.id, second.id], reverse=True)


def test_deleting_an_id_keeps_the_bytes_until_no_id_refers_to_them(tmp_path, clock, make_store):
    store = make_store(10_000, 3600)
    path, digest = payload(tmp_path, "a", b"y" * 100)
    one = store.add(path, kind="image", digest=digest)
    path, _ = payload(tmp_path, "b", b"y" * 100)
    two = store.add(path, kind="image", digest=digest)
    blob = tmp_path / "store" / "blobs" / digest

    store.delete(one.id)
    assert blob.exists() and store.stats() == (100, 1)
    with pytest.raises(media.UnknownMedia, match=one.id):
        store.get(one.id)
    with pytest.raises(media.UnknownMedia):
        store.delete(one.id)
    store.delete(two.id)
    assert not blob.exists() and store.stats() == (0, 0)


def test_the_byte_bound_drops_the_least_recently_used_first(tmp_path, clock, make_store):
    store = make_store(2500, 3600)
    into = tmp_path / "request"
    into.mkdir()
    ids = []
    for number in range(2):
        path, digest = payload(tmp_path, f"f{number}", bytes([number]) * 1000)
        ids.append(store.add(path, kind="video", digest=digest).id)
        clock.now += 1
    store.use(ids[0], into)  # the older one was read since: the newer one is now the least recent
    clock.now += 1
    path, digest = payload(tmp_path, "f2", b"\x02" * 1000)
    third = store.add(path, kind="video", digest=digest)

    held = {record.id for record in store.list()}
    assert held == {ids[0], third.id}
    assert store.stats() == (2000, 2)
    assert len(list((tmp_path / "store" / "blobs").iterdir())) == 2
    big, digest = payload(tmp_path, "big", b"z" * 2501)
    with pytest.raises(media.MediaTooLarge, match="LLAVA_MEDIA_STORE_BYTES"):
        store.add(big, kind="video", digest=digest)
    assert {record.id for record in store.list()} == held  # nothing evicted for a refused file


def test_an_id_expires_after_the_ttl_and_its_bytes_go(tmp_path, clock, make_store):
    store = make_store(10_000, 60)
    path, digest = payload(tmp_path, "a", b"q" * 10)
    record = store.add(path, kind="image", digest=digest)
    clock.now += 59
    assert store.get(record.id).expires_at == record.expires_at and store.stats() == (10, 1)
    clock.now += 1
    assert store.stats() == (0, 0)  # /metrics stops counting it before anything removes it
    with pytest.raises(media.UnknownMedia, match="expired"):
        store.get(record.id)
    assert store.list() == [] and store.stats() == (0, 0)
    assert not (tmp_path / "store" / "blobs" / digest).exists()


def test_an_id_of_a_client_replaces_what_it_named_before(tmp_path, clock, make_store):
    store = make_store(10_000, 60)
    path, first = payload(tmp_path, "a", b"1" * 10)
    store.add(path, kind="image", digest=first, media_id="uuid:../../etc/passwd")
    path, second = payload(tmp_path, "b", b"2" * 10)
    store.add(path, kind="image", digest=second, media_id="uuid:../../etc/passwd")
    assert store.get("uuid:../../etc/passwd").digest == second
    assert [blob.name for blob in (tmp_path / "store" / "blobs").iterdir()] == [second]
    assert all(path.parent == tmp_path / "store" / "records" for path in (tmp_path / "store").rglob("*.json"))


def test_keep_leaves_the_callers_file_where_it_is(tmp_path, clock, make_store):
    store = make_store(10_000, 60)
    path, digest = payload(tmp_path, "a", b"k" * 10)
    store.add(path, kind="image", digest=digest, keep=True)
    assert path.read_bytes() == b"k" * 10 and (tmp_path / "store" / "blobs" / digest).read_bytes() == b"k" * 10


def _add_same_bytes(folder: str, number: int) -> str:
    store = MediaStore(Path(folder), max_bytes=10**9, ttl_seconds=60)
    with store.incoming() as path:
        path.write_bytes(b"same bytes" * 10_000)
        return store.add(path, kind="video", digest=media.file_digest(path)).id


def test_processes_adding_the_same_bytes_at_once_store_one_copy(tmp_path):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        ids = pool.starmap(_add_same_bytes, [(str(tmp_path / "store"), number) for number in range(8)])
    store = MediaStore(tmp_path / "store", max_bytes=10**9, ttl_seconds=60)
    assert len(set(ids)) == 8 and store.stats() == (100_000, 8)
    assert len(list((tmp_path / "store" / "blobs").iterdir())) == 1
    assert list((tmp_path / "store" / "incoming").iterdir()) == []


def test_sweep_removes_uploads_of_processes_that_stopped_and_expired_ids(tmp_path, clock, make_store):
    store = make_store(10_000, 60)
    dead = multiprocessing.get_context("spawn").Process(target=os.getpid)
    dead.start()
    dead.join()
    left = tmp_path / "store" / "incoming" / f"{dead.pid}-abc"
    left.write_bytes(b"half an upload")
    mine = tmp_path / "store" / "incoming" / f"{os.getpid()}-def"
    mine.write_bytes(b"being received")
    path, digest = payload(tmp_path, "a", b"e" * 10)
    store.add(path, kind="image", digest=digest)
    clock.now += 61
    assert store.sweep() == 1
    assert not left.exists() and mine.exists() and store.stats() == (0, 0)


def test_identify_tells_images_from_videos_and_refuses_what_a_request_would(tmp_path):
    limits = {"max_image_pixels": 10**7, "max_video_pixels": 10**7}
    assert identify(write_image(tmp_path / "a.png", size=(32, 32)), **limits) == "image"
    assert identify(write_image(tmp_path / "a.gif", size=(32, 32), frames=3), **limits) == "image"
    video = write_video(tmp_path / "a.mp4", frames=10, fps=5)
    assert identify(video, **limits) == "video"
    (tmp_path / "notes.txt").write_text("not a medium\n" * 10)
    with pytest.raises(media.UnsupportedMedia, match="neither an image"):
        identify(tmp_path / "notes.txt", **limits)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(media.InvalidSource, match="empty"):
        identify(tmp_path / "empty", **limits)
    damaged = write_image(tmp_path / "b.png", size=(64, 64))
    damaged.write_bytes(damaged.read_bytes()[:120])
    with pytest.raises(media.UndecodableMedia):
        identify(damaged, **limits)
    with pytest.raises(media.MediaTooLarge):
        identify(write_image(tmp_path / "big.png", size=(200, 200)), max_image_pixels=100, max_video_pixels=10**7)
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(video.read_bytes()[:200])
    with pytest.raises(media.UndecodableMedia):
        identify(corrupt_file(truncated), **limits)


def test_records_in_redis_are_shared_by_stores_on_one_folder_and_redis_down_is_a_503(tmp_path, redis_server):
    from jobs.redis_store import connect

    client = connect(redis_server.url)
    client.flushdb()
    one = MediaStore(tmp_path / "shared", max_bytes=10_000, ttl_seconds=60, records=RedisRecords(client))
    other = MediaStore(
        tmp_path / "shared", max_bytes=10_000, ttl_seconds=60, records=RedisRecords(connect(redis_server.url))
    )
    path, digest = payload(tmp_path, "a", b"r" * 10)
    record = one.add(path, kind="image", digest=digest)
    assert other.get(record.id) == record and not list((tmp_path / "shared").glob("records/*"))
    other.delete(record.id)
    with pytest.raises(media.UnknownMedia):
        one.get(record.id)
    down = MediaStore(
        tmp_path / "shared", max_bytes=10_000, ttl_seconds=60, records=RedisRecords(connect("redis://127.0.0.1:1/0"))
    )
    with pytest.raises(media.StoreUnavailable, match="Redis"):
        down.get(record.id)


def test_a_replica_without_the_bytes_answers_unknown_and_keeps_the_record_for_the_one_with_them(tmp_path, redis_server):
    # Two replicas on one Redis whose LLAVA_MEDIA_DIR are not shared: the id works on the one
    # that received the bytes, is unknown on the other, and asking the other does not delete it.
    from jobs.redis_store import connect

    client = connect(redis_server.url)
    client.flushdb()
    a = MediaStore(tmp_path / "a", max_bytes=10_000, ttl_seconds=60, records=RedisRecords(client))
    b = MediaStore(tmp_path / "b", max_bytes=10_000, ttl_seconds=60, records=RedisRecords(connect(redis_server.url)))
    path, digest = payload(tmp_path, "clip", b"v" * 10)
    record = a.add(path, kind="video", digest=digest)
    (tmp_path / "out").mkdir()
    with pytest.raises(media.UnknownMedia, match="another replica"):
        b.use(record.id, tmp_path / "out")
    used, copy = a.use(record.id, tmp_path / "out")
    assert used.id == record.id and copy.read_bytes() == b"v" * 10
    client.flushdb()
