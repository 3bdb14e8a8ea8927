"""Job records on disk: written whole, read back, expired after the set time, ids checked."""

from __future__ import annotations

import time

import pytest

from jobs.store import JobStore

TASK = "0123456789abcdef0123456789abcdef"


def test_records_are_kept_until_they_expire_after_they_ended(tmp_path) -> None:
    store = JobStore(tmp_path / "jobs", ttl_seconds=0.5)
    store.save({"task_id": TASK, "status": "in_progress", "ended_at": None})
    time.sleep(0.6)
    assert store.load(TASK)["status"] == "in_progress"  # a running job never expires
    store.save({"task_id": TASK, "status": "completed", "ended_at": time.time(), "result": {"answer": "x"}})
    assert JobStore(tmp_path / "jobs", ttl_seconds=0.5).load(TASK)["result"] == {"answer": "x"}  # another process
    time.sleep(0.6)
    assert store.load(TASK) is None and not list((tmp_path / "jobs").iterdir())  # expired: deleted


def test_only_task_ids_name_records(tmp_path) -> None:
    store = JobStore(tmp_path, ttl_seconds=60)
    (tmp_path / "secret.json").write_text("{}")
    for name in ("../secret", "secret", "", TASK.upper()):
        assert store.load(name) is None
    with pytest.raises(ValueError):
        store.save({"task_id": "../../etc/x"})


def test_a_damaged_record_reads_as_none(tmp_path) -> None:
    store = JobStore(tmp_path, ttl_seconds=60)
    (tmp_path / f"{TASK}.json").write_bytes(b"\xff{not json")
    assert store.load(TASK) is None and store.records() == []
