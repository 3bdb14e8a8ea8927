"""Run media decoding in a child process under a wall-clock limit.

Why a process and not a thread with a timeout: a decoder stuck inside C code (FFmpeg, decord,
Pillow) cannot be interrupted from Python. A thread with a timeout answers the caller but keeps
decoding, holding its memory and a core, one more thread for every bad file that follows. A
child process can be killed, and the kernel then frees everything it held; a decoder crash
(segfault, abort) also ends only the child, never the service.

One long-lived child per :class:`DecodeWorker` keeps the cost per call to a socket round trip:
the call goes down pickled (a function reference and its arguments, e.g. a file path), the
result comes back pickled with its large buffers (the sampled frames, already resized) sent out
of band and read straight into place. The child is replaced after a timeout, a crash or
``max_jobs`` calls (decoders may leak memory); a call whose child dies runs once more on the
fresh one (a second death: the file crashed it twice, or, both by SIGKILL, the machine did).
The replacement starts at once, so its start-up (about half a second of imports) overlaps the
rest of the request.

:class:`DecodePool` holds several DecodeWorkers so that requests decode in parallel: each call
takes an idle worker (waiting for one when all are busy) and hands it back afterwards; each
worker keeps its own limit, crash isolation and replacement, so one stuck or crashed decoder
costs only its own call.

The child runs :func:`serve` on one end of a socket pair until the parent closes the other.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from media import image, video
from media.errors import DecoderStopped, DecodeTimeout, MediaError, UndecodableMedia
from media.video import SampledVideo

T = TypeVar("T")
logger = logging.getLogger(__name__)
_PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Extra seconds after which a child stops itself if its parent never collected it.
_ALARM_GRACE = 5
# How long close() waits for a child to exit on its own before killing it.
_EXIT_WAIT = 2.0
# The child's program (not `-m media.worker`: the package imports this module first).
_CHILD_MAIN = "import sys; from media.worker import serve; serve(int(sys.argv[1]))"


class WorkerFailure(RuntimeError):
    """The function raised something other than a MediaError (a bug); carries the child's traceback."""


class DecodeWorker:
    """Decodes media in a child process, one call at a time, each under a wall-clock limit."""

    def __init__(self, *, time_limit: float, max_jobs: int = 200) -> None:
        if time_limit <= 0:
            raise ValueError(f"time_limit must be positive, got {time_limit}")
        self.time_limit = time_limit
        self._max_jobs = max_jobs
        self._lock = threading.Lock()
        self._child: _Child | None = None

    @property
    def pid(self) -> int | None:
        """The current child's process id (None before the first start or after close)."""
        child = self._child
        return child.process.pid if child else None

    def start(self) -> None:
        """Start the child now, so that the first call does not wait for its imports."""
        with self._lock:
            self._running_child()

    def read_video(self, path: Path, num_frames: int, **options: Any) -> SampledVideo:
        """:func:`media.video.read_video` in the child."""
        return self.run(video.read_video, path, num_frames, **options)

    def read_image(self, path: Path, *, max_pixels: int) -> Image.Image:
        """:func:`media.image.read_image` in the child."""
        # Pixels travel as an array (sent without copies), not as a pickled Pillow image.
        return Image.fromarray(self.run(image.read_image_array, path, max_pixels=max_pixels))

    def run(self, function: Callable[..., T], /, *args: Any, time_limit: float | None = None, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` in the child; its MediaErrors are re-raised here.

        ``function`` must be importable by name (a module-level function). Raises DecodeTimeout
        when no result came within ``time_limit`` seconds (default: the worker's; the child is
        killed), UndecodableMedia when the child died on the call twice (DecoderStopped when
        both were killed by SIGKILL, from outside), WorkerFailure for other exceptions.
        """
        limit = time_limit or self.time_limit
        with self._lock:
            # A child that dies mid-call is replaced and the call runs once more on the fresh one:
            # one death may be the machine's (the OOM killer, an operator); the retry's tells.
            for attempt in (1, 2):
                child = self._running_child()
                try:
                    child.channel.send((function, args, kwargs, math.ceil(limit) + _ALARM_GRACE))
                    if not child.channel.poll(limit):
                        self._replace()
                        raise DecodeTimeout(
                            f"decoding took longer than the {limit:g} s limit; the file may be damaged, "
                            "or too long or large: send a shorter or smaller file"
                        )
                    status, payload = child.channel.recv()
                    break
                except (EOFError, OSError) as exc:
                    ended = child.exit_code()
                    self._replace()
                    if attempt == 1:
                        logger.warning("a decode process ended mid-call (exit %s); retrying on a fresh one", ended)
                        continue
                    if ended == -signal.SIGKILL:  # killed from outside both times
                        raise DecoderStopped(
                            "the decoding process was stopped twice while reading this file (the machine may be "
                            "out of memory); try again later"
                        ) from exc
                    raise UndecodableMedia(
                        "the decoder crashed on this file twice; it is probably damaged, send a re-encoded copy"
                    ) from exc
            child.jobs += 1
            if child.jobs >= self._max_jobs:
                self._replace()
        if status == "ok":
            return payload
        if status == "media-error":
            raise payload
        raise WorkerFailure(payload)

    def close(self) -> None:
        """Stop the child (it exits when its connection closes; killed if it does not)."""
        with self._lock:
            if self._child is not None:
                self._child.stop(kill=False)
                self._child = None

    def _running_child(self) -> _Child:
        if self._child is None or self._child.process.poll() is not None:
            if self._child is not None:
                self._child.stop(kill=True)
            self._child = _Child.start()
        return self._child

    def _replace(self) -> None:
        if self._child is not None:
            self._child.stop(kill=True)
        self._child = _Child.start()


class DecodePool:
    """A pool of ``workers`` DecodeWorkers, so that up to that many calls decode at once."""

    def __init__(self, workers: int, *, time_limit: float, max_jobs: int = 200) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._workers = [DecodeWorker(time_limit=time_limit, max_jobs=max_jobs) for _ in range(workers)]
        # A condition rather than a queue.Queue: close() must both wake the callers waiting for a
        # worker and wait for the busy ones to come back; a queue needs sentinels for the first.
        self._available = threading.Condition()
        self._idle = list(self._workers)
        self._closed = False

    @property
    def size(self) -> int:
        """The number of workers (children), busy or idle."""
        return len(self._workers)

    @property
    def pids(self) -> list[int]:
        """The process ids of the children started so far, in worker order."""
        return [pid for worker in self._workers if (pid := worker.pid) is not None]

    def start(self) -> None:
        """Start every child now, so that the first calls do not wait for their imports."""
        # Under the condition so that close() cannot run in between and leave children behind.
        with self._available:
            self._check_open()
            for worker in self._workers:
                worker.start()  # only spawns the process; the imports run in the child meanwhile

    def read_video(self, path: Path, num_frames: int, **options: Any) -> SampledVideo:
        """:func:`media.video.read_video` in an idle child."""
        with self._worker() as worker:
            return worker.read_video(path, num_frames, **options)

    def read_image(self, path: Path, *, max_pixels: int) -> Image.Image:
        """:func:`media.image.read_image` in an idle child."""
        with self._worker() as worker:
            return worker.read_image(path, max_pixels=max_pixels)

    def run(self, function: Callable[..., T], /, *args: Any, time_limit: float | None = None, **kwargs: Any) -> T:
        """:meth:`DecodeWorker.run` on an idle worker; waits for one while all are busy.

        The time limit counts from when a worker takes the call, not while it waits.
        """
        with self._worker() as worker:
            return worker.run(function, *args, time_limit=time_limit, **kwargs)

    def close(self) -> None:
        """Refuse new calls, wait for those in flight (each ends within its limit), stop every child."""
        with self._available:
            self._closed = True
            self._available.notify_all()  # callers waiting for a worker raise instead of hanging
            self._available.wait_for(lambda: len(self._idle) == len(self._workers))
            # Every worker is idle and no call can take one any more: nothing restarts a child.
            for worker in self._workers:
                worker.close()

    @contextmanager
    def _worker(self) -> Iterator[DecodeWorker]:
        """An idle worker, handed back afterwards whatever the call did."""
        with self._available:
            self._available.wait_for(lambda: self._idle or self._closed)
            self._check_open()
            worker = self._idle.pop()
        try:
            yield worker
        finally:
            with self._available:
                self._idle.append(worker)
                # notify_all, not notify: close() may be waiting on the same condition.
                self._available.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the decode pool is closed (the service is shutting down)")


class _Child:
    """One child process running :func:`serve`, and the parent's end of its socket."""

    def __init__(self, process: subprocess.Popen, channel: _Channel) -> None:
        self.process = process
        self.channel = channel
        self.jobs = 0

    @classmethod
    def start(cls) -> _Child:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        # The child imports `media` by name, wherever the service was started from.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _CHILD_MAIN, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        return cls(process, _Channel(ours))

    def exit_code(self) -> int | None:
        """The process's exit status once it has ended (negative: the signal that ended it);
        None if it is still running a moment after its socket closed."""
        try:
            return self.process.wait(timeout=_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, *, kill: bool) -> None:
        self.channel.close()
        if kill:
            self.process.kill()
        try:
            self.process.wait(timeout=_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _Channel:
    """Pickled messages over a stream socket; out-of-band buffers are read into place, no copies.

    A message is a count of parts, their lengths, then the parts: the pickle, then each buffer
    that pickle protocol 5 handed out of band (contiguous numpy arrays).
    """

    def __init__(self, sock: socket.socket) -> None:
        self._socket = sock

    def send(self, message: Any) -> None:
        buffers: list[pickle.PickleBuffer] = []
        parts = [memoryview(pickle.dumps(message, protocol=5, buffer_callback=buffers.append))]
        parts += [buffer.raw() for buffer in buffers]
        self._socket.sendall(struct.pack(f"<Q{len(parts)}Q", len(parts), *(part.nbytes for part in parts)))
        for part in parts:
            self._socket.sendall(part)

    def poll(self, timeout: float) -> bool:
        """Whether a message (or EOF) arrived within ``timeout`` seconds."""
        poller = select.poll()  # not select.select: it fails for descriptors above 1023
        poller.register(self._socket, select.POLLIN)
        return bool(poller.poll(math.ceil(timeout * 1000)))

    def recv(self) -> Any:
        (count,) = struct.unpack("<Q", self._read(8))
        lengths = struct.unpack(f"<{count}Q", self._read(8 * count))
        parts = [self._read(length) for length in lengths]
        return pickle.loads(parts[0], buffers=parts[1:])

    def close(self) -> None:
        self._socket.close()

    def _read(self, size: int) -> bytearray:
        data = bytearray(size)
        view = memoryview(data)
        while view:
            received = self._socket.recv_into(view)
            if not received:
                raise EOFError("the other end closed the connection")
            view = view[received:]
        return data


def _serve(channel: _Channel) -> None:
    """The child's loop: run each call received, send back its result or exception, until EOF."""
    # Ctrl-C on `bentoml serve` reaches the whole process group, and circus sends its stop signal
    # (SIGTERM) to the worker's children too: the parent decides when we stop (it closes our
    # socket, and we exit at EOF; also when it dies), so that a graceful shutdown can still
    # decode the requests in flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        try:
            call = channel.recv()
        except EOFError:
            return
        except Exception:  # a call that cannot be unpickled here (function not importable)
            channel.send(("error", traceback.format_exc()))
            continue
        reply = _run_call(*call)
        try:
            channel.send(reply)  # pickles in full before writing, so a failure sends nothing
        except Exception:  # an unpicklable result or exception
            channel.send(("error", traceback.format_exc()))


def _run_call(function: Callable[..., Any], args: tuple, kwargs: dict, alarm: int) -> tuple[str, Any]:
    # If the parent dies mid-call nobody would kill a stuck decoder: SIGALRM ends the child.
    signal.alarm(alarm)
    try:
        reply: tuple[str, Any] = ("ok", function(*args, **kwargs))
    except MediaError as exc:
        reply = ("media-error", exc)
    except Exception:
        reply = ("error", traceback.format_exc())
    finally:
        signal.alarm(0)
    return reply


def serve(fd: int) -> None:
    """The child's entry point: serve calls on the socket ``fd`` until the parent closes it."""
    _serve(_Channel(socket.socket(fileno=fd)))
