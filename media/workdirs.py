"""The temporary folders of requests and jobs, named after the process that made them, so that a
process starting after a crash (SIGKILL, out of memory) removes what a dead one left behind.

A folder is ``llava-request-<pid>-<random>`` (one request's upload and downloads, removed when the
request ends) or ``llava-job-<pid>-<random>`` (a job's video, removed when the job ends). Only the
folders of processes that no longer run are removed, so that workers and replicas sharing a temp
directory never delete each other's work; a folder whose pid was reused by a live process stays
until that one ends (a container's restart begins pids anew, so this errs on the side of keeping).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)
_OURS = re.compile(r"^llava-(?:request|job)-(\d+)-")


def _prefix(kind: str) -> str:
    return f"llava-{kind}-{os.getpid()}-"


@contextlib.contextmanager
def request_folder() -> Iterator[Path]:
    """A folder for one request's files, removed when the request is done with it."""
    with tempfile.TemporaryDirectory(prefix=_prefix("request")) as folder:
        yield Path(folder)


def job_folder() -> Path:
    """A folder for one job's video; the job removes it when it ends."""
    return Path(tempfile.mkdtemp(prefix=_prefix("job")))


def process_running(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: running
        return True
    return True


def remove_leftovers(directory: Path | None = None) -> list[str]:
    """Remove the request and job folders of processes that no longer run (in the temp directory
    unless ``directory`` is given); the names removed."""
    removed = []
    for path in Path(directory or tempfile.gettempdir()).glob("llava-*-*"):
        found = _OURS.match(path.name)
        if found is None or not path.is_dir() or process_running(int(found.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    if removed:
        logger.info("removed %d folders left by processes that stopped: %s", len(removed), ", ".join(sorted(removed)))
    return removed
