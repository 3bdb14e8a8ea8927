"""Long-video jobs shared by replicas through Redis (LLAVA_REDIS_URL): any replica answers for
any job, captions the segments of any job when it has room, and takes over the segments of a
replica that stopped.

A submitted job becomes its record, its spec (:class:`JobSpec`: where the video is, the
prompts, the decoding settings) and one stream entry per segment, in one transaction
(:mod:`jobs.redis_store`). Every replica runs ``captions_in_flight`` caption threads; each takes
one entry at a time (one idle past the claim timeout first, else a new one), decodes the
segment, captions it in its engine behind every interactive request (``background``), records
the caption once (HSETNX), then acknowledges the entry. The replica whose caption is the job's
last one composes the answer, before it acknowledges that entry: if it dies while composing,
the entry is taken over and the replica taking it composes instead. A keeper thread renews the
replica's heartbeat and its claims, stops local work of jobs that ended (a cancel on any
replica reaches every other within a tick, far less than a segment), deletes the videos of
ended jobs, and fails the jobs whose upload only a stopped replica could read.

Where each replica finds the video (:attr:`JobSpec.video`):

- ``url``: the replica that accepted the job downloaded it; each other replica downloads its
  own copy once, the first time it takes one of the job's segments, and refuses a copy whose
  bytes differ from the original's (SHA-256) so that all captions see one video;
- ``shared``: an upload, kept in ``LLAVA_JOB_DIR/videos/<task_id>/`` when LLAVA_JOB_DIR_SHARED
  says that folder is on storage every replica sees;
- ``local``: an upload on a replica of its own: its segments go to that replica's private stream
  (``segments:<replica>``), which no other replica reads; if that replica stops, the job fails
  ("submit it again"), as a job on one machine does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

import media
from jobs.errors import InternalJobError, JobInterrupted, JobStoreUnavailable, TooManyJobs
from jobs.limits import JobLimits, SharedJobSettings
from jobs.manager import JobManager, JobParameters, _segment_caption, _video_info, job_ending
from jobs.pipeline import DEFAULT_CAPTION_PROMPT, DEFAULT_QUESTION, CaptionAnswerer, submit_caption
from jobs.records import CaptionRecord, JobRecord, JobResult, JobStatus, TokenUsage
from jobs.redis_store import RedisJobStore, SegmentQueue
from jobs.segments import Segment
from jobs.store import valid_task_id
from llava_custom.engine import Engine, GenerationSettings, TokenStream
from llava_custom.errors import RequestCancelled
from media import workdirs

logger = logging.getLogger("llava_video_service")

COMMON_STREAM = "segments"
HOLDER_STOPPED = (
    "the replica holding this job's uploaded video stopped; submit it again (or put LLAVA_JOB_DIR on storage "
    "every replica sees and set LLAVA_JOB_DIR_SHARED=true)"
)
# Seconds between two warnings that Redis is unavailable (each caption thread and the keeper).
WARN_EVERY_SECONDS = 10.0


class JobSpec(BaseModel):
    """What any replica needs to caption one of the job's segments and to compose its answer."""

    video: Literal["url", "shared", "local"]
    path: str  # the video on its holder (url, local) or on the shared folder
    holder: str  # the replica that accepted the job
    url: str | None = None
    size: int = 0
    sha256: str | None = None  # of a URL's bytes when submitted: other replicas' copies must match
    frames_per_segment: int
    last_end: float  # the end of the analysed span
    caption_prompt: str
    question: str
    generation: dict[str, Any]

    def settings(self) -> GenerationSettings:
        """The job's decoding settings; captions and the answer wait behind interactive requests."""
        fields = dict(self.generation)
        for name in ("stop_token_ids", "stop"):
            fields[name] = tuple(fields.get(name, ()))
        return dataclasses.replace(GenerationSettings(**fields), background=True)


@dataclass
class _Work:
    """A stream entry this replica is working on: renewed by the keeper, stoppable."""

    stream: str
    entry_id: str
    task_id: str
    cancelled: threading.Event = field(default_factory=threading.Event)
    streams: list[TokenStream] = field(default_factory=list)
    answerer: CaptionAnswerer | None = None

    def cancel(self) -> None:
        self.cancelled.set()
        for stream in list(self.streams):
            stream.cancel()
        if self.answerer is not None:
            self.answerer.cancel()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise RequestCancelled("the job was cancelled")


class SharedJobManager(JobManager):
    """The jobs of every replica on one Redis, as seen and worked on by this one."""

    def __init__(
        self,
        engine: Engine,
        decoder: media.DecodePool,
        store: RedisJobStore,
        limits: JobLimits,
        reading: media.VideoReading | None = None,
        *,
        queue: SegmentQueue,
        shared: SharedJobSettings,
        job_dir: Path,
        fetch: Callable[[str, Path], Path],
    ) -> None:
        super().__init__(engine, decoder, store, limits, reading)  # type: ignore[arg-type]
        self.store: RedisJobStore = store
        self.queue = queue
        self.shared = shared
        self.fetch = fetch  # (url, folder) -> the downloaded file, with the service's fetch limits
        # host:pid names the process in logs; the suffix keeps a restarted one (same pid in a
        # container) from inheriting its predecessor's claims.
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.videos = Path(job_dir).expanduser() / "videos" if shared.shared_dir else None
        # Its own stream first (only this replica can caption those), then everyone's.
        self._streams = [f"{COMMON_STREAM}:{self.replica}", COMMON_STREAM]
        self._work: dict[str, _Work] = {}  # entry id -> what this replica is working on
        self._folders: dict[str, Path] = {}  # task id -> this replica's folder of its video
        self._copies: dict[str, Path] = {}  # task id -> this replica's download of a URL job's video
        self._copy_locks: dict[str, threading.Lock] = {}
        self._stop = threading.Event()
        self._warned = 0.0
        try:
            self.store.heartbeat(self.replica, self.shared.claim_timeout_s)
            self.queue.ensure(self._streams)
        except JobStoreUnavailable as error:  # the threads keep trying; submissions answer 503
            self._unavailable(error)
        self._threads = [
            threading.Thread(target=self._caption_segments, name=f"llava-segments-{i}", daemon=True)
            for i in range(limits.captions_in_flight)
        ]
        self._threads.append(threading.Thread(target=self._keep, name="llava-jobs-keeper", daemon=True))
        for thread in self._threads:
            thread.start()
        logger.info("jobs shared through Redis as replica %s", self.replica)

    # --- the routes' side -------------------------------------------------------------------

    def submit(
        self, source: Path, folder: Path, parameters: JobParameters, video_url: str | None = None
    ) -> dict[str, Any]:
        """As JobManager.submit; the job's segments go to the stream every replica reads (a URL,
        or an upload on shared storage) or to this replica's own (an upload only it has).
        Raises JobStoreUnavailable when Redis does not answer: then no job exists."""
        duration, segments = self._plan(source, parameters)
        waiting = self.store.waiting()
        if waiting >= self.limits.max_pending:
            raise TooManyJobs(f"{waiting} jobs are already waiting to run; submit again when one has started")
        task_id = uuid.uuid4().hex
        kind = "url" if video_url else "shared" if self.videos is not None else "local"
        path = source
        if kind == "shared":
            assert self.videos is not None
            target = self.videos / task_id
            target.mkdir(parents=True)
            path = Path(shutil.move(source, target / source.name))
            shutil.rmtree(folder, ignore_errors=True)
            folder = target
        spec = JobSpec(
            video=kind,
            path=str(path),
            holder=self.replica,
            url=video_url,
            size=path.stat().st_size,
            sha256=_sha256(path) if kind == "url" else None,
            frames_per_segment=parameters.frames_per_segment,
            last_end=segments[-1].end,
            caption_prompt=parameters.caption_prompt or DEFAULT_CAPTION_PROMPT,
            question=parameters.question or DEFAULT_QUESTION,
            generation=dataclasses.asdict(parameters.generation),
        )
        record = JobRecord(
            task_id=task_id,
            owner=self.replica,
            folder=str(folder),
            status=JobStatus.PENDING,
            created_at=time.time(),
            video_info=_video_info(duration, segments, parameters),
        )
        tasks = [{"task_id": task_id, "index": s.index, "start": repr(s.start), "end": repr(s.end)} for s in segments]
        stream = self._streams[0] if kind == "local" else COMMON_STREAM
        try:
            self.store.create(record, spec.model_dump_json(), self.queue, stream, tasks)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if kind != "shared":
            self._folders[task_id] = folder
            if kind == "url":
                self._copies[task_id] = path
        logger.info("job %s: %d segments over %.0f s of video (%s video)", task_id, len(segments), duration, kind)
        return self.status(task_id)

    def cancel(self, task_id: str) -> dict[str, Any]:
        """The job ends as cancelled at once, for every replica: each stops its work on it within
        a keeper tick and takes none of its segments after that; an ended job stays as it ended."""
        record = self._record(task_id)
        if not record.status.ended:
            ended = self.store.end(task_id, JobStatus.CANCELED)
            record = ended or self._record(task_id)
        self._stop_work_of(task_id)
        return {"task_id": task_id, "status": record.status.value}

    def close(self) -> None:
        """Stop taking segments; give back those in progress, so that another replica takes them
        over at once; this replica's own uploads (no other can read them) fail their jobs."""
        self._stop.set()
        for work in list(self._work.values()):
            work.cancel()
        for thread in self._threads:
            thread.join(timeout=30)
        try:
            self.store.client.delete(f"{self.store.prefix}replica:{self.replica}")  # reaped at once
        except Exception as error:  # Redis down: the heartbeat expires by itself
            logger.warning("could not clear this replica's heartbeat: %s", error)
        for folder in self._folders.values():
            shutil.rmtree(folder, ignore_errors=True)
        super().close()

    def _mark_cut_off(self, reason: str) -> None:
        """Nothing to do at start or stop: a stopped replica's segments are taken over by the
        others (claim timeout), and the keeper fails the jobs that only it could read."""

    # --- captioning ---------------------------------------------------------------------------

    def _caption_segments(self) -> None:
        """One caption thread: segment after segment, of any job, until the manager closes."""
        while not self._stop.is_set():
            try:
                taken = self.queue.take(self.replica, self._streams, self.shared.claim_timeout_s)
                if taken is not None:
                    self._segment(*taken)
            except JobStoreUnavailable as error:
                # The entry being worked on stays pending: taken over after the claim timeout.
                self._unavailable(error)
                self._stop.wait(1.0)
            except Exception:
                logger.exception("taking a job's segment failed")
                self._stop.wait(1.0)

    def _segment(self, stream: str, entry_id: str, fields: dict[str, str], taken_over: bool) -> None:
        task_id = fields.get("task_id", "")
        spec_json = self.store.spec(task_id) if valid_task_id(task_id) else None
        record = self.store.load(task_id) if spec_json else None
        if spec_json is None or record is None or record.status.ended:
            self.queue.done(stream, entry_id)  # cancelled, failed or expired: nothing to do
            return
        spec = JobSpec.model_validate_json(spec_json)
        segment = Segment(int(fields["index"]), float(fields["start"]), float(fields["end"]))
        work = self._work[entry_id] = _Work(stream, entry_id, task_id)
        try:
            self.store.start(task_id)
            caption, tokens = self._caption(spec, segment, work)
            count = self.store.record_caption(task_id, segment.index, caption, tokens)
            logger.info(
                "job %s: segment %d captioned by %s%s (%d of %d)",
                task_id,
                segment.index,
                self.replica,
                "" if count.new else ", already recorded",
                count.recorded,
                record.video_info.segment_count,
            )
            # The last caption's replica composes; one taking over a composer that died, too.
            if count.recorded >= record.video_info.segment_count and (count.new or taken_over):
                self._compose(task_id, spec, work)
        except RequestCancelled:
            if self._stop.is_set():  # shutting down: another replica takes it over at once
                self.queue.release(self.replica, stream, entry_id)
                return
        except JobStoreUnavailable:
            raise
        except Exception as error:
            if self._stop.is_set():
                self.queue.release(self.replica, stream, entry_id)
                return
            status, failure = job_ending(error, closed=False)
            if isinstance(failure, InternalJobError):
                logger.exception("job %s failed", task_id)
            self.store.end(task_id, status, failure)
        finally:
            self._work.pop(entry_id, None)
        self.queue.done(stream, entry_id)

    def _caption(self, spec: JobSpec, segment: Segment, work: _Work) -> tuple[CaptionRecord, tuple[int, int]]:
        """The segment's caption (or why it could not be decoded) and its tokens."""
        try:
            path = self._video(work.task_id, spec)
            sampled = self._read_segment(path, spec.frames_per_segment, segment, spec.last_end)
        except media.MediaError as error:
            failed = CaptionRecord(
                start=segment.start, end=segment.end, caption=None, error=str(error), captioned_by=self.replica
            )
            return failed, (0, 0)
        self.store.count_decoded(work.task_id)
        stream = submit_caption(self.engine, segment, sampled, spec.caption_prompt, spec.settings(), work.check)
        work.streams.append(stream)
        answer = stream.result()  # raises RequestCancelled when the job is cancelled
        caption = CaptionRecord(
            start=segment.start,
            end=segment.end,
            caption=answer.text,
            frame_times=list(sampled.info.frame_times),
            captioned_by=self.replica,
        )
        return caption, (answer.prompt_tokens, answer.completion_tokens)

    def _compose(self, task_id: str, spec: JobSpec, work: _Work) -> None:
        record = self.store.load(task_id)
        if record is None or record.status.ended:
            return
        captions = self.store.captions(task_id)
        work.answerer = CaptionAnswerer(self.engine, spec.settings())
        work.check()
        answer = work.answerer.answer([_segment_caption(i, c) for i, c in enumerate(captions)], spec.question)
        prompt_tokens, completion_tokens = self.store.tokens(task_id)
        answer_prompt, answer_completion = work.answerer.usage
        result = JobResult(
            answer=answer,
            segments=captions,
            video_info=record.video_info,
            usage=TokenUsage(
                prompt_tokens=prompt_tokens + answer_prompt, completion_tokens=completion_tokens + answer_completion
            ),
        )
        if self.store.end(task_id, JobStatus.COMPLETED, result=result) is not None:
            logger.info("job %s completed; answer composed by %s", task_id, self.replica)

    def _video(self, task_id: str, spec: JobSpec) -> Path:
        """Where this replica reads the job's video: the holder's file or the shared one, or its
        own copy of a URL's video, downloaded once per job."""
        if spec.video != "url" or spec.holder == self.replica:
            return Path(spec.path)
        lock = self._copy_locks.setdefault(task_id, threading.Lock())
        with lock:
            if (copy := self._copies.get(task_id)) is not None:
                return copy
            assert spec.url is not None
            folder = workdirs.job_folder()
            try:
                path = self.fetch(spec.url, folder)
                if path.stat().st_size != spec.size or _sha256(path) != spec.sha256:
                    raise media.InvalidSource(
                        "the video at video_url is not the one the job was submitted with (its bytes changed)"
                    )
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            self._folders[task_id], self._copies[task_id] = folder, path
            return path

    # --- keeping ------------------------------------------------------------------------------

    def _keep(self) -> None:
        """Heartbeat, claims renewed, work and videos of ended jobs dropped, stopped holders' jobs failed."""
        tick = max(0.1, self.shared.claim_timeout_s / 4)
        while not self._stop.wait(tick):
            try:
                self.store.heartbeat(self.replica, self.shared.claim_timeout_s)
                held = [(work.stream, work.entry_id) for work in list(self._work.values())]
                if held:
                    self.queue.renew(self.replica, held)
                self._drop_ended()
                self._reap()
            except JobStoreUnavailable as error:
                self._unavailable(error)
            except Exception:
                logger.exception("keeping the shared jobs failed")

    def _drop_ended(self) -> None:
        tasks = {work.task_id for work in list(self._work.values())} | set(self._folders)
        if self.videos is not None and self.videos.is_dir():
            tasks |= {path.name for path in self.videos.iterdir() if valid_task_id(path.name)}
        for task_id in tasks:
            record = self.store.load(task_id)
            if record is not None and not record.status.ended:
                continue
            self._stop_work_of(task_id)
            folder = self._folders.pop(task_id, None)
            self._copies.pop(task_id, None)
            self._copy_locks.pop(task_id, None)
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            if self.videos is not None:
                shutil.rmtree(self.videos / task_id, ignore_errors=True)

    def _reap(self) -> None:
        """Fail the jobs whose upload only a stopped replica had (no heartbeat for a claim timeout)."""
        for record in self.store.records():
            spec_json = self.store.spec(record.task_id)
            if spec_json is None:
                continue
            spec = JobSpec.model_validate_json(spec_json)
            if spec.video != "local" or spec.holder == self.replica or self.store.alive(spec.holder):
                continue
            if self.store.end(record.task_id, JobStatus.FAILED, JobInterrupted(HOLDER_STOPPED)) is not None:
                logger.warning("job %s failed: its replica %s stopped", record.task_id, spec.holder)
            self.queue.drop(f"{COMMON_STREAM}:{spec.holder}")

    def _stop_work_of(self, task_id: str) -> None:
        for work in list(self._work.values()):
            if work.task_id == task_id:
                work.cancel()

    def _unavailable(self, error: JobStoreUnavailable) -> None:
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY_SECONDS:
            self._warned = now
            logger.warning("%s", error)


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
