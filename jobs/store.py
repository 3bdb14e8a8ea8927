"""Where long-video jobs are kept on disk: one JSON file per job, gone after a set time.

A job's record is written when it is submitted (so that a restart can tell that it was cut off),
after each caption (its progress, readable by every process sharing the folder) and when it
ends, with its result or failure. Nothing passes between processes but the records: replicas
that share jobs (cancel, segments, fail-over) do it through Redis (jobs.redis_store). Nothing else is kept:
the video itself is deleted once the job ends. Records of ended jobs expire ``ttl_seconds`` after
they ended; expired ones are deleted when the store next looks at them and at every start. Writes go to a temporary
file first and replace the record in one step, so a crash never leaves half a record. What a record holds, and its
JSON, is :class:`~jobs.records.JobRecord`'s; a file that is not a record reads as none.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from jobs.records import JobRecord

# Task ids are uuid4 hex strings; anything else can never name a record (no path tricks).
_TASK_ID = re.compile(r"^[0-9a-f]{32}$")


def valid_task_id(task_id: str) -> bool:
    return bool(_TASK_ID.match(task_id))


class JobStore:
    """Job records as ``<task_id>.json`` in ``directory``; ended ones expire after ``ttl_seconds``."""

    def __init__(self, directory: Path, ttl_seconds: float) -> None:
        self.directory = Path(directory).expanduser()
        self.ttl_seconds = ttl_seconds
        self.directory.mkdir(parents=True, exist_ok=True)

    def save(self, record: JobRecord) -> None:
        """Write ``record``, replacing any earlier one of its job."""
        path = self._path(record.task_id)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(record.to_json(), encoding="utf-8")
        os.replace(temporary, path)

    def load(self, task_id: str) -> JobRecord | None:
        """The job's record, or None when there is none, it is damaged, or it has expired (then it is deleted)."""
        if not valid_task_id(task_id):
            return None
        path = self._path(task_id)
        try:
            record = JobRecord.from_json(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):  # UnicodeDecodeError is a ValueError
            return None
        if self._expired(record):
            path.unlink(missing_ok=True)
            return None
        return record

    def records(self) -> list[JobRecord]:
        """Every record not expired (expired ones are deleted on the way)."""
        found = []
        for path in self.directory.glob("*.json"):
            record = self.load(path.stem)
            if record is not None:
                found.append(record)
        return found

    def _expired(self, record: JobRecord) -> bool:
        ended = record.ended_at
        return record.status.ended and ended is not None and time.time() - ended > self.ttl_seconds

    def _path(self, task_id: str) -> Path:
        if not valid_task_id(task_id):
            raise ValueError(f"not a task id: {task_id!r}")
        return self.directory / f"{task_id}.json"
