"""Job records on disk: written whole, read back, expired after the set time, ids checked; the
record's JSON, records written before failures had a kind, damaged ones."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from jobs.records import JobRecord, JobResult, JobStatus, VideoInfo
from jobs.store import JobStore

TASK = "0123456789abcdef0123456789abcdef"
INFO = VideoInfo(video_duration=60.0, start_time=0.0, end_time=60.0, segment_count=2, frames_per_segment=4)


def record(status: JobStatus, task_id: str = TASK, **fields: Any) -> JobRecord:
    return JobRecord(
        task_id=task_id,
        owner="elsewhere:1",
        folder=None,
        status=status,
        created_at=time.time(),
        video_info=INFO,
        **fields,
    )


def result(answer: str) -> JobResult:
    return JobResult.model_validate(
        {"answer": answer, "segments": [], "video_info": INFO, "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    )


def test_records_are_kept_until_they_expire_after_they_ended(tmp_path) -> None:
    store = JobStore(tmp_path / "jobs", ttl_seconds=0.5)
    store.save(record(JobStatus.IN_PROGRESS, ended_at=None))
    time.sleep(0.6)
    assert store.load(TASK).status == "in_progress"  # a running job never expires
    store.save(record(JobStatus.COMPLETED, ended_at=time.time(), result=result("x")))
    assert JobStore(tmp_path / "jobs", ttl_seconds=0.5).load(TASK).result == result("x")  # another process
    time.sleep(0.6)
    assert store.load(TASK) is None and not list((tmp_path / "jobs").iterdir())  # expired: deleted


def test_only_task_ids_name_records(tmp_path) -> None:
    store = JobStore(tmp_path, ttl_seconds=60)
    (tmp_path / "secret.json").write_text("{}")
    for name in ("../secret", "secret", "", TASK.upper()):
        assert store.load(name) is None
    with pytest.raises(ValueError):
        store.save(record(JobStatus.PENDING, task_id="../../etc/x"))


def test_a_damaged_record_reads_as_none(tmp_path) -> None:
    store = JobStore(tmp_path, ttl_seconds=60)
    (tmp_path / f"{TASK}.json").write_bytes(b"\xff{not json")
    assert store.load(TASK) is None and store.records() == []
    no_result = json.loads(record(JobStatus.IN_PROGRESS).to_json()) | {"status": "completed"}
    for damaged in ({}, {"task_id": TASK, "status": "sleeping"}, no_result):
        (tmp_path / f"{TASK}.json").write_text(json.dumps(damaged))  # JSON, but not a record (or no result)
        assert store.load(TASK) is None and store.records() == []


# A failed job's record as the code before error kinds wrote it (an HTTP status, no kind).
OLD_FAILED = {
    "task_id": TASK,
    "owner": "elsewhere:1",
    "folder": "/tmp/llava-job-x",
    "status": "failed",
    "created_at": 1700000000.5,
    "ended_at": 1700000100.25,
    "error": "the server restarted while this job ran; submit it again",
    "video_info": {
        "video_duration": 300.0,
        "start_time": 30,
        "end_time": 270.0,
        "segment_count": 5,
        "frames_per_segment": 4,
    },
    "progress": {
        "segments_total": 5,
        "segments_decoded": 2,
        "segments_captioned": 1,
        "generated_tokens": 4,
        "elapsed_seconds": 3.5,
        "remaining_seconds": 14.0,
    },
    "segments": [{"start": 30, "end": 90.0, "caption": "a red frame", "error": None, "frame_times": [30.0, 45.5]}],
    "error_status": 503,
}


def test_records_written_before_error_kinds_still_load(tmp_path) -> None:
    store = JobStore(tmp_path, ttl_seconds=1e12)
    for status, kind in ((503, "JobInterrupted"), (422, "UndecodableMedia"), (500, "InternalJobError")):
        (tmp_path / f"{TASK}.json").write_text(json.dumps({**OLD_FAILED, "error_status": status}))
        loaded = store.load(TASK)
        assert loaded.status is JobStatus.FAILED and loaded.error_kind == kind
    body = loaded.status_body()
    assert body == {key: OLD_FAILED[key] for key in body}  # what GET /jobs/status answered for it
    assert set(body) == {"task_id", "status", "created_at", "ended_at", "video_info", "progress", "segments", "error"}


def test_a_record_reads_back_as_it_was_written(tmp_path) -> None:
    store = JobStore(tmp_path, ttl_seconds=60)
    written = record(JobStatus.FAILED, ended_at=time.time(), error="too large", error_kind="MediaTooLarge")
    store.save(written)
    assert store.load(TASK) == written == JobRecord.from_json(written.to_json())
    assert json.loads((tmp_path / f"{TASK}.json").read_text())["error_kind"] == "MediaTooLarge"
