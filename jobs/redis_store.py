"""Jobs shared by replicas: their records and their segments' work on Redis (redis-py).

:class:`RedisJobStore` keeps what :class:`~jobs.store.JobStore` keeps (one record per job, with
the same JSON, expiring ``ttl_seconds`` after the job ended) plus what replicas share while a job
runs; :class:`SegmentQueue` is the work: one stream entry per segment, read through one consumer
group by every replica. Keys, under ``prefix`` (``llava:``)::

    job:<id>            the record's JSON (jobs.records.JobRecord), as the file store writes it
    job:<id>:spec       what any replica needs to caption a segment (jobs.shared.JobSpec, JSON)
    job:<id>:captions   hash: segment index -> CaptionRecord JSON, each written once (HSETNX)
    job:<id>:progress   hash: started_at, decoded, prompt_tokens, completion_tokens
    jobs:unfinished     set of the ids of jobs not ended (the pending-jobs limit, the reaper)
    segments            stream of segment tasks any replica may take (group "captioners")
    segments:<replica>  stream of the segments only that replica can read (its uploads)
    replica:<replica>   a replica's heartbeat, expiring when it stops renewing it

Why streams and not a task library (Celery, RQ, Dramatiq, arq): a segment must run inside the
worker that holds the model, next to interactive requests, at most ``captions_in_flight`` at a
time; task libraries run tasks in worker processes of their own, and their acknowledgement and
retry rules (visibility timeouts, late acks) would have to be bent to say the same thing as a
consumer group's pending entries and XAUTOCLAIM already do, in a few commands of redis-py.

Every Redis failure to connect or answer in time is raised as
:class:`~jobs.errors.JobStoreUnavailable` (the HTTP side answers 503), within seconds: short
socket timeouts and two quick retries, never the client's default minutes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from jobs.errors import JobStoreUnavailable
from jobs.records import CaptionRecord, JobProgress, JobRecord, JobStatus
from jobs.store import valid_task_id

GROUP = "captioners"
# Seconds to connect and to wait for an answer; XREADGROUP blocks for less than the latter.
CONNECT_TIMEOUT_SECONDS = 2.0
SOCKET_TIMEOUT_SECONDS = 5.0
READ_BLOCK_MILLISECONDS = 1000

# A caption recorded once (HSETNX), its tokens counted once, and the count after it, atomically:
# the replica whose new caption makes the count reach the total is the one that composes. Nothing
# is written for a job whose record is gone (expired, or a Redis restarted without its data).
_RECORD_CAPTION = """
if redis.call('EXISTS', KEYS[3]) == 0 then
  return {0, 0}
end
local new = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
if new == 1 then
  redis.call('HINCRBY', KEYS[2], 'prompt_tokens', ARGV[3])
  redis.call('HINCRBY', KEYS[2], 'completion_tokens', ARGV[4])
end
return {new, redis.call('HLEN', KEYS[1])}
"""


def connect(url: str) -> redis.Redis:
    """A client of the Redis at ``url`` that gives up within seconds when it is unreachable."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.1), retries=2),
        health_check_interval=30,
        decode_responses=True,
    )


@contextlib.contextmanager
def reachable(client: redis.Redis) -> Iterator[None]:
    """Redis not answering becomes JobStoreUnavailable, naming the server and what to do."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as error:
        where = client.connection_pool.connection_kwargs
        server = where.get("path") or f"{where.get('host', 'localhost')}:{where.get('port', 6379)}"
        raise JobStoreUnavailable(
            f"the job store (Redis at {server}) is unavailable: {error}; try again shortly"
        ) from error


@dataclass(frozen=True)
class CaptionCount:
    new: bool  # this call recorded the caption (not a second one of the same segment)
    recorded: int  # captions of the job recorded so far


class RedisJobStore:
    """Job records on Redis, with :class:`~jobs.store.JobStore`'s methods and what replicas share."""

    def __init__(self, client: redis.Redis, ttl_seconds: float, prefix: str = "llava:") -> None:
        self.client = client
        self.ttl_seconds = ttl_seconds
        self.prefix = prefix
        self._record_caption = client.register_script(_RECORD_CAPTION)

    # --- the JobStore interface -----------------------------------------------------------

    def save(self, record: JobRecord) -> None:
        """Write ``record``; an ended one expires with everything of its job after the TTL."""
        with reachable(self.client), self.client.pipeline() as pipe:
            self._write(pipe, record)
            pipe.execute()

    def load(self, task_id: str) -> JobRecord | None:
        """The job's record, with its progress and captions so far while it runs; None when
        there is none (never submitted, expired, damaged)."""
        if not valid_task_id(task_id):
            return None
        with reachable(self.client), self.client.pipeline() as pipe:
            pipe.get(self._key(task_id))
            pipe.hgetall(self._key(task_id, "captions"))
            pipe.hgetall(self._key(task_id, "progress"))
            text, captions, progress = pipe.execute()
        if text is None:
            return None
        try:
            record = JobRecord.from_json(text)
        except ValueError:
            return None
        if not record.status.ended:
            _fill(record, captions, progress)
        return record

    def records(self) -> list[JobRecord]:
        """The records of every unfinished job (ended ones expire by themselves)."""
        with reachable(self.client):
            ids = sorted(self.client.smembers(self._key("unfinished", kind="jobs")))
        return [record for task_id in ids if (record := self.load(task_id)) is not None]

    # --- shared while a job runs ----------------------------------------------------------

    def create(
        self, record: JobRecord, spec_json: str, queue: SegmentQueue, stream: str, tasks: Sequence[dict]
    ) -> None:
        """The job's record, spec and segment tasks in one transaction: all of them or none."""
        with reachable(self.client), self.client.pipeline(transaction=True) as pipe:
            self._write(pipe, record)
            pipe.set(self._key(record.task_id, "spec"), spec_json)
            for fields in tasks:
                pipe.xadd(queue.key(stream), fields)
            pipe.execute()

    def spec(self, task_id: str) -> str | None:
        with reachable(self.client):
            return self.client.get(self._key(task_id, "spec"))

    def start(self, task_id: str) -> None:
        """The job's first segment was taken: ``in_progress``, its clock starts (once)."""
        with reachable(self.client):
            self.client.hsetnx(self._key(task_id, "progress"), "started_at", repr(time.time()))

            def move(pipe: redis.client.Pipeline) -> None:
                record = _parse(pipe.get(self._key(task_id)))
                if record is not None and record.status is JobStatus.PENDING:
                    record.status = JobStatus.IN_PROGRESS
                    pipe.multi()
                    pipe.set(self._key(task_id), record.to_json())

            self.client.transaction(move, self._key(task_id))

    def count_decoded(self, task_id: str) -> None:
        with reachable(self.client):
            self.client.hincrby(self._key(task_id, "progress"), "decoded", 1)

    def record_caption(self, task_id: str, index: int, caption: CaptionRecord, tokens: tuple[int, int]) -> CaptionCount:
        """Record segment ``index``'s caption unless one is already there (a segment taken over
        from a replica that was only slow): atomically, with the count after it."""
        keys = [self._key(task_id, "captions"), self._key(task_id, "progress"), self._key(task_id)]
        with reachable(self.client):
            new, recorded = self._record_caption(keys=keys, args=[index, caption.model_dump_json(), *tokens])
        return CaptionCount(bool(new), int(recorded))

    def captions(self, task_id: str) -> list[CaptionRecord]:
        """The job's captions in segment order."""
        with reachable(self.client):
            found = self.client.hgetall(self._key(task_id, "captions"))
        return [CaptionRecord.model_validate_json(found[key]) for key in sorted(found, key=int)]

    def tokens(self, task_id: str) -> tuple[int, int]:
        """Prompt and completion tokens of the job's captions so far."""
        with reachable(self.client):
            progress = self.client.hgetall(self._key(task_id, "progress"))
        return int(progress.get("prompt_tokens", 0)), int(progress.get("completion_tokens", 0))

    def end(self, task_id: str, status: JobStatus, error: BaseException | None = None, result=None) -> JobRecord | None:
        """End the job with ``status`` unless it has already ended (a cancel and the last caption
        racing: whichever comes first wins); returns the ended record, or None if it had ended."""
        ended: list[JobRecord] = []

        def finish(pipe: redis.client.Pipeline) -> None:
            ended.clear()
            record = _parse(pipe.get(self._key(task_id)))
            if record is None or record.status.ended:
                return
            _fill(record, pipe.hgetall(self._key(task_id, "captions")), pipe.hgetall(self._key(task_id, "progress")))
            record.result = result
            record.end(status, error)
            pipe.multi()
            self._write(pipe, record)
            ended.append(record)

        with reachable(self.client):
            self.client.transaction(finish, self._key(task_id))
        return ended[0] if ended else None

    def waiting(self) -> int:
        """Jobs of every replica that no replica has started yet."""
        return sum(record.status is JobStatus.PENDING for record in self.records())

    def heartbeat(self, replica: str, ttl_seconds: float) -> None:
        with reachable(self.client):
            self.client.set(self._key(replica, kind="replica"), "1", px=max(1, int(ttl_seconds * 1000)))

    def alive(self, replica: str) -> bool:
        with reachable(self.client):
            return bool(self.client.exists(self._key(replica, kind="replica")))

    def ping(self) -> None:
        with reachable(self.client):
            self.client.ping()

    # --- keys -----------------------------------------------------------------------------

    def _write(self, pipe: redis.client.Pipeline, record: JobRecord) -> None:
        task_id = record.task_id
        if not valid_task_id(task_id):
            raise ValueError(f"not a task id: {task_id!r}")
        pipe.set(self._key(task_id), record.to_json())
        keys = [self._key(task_id, part) for part in ("spec", "captions", "progress")]
        if record.status.ended:
            ttl = max(1, int(self.ttl_seconds * 1000))
            for key in [self._key(task_id), *keys]:
                pipe.pexpire(key, ttl)
            pipe.srem(self._key("unfinished", kind="jobs"), task_id)
        else:
            pipe.sadd(self._key("unfinished", kind="jobs"), task_id)

    def _key(self, name: str, part: str | None = None, kind: str = "job") -> str:
        return f"{self.prefix}{kind}:{name}" + (f":{part}" if part else "")


class SegmentQueue:
    """The segments' work: streams read through one consumer group by every replica.

    An entry is taken by one replica (XREADGROUP), stays pending while it is captioned, and is
    acknowledged and deleted once its caption is recorded: the stream's length is the work left.
    A replica renews its claims while it works (XCLAIM ... JUSTID); one that stopped leaves them
    idle, and after ``claim_timeout_s`` another replica takes them over (XAUTOCLAIM)."""

    def __init__(self, client: redis.Redis, prefix: str = "llava:") -> None:
        self.client = client
        self.prefix = prefix

    def key(self, stream: str) -> str:
        return f"{self.prefix}{stream}"

    def ensure(self, streams: Sequence[str]) -> None:
        """The consumer group on each stream (made with the stream; again after Redis lost it)."""
        with reachable(self.client):
            for stream in streams:
                try:
                    self.client.xgroup_create(self.key(stream), GROUP, id="0", mkstream=True)
                except redis.ResponseError as error:
                    if "BUSYGROUP" not in str(error):
                        raise

    def take(self, consumer: str, streams: Sequence[str], claim_idle_s: float) -> tuple[str, str, dict, bool] | None:
        """One entry for ``consumer``: first one idle for ``claim_idle_s`` on any stream (its
        replica stopped), else a new one from the first stream that has one, waiting up to a
        second on the last; (stream, id, fields, taken over) or None.

        One stream at a time: a read of several with COUNT 1 answers up to one entry *each*,
        and an entry taken but not worked on would wait for the claim timeout."""
        with reachable(self.client), self._regrouped(streams):
            for stream in streams:
                _, claimed, *_ = self.client.xautoclaim(
                    self.key(stream), GROUP, consumer, int(claim_idle_s * 1000), start_id="0-0", count=1
                )
                if claimed:
                    entry_id, fields = claimed[0]
                    return stream, entry_id, fields, True
            for position, stream in enumerate(streams):
                block = READ_BLOCK_MILLISECONDS if position == len(streams) - 1 else None
                read = self.client.xreadgroup(GROUP, consumer, {self.key(stream): ">"}, count=1, block=block)
                for _, entries in read or ():
                    for entry_id, fields in entries:
                        return stream, entry_id, fields, False
        return None

    def renew(self, consumer: str, held: Sequence[tuple[str, str]]) -> None:
        """Reset the idle time of the entries ``consumer`` is working on, so none is taken over."""
        with reachable(self.client), self.client.pipeline() as pipe:
            for stream, entry_id in held:
                pipe.xclaim(self.key(stream), GROUP, consumer, 0, [entry_id], justid=True)
            pipe.execute()

    def release(self, consumer: str, stream: str, entry_id: str) -> None:
        """Give an entry up (shutting down): marked idle for long, the next XAUTOCLAIM takes it."""
        with reachable(self.client):
            self.client.xclaim(self.key(stream), GROUP, consumer, 0, [entry_id], idle=10**9, justid=True)

    def done(self, stream: str, entry_id: str) -> None:
        """Acknowledge the entry and delete it: its caption is recorded (or its job ended)."""
        with reachable(self.client), self.client.pipeline() as pipe:
            pipe.xack(self.key(stream), GROUP, entry_id)
            pipe.xdel(self.key(stream), entry_id)
            pipe.execute()

    def drop(self, stream: str) -> None:
        """Delete a stream nobody will read again (the private stream of a replica that stopped)."""
        with reachable(self.client):
            self.client.delete(self.key(stream))

    @contextlib.contextmanager
    def _regrouped(self, streams: Sequence[str]) -> Iterator[None]:
        try:
            yield
        except redis.ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            self.ensure(streams)  # Redis restarted without its data: the next call reads again


def _parse(text: str | None) -> JobRecord | None:
    if text is None:
        return None
    try:
        return JobRecord.from_json(text)
    except ValueError:
        return None


def _fill(record: JobRecord, captions: dict[str, str], progress: dict[str, str]) -> None:
    """The running job's progress and captions so far, from what the replicas recorded."""
    done = [CaptionRecord.model_validate_json(captions[key]) for key in sorted(captions, key=int)]
    total = record.video_info.segment_count
    started = progress.get("started_at")
    elapsed = time.time() - float(started) if started else 0.0
    record.segments = done
    record.progress = JobProgress(
        segments_total=total,
        segments_decoded=min(total, int(progress.get("decoded", 0))),
        segments_captioned=len(done),
        generated_tokens=int(progress.get("completion_tokens", 0)),
        elapsed_seconds=elapsed,
        remaining_seconds=elapsed / len(done) * (total - len(done)) if done else None,
    )
