"""Long-video jobs of one worker: submit, run in the background, report progress, cancel, ask.

A submitted video is checked before the job is accepted (its length against the limit, the
segment plan against its limits), so those mistakes get an answer at once. Jobs then run
``max_running`` at a time in background threads, the others wait in order, at most
``max_pending``. Each job's captions go through the engine as :mod:`jobs.pipeline` says, at most
``captions_in_flight`` at a time, so interactive requests keep their place in the engine's queue.
The job's video lives in a folder of its own, deleted when the job ends; its record (status, then
the result or the failure) lives in the :class:`~jobs.store.JobStore`, where it survives a
restart until it expires. A job cut off by a restart or a shutdown is recorded as failed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import media
from jobs.limits import DEFAULT_FRAMES_PER_SEGMENT, DEFAULT_SEGMENT_SECONDS, JobLimits
from jobs.pipeline import DEFAULT_CAPTION_PROMPT, DEFAULT_QUESTION, LongVideoJob, SegmentCaption
from jobs.segments import Segment, SegmentPlanError, plan_segments
from jobs.store import JobStore
from llava_custom.engine import Engine, GenerationSettings
from llava_custom.errors import RequestCancelled

logger = logging.getLogger("llava_video_service")


STOPPED = "the server stopped while this job ran; submit it again"
# What GET /jobs/status answers, from the job's record.
STATUS_FIELDS = ("task_id", "status", "created_at", "ended_at", "video_info", "progress", "segments", "error")


class UnknownJob(LookupError):
    """No job has this id here (never submitted, or its record expired)."""


class JobNotFinished(Exception):
    """The job has no result (yet): it is still running, or it was cancelled."""


class TooManyJobs(Exception):
    """As many jobs as allowed already wait to run."""


@dataclass(frozen=True)
class JobParameters:
    """A job's validated parameters (the HTTP layer checks types and ranges)."""

    generation: GenerationSettings
    segment_seconds: float = DEFAULT_SEGMENT_SECONDS
    overlap_seconds: float = 0.0
    frames_per_segment: int = DEFAULT_FRAMES_PER_SEGMENT
    start_time: float | None = None
    end_time: float | None = None
    caption_prompt: str | None = None
    question: str | None = None


@dataclass
class _Running:
    task_id: str
    job: LongVideoJob
    folder: Path
    record: dict[str, Any]
    started: bool = False


class JobManager:
    """The jobs of one worker process; every method may be called from any thread."""

    def __init__(
        self,
        engine: Engine,
        decoder: media.DecodePool,
        store: JobStore,
        limits: JobLimits,
        decode_options: dict[str, Any] | None = None,
    ) -> None:
        self.engine = engine
        self.decoder = decoder
        self.store = store
        self.limits = limits
        # read_video's options for every segment (frame size, pixel limit, memory budget).
        self.decode_options = decode_options or {}
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(limits.max_running, thread_name_prefix="llava-job")
        self._closed = False
        self._mark_cut_off("the server restarted while this job ran; submit it again")

    # --- submitting ------------------------------------------------------------------------

    def submit(self, source: Path, folder: Path, parameters: JobParameters) -> dict[str, Any]:
        """Check the video at ``source`` and queue its job; the job owns ``folder`` (with
        ``source`` in it) from here on and deletes it when it ends. Blocking (probes the file).

        Raises MediaError subclasses for unreadable or too long videos, SegmentPlanError for a
        plan outside the video or over the segment or frame limits, TooManyJobs when the queue is
        full."""
        if parameters.frames_per_segment > self.limits.max_frames:
            raise SegmentPlanError(f"frames_per_segment may be at most {self.limits.max_frames}")
        duration = self.decoder.run(media.video_duration, source, max_pixels=self.decode_options.get("max_pixels"))
        if duration > self.limits.max_video_seconds:
            raise media.MediaTooLarge(
                f"the video is {duration:.0f} s long, over the {self.limits.max_video_seconds:g}-second limit for jobs"
            )
        segments = plan_segments(
            duration,
            segment_seconds=parameters.segment_seconds,
            overlap_seconds=parameters.overlap_seconds,
            start_time=parameters.start_time,
            end_time=parameters.end_time,
            max_segments=self.limits.max_segments,
        )
        task_id = uuid.uuid4().hex
        job = LongVideoJob(
            self.engine,
            lambda segment: self._read_segment(source, parameters.frames_per_segment, segment, segments[-1].end),
            segments,
            # Captions and the job's answer wait behind every interactive request in the engine.
            settings=dataclasses.replace(parameters.generation, background=True),
            caption_prompt=parameters.caption_prompt or DEFAULT_CAPTION_PROMPT,
            question=parameters.question or DEFAULT_QUESTION,
            in_flight=self.limits.captions_in_flight,
            on_progress=lambda: self._progressed(task_id),
        )
        record = {
            "task_id": task_id,
            "owner": f"{socket.gethostname()}:{os.getpid()}",
            "folder": str(folder),  # deleted when the job ends, or by the next start after a crash
            "status": "pending",
            "created_at": time.time(),
            "ended_at": None,
            "error": None,
            "video_info": {
                "video_duration": duration,
                "start_time": segments[0].start,
                "end_time": segments[-1].end,
                "segment_count": len(segments),
                "frames_per_segment": parameters.frames_per_segment,
            },
        }
        with self._lock:
            if self._closed:
                raise RuntimeError("the job manager is closed")
            waiting = sum(not running.started for running in self._running.values())
            if waiting >= self.limits.max_pending:
                raise TooManyJobs(f"{waiting} jobs are already waiting to run; submit again when one has started")
            running = _Running(task_id, job, folder, record)
            self._running[task_id] = running
            self.store.save(_snapshot(running))
            self._pool.submit(self._run, running)
        logger.info("job %s: %d segments over %.0f s of video", task_id, len(segments), duration)
        return self.status(task_id)

    # --- reading ---------------------------------------------------------------------------

    def status(self, task_id: str) -> dict[str, Any]:
        """The job's status, progress and the captions done so far (all of them once it ended);
        for a job another process runs (a replica sharing the folder), as of its last caption."""
        with self._lock:
            running = self._running.get(task_id)
            record = _snapshot(running) if running is not None else None
        if record is None:
            record = self._record(task_id)
        return {key: record.get(key) for key in STATUS_FIELDS}

    def result(self, task_id: str) -> dict[str, Any]:
        """The finished job's result body; raises UnknownJob, JobNotFinished or JobFailed."""
        record = self._record(task_id)
        if record["status"] == "completed":
            return record["result"]
        if record["status"] == "canceled":
            raise JobNotFinished(f"job {task_id} was cancelled; it has no result")
        if record["status"] in ("pending", "in_progress"):
            raise JobNotFinished(
                f"job {task_id} has not finished; GET /jobs/status?task_id={task_id} shows its progress"
            )
        raise JobFailed(record.get("error") or "the job failed", record.get("error_status", 500))

    def cancel(self, task_id: str) -> dict[str, Any]:
        """Stop the job (a waiting one never starts; a running one within a segment). A job that
        another process runs is asked to stop through the store; an ended job stays as it ended."""
        with self._lock:
            running = self._running.get(task_id)
            if running is not None:
                running.record["status"] = "canceled"  # at once; the thread ends within a segment
        if running is not None:
            running.job.cancel()
            return {"task_id": task_id, "status": "canceled"}
        record = self._record(task_id)
        if record["status"] not in ("pending", "in_progress"):
            return {"task_id": task_id, "status": record["status"]}
        self.store.request_cancel(task_id)
        return {"task_id": task_id, "status": "canceled"}

    def ask(self, task_id: str, question: str, generation: GenerationSettings) -> tuple[str, tuple[int, int]]:
        """``question`` answered from the finished job's captions (text only, no second look at
        the video); returns the answer and its (prompt, completion) tokens. Blocking."""
        result = self.result(task_id)
        captions = [
            SegmentCaption(
                Segment(index, item["start"], item["end"]),
                item.get("caption"),
                item.get("error"),
                tuple(item.get("frame_times", ())),
            )
            for index, item in enumerate(result["segments"])
        ]
        answerer = LongVideoJob(
            self.engine, _no_reading, [c.segment for c in captions], settings=generation, question=question
        )
        answer = answerer.answer(captions, question)
        return answer, answerer.usage

    # --- running ---------------------------------------------------------------------------

    def _run(self, running: _Running) -> None:
        record, job = running.record, running.job
        with self._lock:
            running.started = True
            job.progress.started = time.monotonic()
            if record["status"] == "pending":  # not when cancelled while waiting: run() then stops at once
                record["status"] = "in_progress"
        if self.store.cancel_requested(running.task_id):
            job.cancel()
        try:
            result = job.run()
        except Exception as error:
            if self._closed:  # cancelled, or its decoder or engine closed under it
                self._end(running, "failed", STOPPED, 503)
            elif isinstance(error, RequestCancelled):
                self._end(running, "canceled")
            elif isinstance(error, media.MediaError):
                self._end(running, "failed", str(error), 422)
            else:  # a bug or a device failure: logged; the record says where to look
                logger.exception("job %s failed", running.task_id)
                message = f"internal error while running the job ({type(error).__name__}); see the server log"
                self._end(running, "failed", message)
        else:
            record["result"] = {
                "answer": result.answer,
                "segments": [_caption_body(c) for c in result.captions],
                "video_info": record["video_info"],
                "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
                "status": "success",
            }
            self._end(running, "completed")
        finally:
            shutil.rmtree(running.folder, ignore_errors=True)

    def _progressed(self, task_id: str) -> None:
        """After each caption: the progress goes to the store (other replicas read it there), and a
        cancel asked through the store stops the job."""
        with self._lock:
            running = self._running.get(task_id)
            if running is None:
                return
            self.store.save(_snapshot(running))
        if self.store.cancel_requested(task_id):
            self.cancel(task_id)

    def _end(self, running: _Running, status: str, error: str | None = None, error_status: int = 500) -> None:
        with self._lock:
            record = _snapshot(running)
            record.update(status=status, ended_at=time.time())
            if status == "completed":
                record["progress"]["remaining_seconds"] = 0.0
            if error is not None:
                record.update(error=error, error_status=error_status)
            self.store.save(record)
            self._running.pop(running.task_id, None)
        logger.info("job %s %s after %.1f s", running.task_id, status, record["progress"]["elapsed_seconds"])

    def _read_segment(self, source: Path, frames: int, segment: Segment, last_end: float) -> media.SampledVideo:
        # A segment is [start, end): a frame right at its end opens the next segment (with no
        # overlap, it would otherwise be seen twice), except at the end of the analysed span.
        end = segment.end if segment.end >= last_end else math.nextafter(segment.end, 0.0)
        return self.decoder.read_video(source, frames, start_time=segment.start, end_time=end, **self.decode_options)

    def _record(self, task_id: str) -> dict[str, Any]:
        record = self.store.load(task_id)
        if record is None:
            raise UnknownJob(f"no job {task_id} (never submitted here, or its result expired)")
        return record

    def _mark_cut_off(self, reason: str) -> None:
        """Record as failed the unfinished jobs of this process, or of a process on this host
        that is gone (this worker before a restart); other replicas' jobs are theirs."""
        for record in self.store.records():
            if record["status"] not in ("pending", "in_progress"):
                continue
            host, _, pid = str(record.get("owner", "")).rpartition(":")
            if host == socket.gethostname() and (not pid.isdigit() or int(pid) == os.getpid() or not _alive(int(pid))):
                record.update(status="failed", ended_at=time.time(), error=reason, error_status=503)
                self.store.save(record)
                if record.get("folder"):  # the video of a job cut off by a crash
                    shutil.rmtree(record["folder"], ignore_errors=True)

    def close(self) -> None:
        """Cancel every job; those running end as failed ('the server stopped'), not resumable."""
        with self._lock:
            self._closed = True
            running = list(self._running.values())
        for item in running:
            item.job.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            left = list(self._running.values())
        for item in left:  # never started: cancelled in the pool's queue
            shutil.rmtree(item.folder, ignore_errors=True)
        self._mark_cut_off(STOPPED)


class JobFailed(Exception):
    """The job ended in failure; ``status`` is the HTTP status its failure maps to."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _snapshot(running: _Running) -> dict[str, Any]:
    """The running job's record with its progress and captions as of now (call under the lock)."""
    progress = running.job.progress
    running.record["progress"] = {
        "segments_total": progress.total,
        "segments_decoded": progress.decoded,
        "segments_captioned": progress.captioned,
        "generated_tokens": progress.generated_tokens,
        "elapsed_seconds": progress.elapsed if running.started else 0.0,
        "remaining_seconds": progress.remaining,
    }
    running.record["segments"] = [_caption_body(c) for c in progress.captions]
    return running.record


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _caption_body(caption: SegmentCaption) -> dict[str, Any]:
    return {
        "start": caption.segment.start,
        "end": caption.segment.end,
        "caption": caption.caption,
        "error": caption.error,
        "frame_times": list(caption.frame_times),
    }


def _no_reading(segment: Segment) -> media.SampledVideo:
    raise RuntimeError("answering from captions reads no video")
