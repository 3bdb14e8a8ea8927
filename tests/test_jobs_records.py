"""A job's status names: the enum the API answers from, and the same names in the web page."""

from __future__ import annotations

import re
from pathlib import Path

from jobs.records import ENDED, JobStatus

JOBS_JS = Path(__file__).resolve().parent.parent / "ui" / "jobs.js"


def test_the_status_strings_are_the_ones_the_api_answers() -> None:
    assert [s.value for s in JobStatus] == ["pending", "in_progress", "completed", "failed", "canceled"]
    assert {s for s in JobStatus if s.ended} == ENDED == {"completed", "failed", "canceled"}
    assert JobStatus("in_progress") is JobStatus.IN_PROGRESS and f"{JobStatus.FAILED}" == "failed"


def test_the_page_reads_the_same_status_names_from_one_place() -> None:
    script = JOBS_JS.read_text(encoding="utf-8")
    block = re.search(r"const JobStatus = Object\.freeze\(\{(.*?)\}\);", script, re.DOTALL)
    assert block, "ui/jobs.js declares const JobStatus = Object.freeze({...})"
    names = dict(re.findall(r"(\w+): \"(\w+)\"", block.group(1)))
    assert names == {status.name: status.value for status in JobStatus}
    rest = script.replace(block.group(0), "")
    for status in JobStatus:  # nowhere else a status as a string literal: JobStatus.<NAME> instead
        assert f'"{status.value}"' not in rest and f"'{status.value}'" not in rest, status.value
