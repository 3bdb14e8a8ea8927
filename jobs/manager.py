"""Long-video jobs of one worker: submit, run in the background, report progress, cancel, ask.

A submitted video is checked before the job is accepted (its length against the limit, the
segment plan against its limits), so those mistakes get an answer at once. Jobs then run
``max_running`` at a time in background threads, the others wait in order, at most
``max_pending``. Each job's captions go through the engine as :mod:`jobs.pipeline` says, at most
``captions_in_flight`` at a time, so interactive requests keep their place in the engine's queue.
The job's video lives in a folder of its own, deleted when the job ends; its record (status, then
the result or the failure) lives in the :class:`~jobs.store.JobStore`, where it survives a
restart until it expires. A job cut off by a restart or a shutdown is recorded as failed.
A failed job's record keeps its error's kind and message (:mod:`jobs.errors`), never an HTTP status.
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
from jobs.errors import (
    InternalJobError,
    JobFailed,
    JobInterrupted,
    JobNotFinished,
    JobRunsElsewhere,
    SegmentPlanError,
    TooManyJobs,
    UnknownJob,
)
from jobs.limits import DEFAULT_FRAMES_PER_SEGMENT, DEFAULT_SEGMENT_SECONDS, JobLimits
from jobs.pipeline import DEFAULT_CAPTION_PROMPT, DEFAULT_QUESTION, CaptionAnswerer, LongVideoJob, SegmentCaption
from jobs.records import CaptionRecord, JobProgress, JobRecord, JobResult, JobStatus, TokenUsage, VideoInfo
from jobs.segments import Segment, plan_segments
from jobs.store import JobStore
from llava_custom.engine import Engine, GenerationSettings
from llava_custom.errors import RequestCancelled
from media.workdirs import process_running

logger = logging.getLogger("llava_video_service")


STOPPED = "the server stopped while this job ran; submit it again"
RESTARTED = "the server restarted while this job ran; submit it again"
# Unfinished jobs: those a restart or a shutdown cuts off.
UNFINISHED = (JobStatus.PENDING, JobStatus.IN_PROGRESS)


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
    record: JobRecord
    started: bool = False


class JobManager:
    """The jobs of one worker process; every method may be called from any thread."""

    def __init__(
        self,
        engine: Engine,
        decoder: media.DecodePool,
        store: JobStore,
        limits: JobLimits,
        reading: media.VideoReading | None = None,
    ) -> None:
        self.engine = engine
        self.decoder = decoder
        self.store = store
        self.limits = limits
        self.reading = reading or media.VideoReading()  # the server's, as for a request's frames
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(limits.max_running, thread_name_prefix="llava-job")
        self._closed = False
        self._mark_cut_off(RESTARTED)

    # --- submitting ------------------------------------------------------------------------

    def submit(
        self, source: Path, folder: Path, parameters: JobParameters, video_url: str | None = None
    ) -> dict[str, Any]:
        """Check the video at ``source`` and queue its job; the job owns ``folder`` (with
        ``source`` in it) from here on and deletes it when it ends. Blocking (probes the file).
        ``video_url``, where the video came from, matters only to replicas sharing jobs.

        Raises MediaError subclasses for unreadable or too long videos, SegmentPlanError for a
        plan outside the video or over the segment or frame limits, TooManyJobs when the queue is
        full."""
        duration, segments = self._plan(source, parameters)
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
        record = JobRecord(
            task_id=task_id,
            owner=f"{socket.gethostname()}:{os.getpid()}",
            folder=str(folder),
            status=JobStatus.PENDING,
            created_at=time.time(),
            video_info=_video_info(duration, segments, parameters),
        )
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

    def _plan(self, source: Path, parameters: JobParameters) -> tuple[float, list[Segment]]:
        """The video's length and its segments, checked against the limits (see submit)."""
        if parameters.frames_per_segment > self.limits.max_frames:
            raise SegmentPlanError(f"frames_per_segment may be at most {self.limits.max_frames}")
        duration = self.decoder.run(media.video_duration, source, max_pixels=self.reading.max_pixels)
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
        return duration, segments

    # --- reading ---------------------------------------------------------------------------

    def status(self, task_id: str) -> dict[str, Any]:
        """The job's status, progress and the captions done so far (all of them once it ended);
        for a job another process runs (a replica sharing the folder), as of its last caption."""
        with self._lock:
            running = self._running.get(task_id)
            if running is not None:
                return _snapshot(running).status_body()
        return self._record(task_id).status_body()

    def result(self, task_id: str) -> dict[str, Any]:
        """The finished job's result body; raises UnknownJob, JobNotFinished or JobFailed."""
        return self._result(task_id).model_dump(mode="json")

    def _result(self, task_id: str) -> JobResult:
        record = self._record(task_id)
        if record.status is JobStatus.COMPLETED and record.result is not None:
            return record.result
        if record.status is JobStatus.CANCELED:
            raise JobNotFinished(f"job {task_id} was cancelled; it has no result")
        if record.status in UNFINISHED:
            raise JobNotFinished(
                f"job {task_id} has not finished; GET /jobs/status?task_id={task_id} shows its progress"
            )
        raise JobFailed(record.error or "the job failed", record.error_kind or InternalJobError.__name__)

    def cancel(self, task_id: str) -> dict[str, Any]:
        """Stop the job (a waiting one never starts; a running one within a segment); an ended
        job stays as it ended. Raises JobRunsElsewhere for a job another process runs on the same
        folder: only replicas sharing jobs through Redis pass a cancel on (jobs.shared)."""
        with self._lock:
            running = self._running.get(task_id)
            if running is not None:
                running.record.status = JobStatus.CANCELED  # at once; the thread ends within a segment
        if running is not None:
            running.job.cancel()
            return {"task_id": task_id, "status": JobStatus.CANCELED.value}
        record = self._record(task_id)
        if record.status not in UNFINISHED:
            return {"task_id": task_id, "status": record.status.value}
        raise JobRunsElsewhere(
            f"job {task_id} runs in another process ({record.owner}); cancel it there, or let replicas "
            "share jobs through Redis (LLAVA_REDIS_URL)"
        )

    def ask(self, task_id: str, question: str, generation: GenerationSettings) -> tuple[str, tuple[int, int]]:
        """``question`` answered from the finished job's captions (text only, no second look at
        the video); returns the answer and its (prompt, completion) tokens. Blocking."""
        captions = [_segment_caption(index, item) for index, item in enumerate(self._result(task_id).segments)]
        answerer = CaptionAnswerer(self.engine, generation)
        answer = answerer.answer(captions, question)
        return answer, answerer.usage

    # --- running ---------------------------------------------------------------------------

    def _run(self, running: _Running) -> None:
        record, job = running.record, running.job
        with self._lock:
            running.started = True
            job.progress.started = time.monotonic()
            if record.status is JobStatus.PENDING:  # not when cancelled while waiting: run() then stops at once
                record.status = JobStatus.IN_PROGRESS
        try:
            result = job.run()
        except Exception as error:
            status, failure = job_ending(error, closed=self._closed)
            if isinstance(failure, InternalJobError):
                logger.exception("job %s failed", running.task_id)
            self._end(running, status, failure)
        else:
            record.result = JobResult(
                answer=result.answer,
                segments=[_caption_record(c) for c in result.captions],
                video_info=record.video_info,
                usage=TokenUsage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
            )
            self._end(running, JobStatus.COMPLETED)
        finally:
            shutil.rmtree(running.folder, ignore_errors=True)

    def _progressed(self, task_id: str) -> None:
        """After each caption: the progress goes to the store (other processes read it there)."""
        with self._lock:
            running = self._running.get(task_id)
            if running is None:
                return
            self.store.save(_snapshot(running))

    def _end(self, running: _Running, status: JobStatus, error: Exception | None = None) -> None:
        with self._lock:
            record = _snapshot(running)
            record.end(status, error)
            self.store.save(record)
            self._running.pop(running.task_id, None)
        logger.info("job %s %s after %.1f s", running.task_id, status.value, record.progress.elapsed_seconds)

    def _read_segment(self, source: Path, frames: int, segment: Segment, last_end: float) -> media.SampledVideo:
        # A segment is [start, end): a frame right at its end opens the next segment (with no
        # overlap, it would otherwise be seen twice), except at the end of the analysed span.
        end = segment.end if segment.end >= last_end else math.nextafter(segment.end, 0.0)
        return self.decoder.read_video(source, frames, start_time=segment.start, end_time=end, **self.reading.options())

    def _record(self, task_id: str) -> JobRecord:
        record = self.store.load(task_id)
        if record is None:
            raise UnknownJob(f"no job {task_id} (never submitted here, or its result expired)")
        return record

    def _mark_cut_off(self, reason: str) -> None:
        """Record as failed the unfinished jobs of this process, or of a process on this host
        that is gone (this worker before a restart); other replicas' jobs are theirs."""
        for record in self.store.records():
            if record.status not in UNFINISHED:
                continue
            host, _, pid = record.owner.rpartition(":")
            if host == socket.gethostname() and (
                not pid.isdigit() or int(pid) == os.getpid() or not process_running(int(pid))
            ):
                record.end(JobStatus.FAILED, JobInterrupted(reason))
                self.store.save(record)
                if record.folder:  # the video of a job cut off by a crash
                    shutil.rmtree(record.folder, ignore_errors=True)

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


def job_ending(error: Exception, *, closed: bool) -> tuple[JobStatus, Exception | None]:
    """How a job whose run raised ``error`` ends: its status, and the error its record keeps (as
    its kind and message), if any."""
    if closed:  # cancelled, or its decoder or engine closed under it
        return JobStatus.FAILED, JobInterrupted(STOPPED)
    if isinstance(error, RequestCancelled):
        return JobStatus.CANCELED, None
    if isinstance(error, media.MediaError):  # its own kind: answered as the same error outside a job
        return JobStatus.FAILED, error
    # A bug or a device failure (the caller logs it); the record says where to look.
    message = f"internal error while running the job ({type(error).__name__}); see the server log"
    return JobStatus.FAILED, InternalJobError(message)


def _video_info(duration: float, segments: list[Segment], parameters: JobParameters) -> VideoInfo:
    return VideoInfo(
        video_duration=duration,
        start_time=segments[0].start,
        end_time=segments[-1].end,
        segment_count=len(segments),
        frames_per_segment=parameters.frames_per_segment,
    )


def _snapshot(running: _Running) -> JobRecord:
    """The running job's record with its progress and captions as of now (call under the lock)."""
    progress = running.job.progress
    running.record.progress = JobProgress(
        segments_total=progress.total,
        segments_decoded=progress.decoded,
        segments_captioned=progress.captioned,
        generated_tokens=progress.generated_tokens,
        elapsed_seconds=progress.elapsed if running.started else 0.0,
        remaining_seconds=progress.remaining,
    )
    running.record.segments = [_caption_record(c) for c in progress.captions]
    return running.record


def _caption_record(caption: SegmentCaption) -> CaptionRecord:
    return CaptionRecord(
        start=caption.segment.start,
        end=caption.segment.end,
        caption=caption.caption,
        error=caption.error,
        frame_times=list(caption.frame_times),
    )


def _segment_caption(index: int, item: CaptionRecord) -> SegmentCaption:
    """A recorded caption as the pipeline's, for questions asked after the job."""
    return SegmentCaption(Segment(index, item.start, item.end), item.caption, item.error, tuple(item.frame_times))
