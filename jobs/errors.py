"""The jobs package's one exception family, free of HTTP (the HTTP side maps classes to statuses).

    Exception
    ├── LookupError
    │   └── UnknownJob          no job has this id here (never submitted, or its record expired)
    ├── ValueError
    │   └── SegmentPlanError    the span or segment parameters do not fit this video or the limits
    ├── JobNotFinished          the job has no result (yet): waiting, running, or cancelled
    ├── JobRunsElsewhere        cancel of a job another process runs on the file store (use Redis)
    ├── JobStoreUnavailable     the shared job store (Redis) cannot be reached now; try again later
    ├── TooManyJobs             as many jobs as allowed already wait to run
    ├── JobFailed               asking for the result of a job that failed: ``kind`` and message
    ├── InternalJobError        kind recorded for a bug or a device failure (the server log has it)
    └── llava_custom.errors.EngineClosed
        └── JobInterrupted      kind recorded for a job cut off by a shutdown or a restart

A failed job's record keeps its error's *kind*, the name of the exception class that ended it
(``UndecodableMedia``, ``MediaTooLarge``, ``UnsupportedMedia``... from the media package, or one of
the two kinds above), and its message; :class:`JobFailed` carries both back to whoever asks for the
result. Kinds are names, not statuses: the HTTP side turns a kind into the status its error table
gives that class (``http_api.errors.status_for_kind``), so an error inside a job answers as the same
error outside one. ``JobInterrupted`` is a kind of ``EngineClosed`` because that is what happened to
the job: the service stopped under it (so the client is told to try again later).
"""

from __future__ import annotations

from llava_custom.errors import EngineClosed


class UnknownJob(LookupError):
    """No job has this id here (never submitted, or its record expired)."""


class SegmentPlanError(ValueError):
    """The parameters do not describe a span of this video that can be cut into segments."""


class JobNotFinished(Exception):
    """The job has no result (yet): it is still running, or it was cancelled."""


class JobRunsElsewhere(Exception):
    """The job runs in another process sharing the file store; only Redis passes a cancel on."""


class JobStoreUnavailable(Exception):
    """The shared job store (Redis, LLAVA_REDIS_URL) did not answer; nothing was done, try again."""


class TooManyJobs(Exception):
    """As many jobs as allowed already wait to run."""


class JobFailed(Exception):
    """The job ended in failure; ``kind`` names the class of the error that ended it."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class InternalJobError(Exception):
    """A bug or a device failure ended the job (the kind recorded; the traceback is in the log)."""


class JobInterrupted(EngineClosed):
    """The server stopped or restarted while the job waited or ran; it is not resumed."""


def kind_of(error: BaseException) -> str:
    """The kind a failed job records for ``error``: its class's name."""
    return type(error).__name__
