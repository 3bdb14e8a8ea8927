"""Request and job folders carry their process's pid; those of stopped processes are removed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from media import workdirs


def test_folders_of_stopped_processes_go_and_others_stay(tmp_path: Path) -> None:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    names = [
        f"llava-request-{ended.pid}-a",
        f"llava-job-{ended.pid}-b",
        f"llava-request-{os.getpid()}-c",  # this process runs
        "llava-request-x-d",  # not ours
        "llava-test-serve-e",
    ]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "upload").write_bytes(b"data")
    assert sorted(workdirs.remove_leftovers(tmp_path)) == sorted(names[:2])
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(names[2:])


def test_a_request_folder_is_named_after_this_process_and_removed_afterwards() -> None:
    with workdirs.request_folder() as folder:
        assert folder.is_dir() and folder.name.startswith(f"llava-request-{os.getpid()}-")
    assert not folder.exists()
    job = workdirs.job_folder()
    assert job.name.startswith(f"llava-job-{os.getpid()}-")
    job.rmdir()
