"""Starting the service: checks before serving, the model loaded in the background, and start-up
failures that end the whole server instead of looping.

How ``bentoml serve`` starts (BentoML 1.4, ``_bentoml_impl/server/serving.py``): its main process
imports service.py, runs the service's ``@bentoml.on_deployment`` hooks once, then starts a circus
arbiter that spawns the worker processes (``_bentoml_impl/worker/service.py``). Each worker imports
service.py again and builds the service object inside uvicorn's lifespan start-up, before uvicorn
accepts any connection; a worker that exits is spawned again by circus, forever (outside
containers). Hence:

- :func:`check_before_serving` runs in the main process, before any worker exists: the settings
  are read and validated, the checkpoint found and read (local directory with its weights, or a hub
  id in the Hugging Face cache or downloadable), the packages and GPU the settings ask for checked,
  and the KV cache budget checked against the largest request allowed. A failure prints one line
  naming the setting and what to change, and the process exits with :data:`EXIT_INVALID_CONFIG`.
- In a worker, :class:`ModelStartup` loads the model and runs one warm-up generation in a thread,
  so that the service object is built at once: /livez answers while the model loads, /readyz says
  503 until it is ready.
- A load that still fails in a worker (out of GPU memory, damaged weights) is logged as one line
  and reported to the main process with SIGUSR1 (:func:`report_worker_failure`). There,
  :func:`stop_server_when_a_worker_fails` has armed a handler that stops the server as SIGTERM does
  (circus stops every worker, the socket closes) and makes the process exit with
  :data:`EXIT_MODEL_LOAD_FAILED`. Circus offers no hook on a worker's exit status, and restarting a
  worker whose model cannot load only repeats the failure.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import NoReturn

from pydantic import ValidationError

import media
import settings
from http_api import request_log
from http_api.analysis import Analyzer
from http_api.guard import install_dropped_client_filter
from http_api.lifecycle import Lifecycle
from http_api.metrics import process_metrics
from jobs.limits import SharedJobSettings
from jobs.manager import JobManager
from jobs.redis_store import RedisJobStore, SegmentQueue, connect
from jobs.shared import SharedJobManager
from jobs.store import JobStore
from llava_custom.builder import check_requirements, describe, gpu_memory, load_pretrained_model
from llava_custom.checkpoint import read_checkpoint
from llava_custom.engine import Engine, ReuseCache, check_capacity
from llava_custom.errors import ModelLoadError
from llava_custom.modeling import VideoLayout
from media import workdirs

logger = logging.getLogger("llava_video_service")

# Exit statuses of `bentoml serve` when the service cannot start (uvicorn uses 3 for a failed
# start-up too; 2 is the usual status for a usage or configuration error).
EXIT_INVALID_CONFIG = 2
EXIT_MODEL_LOAD_FAILED = 3
# Set in the main process for its workers: the process a failing worker reports to.
_SERVER_PID_VARIABLE = "_LLAVA_SERVER_PID"
# The errors whose message already says what is wrong and what to do: no traceback needed.
_EXPLAINED = (ModelLoadError, ValueError)


def configure_logging(level: str) -> None:
    """Our loggers at ``level`` (BentoML's server logging shows WARNING and up from other
    loggers; ours say more), and http_api.request_log's filter on BentoML's endpoint logger."""
    for name in (logger.name, "llava_custom", "media"):
        logging.getLogger(name).setLevel(level)
    request_log.install_framework_filter()
    install_dropped_client_filter()


def check_before_serving() -> settings.Settings:
    """Validate everything that can be checked without loading the weights; exits on failure."""
    try:
        current = settings.current()
    except ValidationError as error:
        exit_with(settings.explain(error), EXIT_INVALID_CONFIG)
    for warning in settings.unknown_variables():
        logger.warning(warning)
    try:
        # The hub client logs each retry while the network is down; the one line below says it all.
        with _quiet("huggingface_hub", "transformers"):
            check_requirements(load_4bit=current.load_4bit, device=current.device, attn=current.attn)
            checkpoint = read_checkpoint(current.model)
            layout = VideoLayout.from_config(checkpoint.config)
        check_capacity(layout, current.kv_cache_tokens, current.max_frames, current.max_new_tokens_limit)
        job_store(current)
        media_store(current)
        if (shared := current.shared_jobs()) is not None:
            check_redis(shared)
    except _EXPLAINED as error:
        exit_with(str(error), EXIT_INVALID_CONFIG)
    except Exception as error:  # the checkpoint's files could not be read: still one line
        _debug_traceback(current)
        exit_with(f"cannot read the checkpoint LLAVA_MODEL={current.model}: {_one_line(error)}", EXIT_INVALID_CONFIG)
    return current


def job_store(current: settings.Settings) -> JobStore:
    """The job records' store; ValueError when LLAVA_JOB_DIR cannot be made or written."""
    try:
        store = JobStore(current.job_dir, current.job_result_seconds)
        probe = store.directory / ".writable"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"LLAVA_JOB_DIR={current.job_dir} cannot be used for job records: {error}") from error
    return store


def media_store(current: settings.Settings) -> media.MediaStore:
    """The media store (its records in Redis with LLAVA_REDIS_URL, so that replicas sharing the
    folder share the ids); ValueError when LLAVA_MEDIA_DIR cannot be made or written."""
    records = media.RedisRecords(connect(current.redis_url)) if current.redis_url else None
    try:
        store = current.media_store(records)
        probe = store.folder / ".writable"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"LLAVA_MEDIA_DIR={current.media_dir} cannot be used for the media store: {error}") from error
    return store


def media_library(current: settings.Settings, decoder: media.DecodePool) -> media.MediaLibrary:
    """This worker's media store behind the request checks, its expired files and the uploads
    of stopped processes removed."""
    store = media_store(current)
    try:
        if removed := store.sweep():
            logger.info("media store: removed %d expired files", removed)
    except media.StoreUnavailable as error:  # Redis down: the files routes answer 503 until it is back
        logger.warning("media store: %s", error)
    return media.MediaLibrary(
        store, decoder, max_image_pixels=current.max_image_pixels, max_video_pixels=current.max_video_pixels
    )


def check_redis(shared: SharedJobSettings) -> None:
    """Warn when the jobs' Redis does not answer now: the service still starts (its jobs routes
    answer 503 until Redis answers), since in a cluster Redis may come up after the replicas."""
    client = connect(shared.redis_url)
    try:
        RedisJobStore(client, 1.0).ping()
    except Exception as error:
        logger.warning("%s; the /jobs routes answer 503 until it answers", error)
    finally:
        client.close()


def shared_job_manager(
    current: settings.Settings,
    shared: SharedJobSettings,
    engine: Engine,
    decoder: media.DecodePool,
    reading: media.VideoReading,
) -> SharedJobManager:
    """This replica's view of the jobs every replica shares through Redis (LLAVA_REDIS_URL)."""
    client = connect(shared.redis_url)
    limits = current.fetch_limits(max_bytes=current.max_job_bytes)
    return SharedJobManager(
        engine,
        decoder,
        RedisJobStore(client, current.job_result_seconds),
        current.job_limits(),
        reading,
        queue=SegmentQueue(client),
        shared=shared,
        job_dir=current.job_dir,
        fetch=lambda url, folder: media.download_to_file(url, folder, limits),
    )


def exit_with(message: str, status: int) -> NoReturn:
    """Print ``message`` as one line on stderr and end the process with ``status``."""
    print(f"llava_video_service: cannot start: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def stop_server_when_a_worker_fails() -> None:
    """In the main `bentoml serve` process: a worker's SIGUSR1 stops the server, exit status 3.

    Called before the workers are spawned; they inherit this process's id in the environment.
    Does nothing off the main thread (BentoML serving from a thread of another program), where
    signal handlers cannot be set: a failed worker then only answers 503 on /livez and /readyz.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    failed = threading.Event()

    def on_worker_failure(signum: int, frame: object) -> None:
        if failed.is_set():
            return  # several workers failing: one stop is enough
        failed.set()
        # Whatever handles SIGTERM now (circus's arbiter) stops every worker and closes the socket.
        signal.raise_signal(signal.SIGTERM)

    def exit_status() -> None:
        if failed.is_set():
            # bentoml's command line ends with status 0 after any orderly stop; this handler runs
            # after it has stopped everything, and ends the process with the status that says why.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_MODEL_LOAD_FAILED)

    signal.signal(signal.SIGUSR1, on_worker_failure)
    atexit.register(exit_status)
    os.environ[_SERVER_PID_VARIABLE] = str(os.getpid())


def report_worker_failure() -> bool:
    """In a worker: ask the main process to stop the server. False when no main process armed
    :func:`stop_server_when_a_worker_fails` as this process's parent (in-process tests)."""
    server = os.environ.get(_SERVER_PID_VARIABLE, "")
    if not server.isdigit() or int(server) != os.getppid():
        return False
    os.kill(int(server), signal.SIGUSR1)
    return True


class ModelStartup:
    """Loads the model, builds the engine and warms it up in a background thread of the worker."""

    def __init__(
        self,
        current: settings.Settings,
        decoder: media.DecodePool,
        lifecycle: Lifecycle,
        library: media.MediaLibrary | None = None,
    ) -> None:
        self.settings = current
        self.decoder = decoder
        self.library = library
        self.lifecycle = lifecycle
        self.engine: Engine | None = None
        self.analyzer: Analyzer | None = None
        self.jobs: JobManager | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="llava-model-load", daemon=True)

    def start(self) -> None:
        # What a process killed earlier (SIGKILL, out of memory) left of its requests and jobs.
        workdirs.remove_leftovers()
        self._thread.start()

    def close(self) -> None:
        """Stop the engine if it was built; a load still running closes it when it ends."""
        with self._lock:
            self._closed = True
            engine, jobs = self.engine, self.jobs
        if jobs is not None:  # first: its captions are in the engine
            jobs.close()
        if engine is not None:
            engine.close()

    def _run(self) -> None:
        s = self.settings
        started = time.monotonic()
        try:
            logger.info(
                "loading %s (4-bit=%s, device=%s, dtype=%s, attention=%s)",
                s.model,
                s.load_4bit,
                s.device,
                s.dtype,
                s.attn,
            )
            loaded = load_pretrained_model(s.model, load_4bit=s.load_4bit, device=s.device, dtype=s.dtype, attn=s.attn)
            logger.info("%s; loaded in %.1f s", describe(loaded), time.monotonic() - started)
            engine = Engine(loaded, s.engine_limits(), ReuseCache(s.feature_cache_bytes, s.prefix_cache_bytes))
            with self._lock:
                if self._closed:  # the worker is shutting down: nobody will use this engine
                    engine.close()
                    return
                self.engine = engine
            engine.check_capacity(s.max_frames, s.max_new_tokens_limit)
            warm = time.monotonic()
            answer = engine.warm_up(video_frames=s.warmup_frames)
            logger.info(
                "warm-up generation: %d tokens in %.2f s%s",
                answer.completion_tokens,
                time.monotonic() - warm,
                " (decode step compiled during it)" if engine.scheduler.runner.compiled else "",
            )
            if memory := gpu_memory(loaded.device):
                logger.info(memory)
            logger.info(s.describe_limits())
        except Exception as error:
            self._fail(error)
            return
        reading = s.video_reading(engine.frame_size)  # requests and job segments decode alike
        self.analyzer = Analyzer(s, engine, self.decoder, reading, process_metrics(), self.library)
        if (shared := s.shared_jobs()) is not None:
            self.jobs = shared_job_manager(s, shared, engine, self.decoder, reading)
        else:
            self.jobs = JobManager(engine, self.decoder, job_store(s), s.job_limits(), reading)
        self.lifecycle.set_ready()
        logger.info("ready after %.1f s", time.monotonic() - started)

    def _fail(self, error: Exception) -> None:
        if isinstance(error, _EXPLAINED):
            message = str(error)
        else:  # e.g. damaged weights, out of GPU memory: name what was being loaded
            message = f"loading LLAVA_MODEL={self.settings.model} failed: {_one_line(error)}"
        self.lifecycle.set_failed(message)
        self.close()  # an engine built before the failure (capacity, warm-up) stops its thread
        logger.error("cannot start: %s", message)
        logger.debug("the model load failed", exc_info=error)
        if report_worker_failure():
            logger.error("stopping the server (exit status %d)", EXIT_MODEL_LOAD_FAILED)
        else:
            logger.error("/livez and /readyz answer 503 until this process is restarted")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{error.__class__.__name__}: {text}" if text else error.__class__.__name__


def _debug_traceback(current: settings.Settings) -> None:
    if current.log_level == "DEBUG":
        import traceback

        traceback.print_exc()


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence these loggers below ERROR for the duration (in the main process only)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for each, level in zip(loggers, levels, strict=True):
            each.setLevel(level)
