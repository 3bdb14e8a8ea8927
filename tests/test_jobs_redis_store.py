"""Jobs on Redis (jobs.redis_store) against a real redis-server: records as the file store keeps
them, captions recorded once with the last one known, segment tasks taken over from a consumer
that stopped but not from one that renews its claims, and Redis down answered within seconds."""

from __future__ import annotations

import time
import uuid

import pytest

from jobs.errors import JobStoreUnavailable
from jobs.records import CaptionRecord, JobRecord, JobResult, JobStatus, VideoInfo
from jobs.redis_store import CaptionCount, RedisJobStore, SegmentQueue, connect
from testing.served import free_port

TASK = "0123456789abcdef0123456789abcdef"
INFO = VideoInfo(video_duration=60.0, start_time=0.0, end_time=60.0, segment_count=2, frames_per_segment=4)


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}:"  # each test its own keys on the session's server


def record(status: JobStatus = JobStatus.PENDING) -> JobRecord:
    return JobRecord(task_id=TASK, owner="a", folder=None, status=status, created_at=time.time(), video_info=INFO)


def caption(start: float, by: str) -> CaptionRecord:
    return CaptionRecord(start=start, end=start + 30, caption=f"seen by {by}", captioned_by=by)


def test_a_record_runs_with_its_captions_then_expires_with_them(redis_server, prefix) -> None:
    client = connect(redis_server.url)
    store = RedisJobStore(client, ttl_seconds=0.5, prefix=prefix)
    assert store.record_caption(TASK, 0, caption(0, "a"), (1, 1)) == CaptionCount(False, 0)  # no such job: nothing kept
    assert client.keys(f"{prefix}*") == []
    store.create(record(), "{}", SegmentQueue(client, prefix), "segments", [{"task_id": TASK, "index": 0}])
    assert store.load(TASK).status is JobStatus.PENDING and store.waiting() == 1
    store.start(TASK)
    assert store.record_caption(TASK, 1, caption(30, "b"), (10, 3)).new
    first = store.record_caption(TASK, 0, caption(0, "a"), (12, 4))
    again = store.record_caption(TASK, 0, caption(0, "b"), (12, 4))  # a segment taken over: not twice
    assert (first.new, first.recorded, again.new, again.recorded) == (True, 2, False, 2)
    running = store.load(TASK)
    assert running.status is JobStatus.IN_PROGRESS and store.waiting() == 0
    assert [c.captioned_by for c in running.segments] == ["a", "b"]  # in segment order
    assert running.progress.segments_captioned == 2 and running.progress.generated_tokens == 7
    assert store.tokens(TASK) == (22, 7)
    result = JobResult.model_validate(
        {
            "answer": "x",
            "segments": running.segments,
            "video_info": INFO,
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        }
    )
    ended = store.end(TASK, JobStatus.COMPLETED, result=result)
    assert ended.status is JobStatus.COMPLETED and store.load(TASK) == ended
    assert store.end(TASK, JobStatus.CANCELED) is None  # ended once: a late cancel changes nothing
    assert store.records() == []
    time.sleep(0.7)
    assert store.load(TASK) is None
    assert client.keys(f"{prefix}job:*") == []  # record, spec, captions, progress all expired


def test_a_segment_is_taken_over_from_a_consumer_that_stopped_renewing_it(redis_server, prefix) -> None:
    client = connect(redis_server.url)
    queue = SegmentQueue(client, prefix)
    streams = ["segments"]
    queue.ensure(streams)
    client.xadd(queue.key("segments"), {"task_id": TASK, "index": "0"})
    stream, entry, fields, taken_over = queue.take("a", streams, claim_idle_s=0.3)
    assert (stream, fields["index"], taken_over) == ("segments", "0", False)
    for _ in range(3):  # a renews its claim: b never gets it
        time.sleep(0.15)
        queue.renew("a", [(stream, entry)])
        assert queue.take("b", streams, claim_idle_s=0.3) is None
    time.sleep(0.4)  # a stopped renewing: b takes it over
    assert queue.take("b", streams, claim_idle_s=0.3) == ("segments", entry, fields, True)
    queue.done(stream, entry)
    assert (
        client.xlen(queue.key("segments")) == 0 and client.xpending(queue.key("segments"), "captioners")["pending"] == 0
    )
    client.xadd(queue.key("segments"), {"task_id": TASK, "index": "1"})
    _, given_back, _, _ = queue.take("a", streams, claim_idle_s=60)
    queue.release("a", "segments", given_back)  # shutting down: taken over at once, no timeout
    assert queue.take("b", streams, claim_idle_s=60)[1:4:2] == (given_back, True)


def test_the_group_is_made_again_when_redis_lost_it(redis_server, prefix) -> None:
    client = connect(redis_server.url)
    queue = SegmentQueue(client, prefix)
    queue.ensure(["segments"])
    client.delete(queue.key("segments"))  # as after a restart without persistence
    assert queue.take("a", ["segments"], claim_idle_s=1) is None
    client.xadd(queue.key("segments"), {"task_id": TASK, "index": "0"})
    assert queue.take("a", ["segments"], claim_idle_s=1)[2] == {"task_id": TASK, "index": "0"}


def test_redis_unreachable_is_told_within_seconds(prefix) -> None:
    store = RedisJobStore(connect(f"redis://127.0.0.1:{free_port()}/0"), ttl_seconds=60, prefix=prefix)
    started = time.monotonic()
    with pytest.raises(JobStoreUnavailable, match=r"Redis at 127\.0\.0\.1:\d+\) is unavailable"):
        store.load(TASK)
    with pytest.raises(JobStoreUnavailable):
        store.save(record())
    assert time.monotonic() - started < 5


def test_a_replica_takes_one_entry_at_a_time_its_own_stream_first(redis_server, prefix) -> None:
    client = connect(redis_server.url)
    queue = SegmentQueue(client, prefix)
    streams = ["segments:a", "segments"]
    queue.ensure(streams)
    client.xadd(queue.key("segments"), {"task_id": TASK, "index": "0"})
    client.xadd(queue.key("segments:a"), {"task_id": TASK, "index": "1"})
    assert queue.take("a", streams, claim_idle_s=60)[0] == "segments:a"
    pending = {s: client.xpending(queue.key(s), "captioners")["pending"] for s in streams}
    assert pending == {"segments:a": 1, "segments": 0}  # the other one is still there for anyone
    assert queue.take("b", ["segments"], claim_idle_s=60)[2]["index"] == "0"
