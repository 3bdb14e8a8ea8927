"""The ``/jobs`` routes: a long video analysed segment by segment in the background.

    POST /jobs/submit              video upload (multipart ``video``), JSON ``video_url`` or the
                                   ``file_id`` of a stored video, + ``metadata``
    GET  /jobs/status?task_id=...  status, progress and the segment captions done so far
    GET  /jobs/get?task_id=...     {"answer", "segments", "video_info", "usage", "status"}
    POST /jobs/cancel?task_id=...  stops the job within a segment (PUT too, as BentoML's)
    POST /jobs/ask                 {"task_id", "question"}: answered from the finished job's captions

The task id travels in the query (or the body), never in the path, as in BentoML's task routes:
paths stay a fixed set, so metrics labelled by path (ours and BentoML's) get no series per job.
BentoML's ``@bentoml.task`` gives these submit/status/get/cancel routes too, but not what jobs
need: its local server cannot cancel a running task (its cancel answers 400), its status has no
progress, it keeps the whole request body, upload included, in memory and base64 in SQLite, and
it deletes every result when the server starts. Failures have the native failure body.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anyio import to_thread
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from http_api.analysis import Analyzer
from http_api.errors import ErrorReply, RequestError, status_for_kind, translate
from http_api.routes import Shape
from http_api.schemas import JobMetadata, JobQuestion
from jobs.manager import JobFailed, JobManager, UnknownJob
from jobs.store import valid_task_id
from media import workdirs

# Form fields of a submission; anything else is a mistake worth a 400.
SUBMIT_FIELDS = frozenset({"video", "video_url", "file_id", "metadata"})
COPY_CHUNK_BYTES = 1024 * 1024


def create_app(jobs: Callable[[], JobManager], analyzer: Callable[[], Analyzer]) -> Starlette:
    """The ``/jobs`` app; ``jobs`` and ``analyzer`` return the worker's (they exist once loaded)."""

    async def submit(request: Request) -> Response:
        folder = workdirs.job_folder()
        try:
            fields = await _fields(request, folder)
            meta = JobMetadata.parse(fields.get("metadata"))
        except ValueError as error:
            shutil.rmtree(folder, ignore_errors=True)
            return _failure(RequestError(str(error), "metadata"))
        except Exception as error:
            shutil.rmtree(folder, ignore_errors=True)
            return _failure(error)
        try:
            source = await to_thread.run_sync(_source, analyzer(), fields, folder)
            parameters = meta.parameters(analyzer().defaults)
            # The job owns the folder from here on and deletes it when it ends; replicas sharing
            # jobs read a URL's video themselves.
            url = fields.get("video_url") or None
            status = await to_thread.run_sync(functools.partial(jobs().submit, source, folder, parameters, url))
        except Exception as error:
            shutil.rmtree(folder, ignore_errors=True)
            return _failure(error)
        return JSONResponse(status, status_code=202)

    async def status(request: Request) -> Response:
        return await _answer(lambda task_id: jobs().status(task_id), request.query_params.get("task_id"))

    async def result(request: Request) -> Response:
        return await _answer(lambda task_id: jobs().result(task_id), request.query_params.get("task_id"))

    async def cancel(request: Request) -> Response:
        return await _answer(lambda task_id: jobs().cancel(task_id), request.query_params.get("task_id"))

    async def ask(request: Request) -> Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _failure(RequestError("the body is not valid JSON"))
        try:
            question = JobQuestion.parse(body)
        except ValueError as error:
            return _failure(RequestError(str(error)))
        generation = question.generation(analyzer().defaults)

        def answer(task_id: str) -> dict[str, Any]:
            text, (prompt_tokens, completion_tokens) = jobs().ask(task_id, question.question, generation)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
            return {"response": text, "status": "success", "usage": usage}

        return await _answer(answer, question.task_id)

    return Starlette(
        routes=[
            Route("/submit", submit, methods=["POST"]),
            Route("/status", status, methods=["GET"]),
            Route("/get", result, methods=["GET"]),
            Route("/cancel", cancel, methods=["POST", "PUT"]),
            Route("/ask", ask, methods=["POST"]),
        ]
    )


async def _answer(action: Callable[[str], dict[str, Any]], task_id: str | None) -> Response:
    """``action(task_id)`` in a worker thread, as JSON; its failures as failure bodies."""
    if not task_id:
        return _failure(RequestError("task_id is required: the id /jobs/submit answered", "task_id"))
    if not valid_task_id(task_id):
        return _failure(UnknownJob(f"{task_id!r} is not a task id (32 hex digits, as /jobs/submit answered)"))
    try:
        return JSONResponse(await to_thread.run_sync(action, task_id))
    except Exception as error:
        return _failure(error)


async def _fields(request: Request, folder: Path) -> dict[str, Any]:
    """The submission's fields; an uploaded ``video`` is copied into ``folder`` (as ``Path``)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip()
    if media_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        fields: dict[str, Any] = {}
        try:
            async with request.form(max_files=1) as form:
                for name, value in form.multi_items():
                    if name in fields:
                        raise ValueError(f"the field '{name}' is given twice")
                    if isinstance(value, UploadFile):
                        if name != "video":
                            raise ValueError(f"only the 'video' field may be a file, not '{name}'")
                        fields[name] = await to_thread.run_sync(_save_upload, value, folder / "upload")
                    else:
                        fields[name] = value
        except MultiPartException as error:
            raise ValueError(f"the multipart body cannot be read: {error}") from error
    else:
        try:
            fields = json.loads(await request.body() or b"{}")
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError("the body is not valid JSON") from error
        if not isinstance(fields, dict):
            raise ValueError('the body must be a JSON object such as {"video_url": "https://...", "metadata": {}}')
    unknown = sorted(set(fields) - SUBMIT_FIELDS)
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a field of /jobs/submit; the job's parameters go inside metadata")
    return fields


def _save_upload(upload: UploadFile, target: Path) -> Path:
    with target.open("wb") as out:
        shutil.copyfileobj(upload.file, out, COPY_CHUNK_BYTES)
    return target


def _source(analyzer: Analyzer, fields: dict[str, Any], folder: Path) -> Path:
    """The video file of a submission: the upload, ``video_url`` downloaded, or the stored video
    ``file_id`` (blocking)."""
    url = fields.get("video_url")
    if url is not None and not isinstance(url, str):
        raise RequestError("video_url must be a string: the video's http(s) URL", "video_url")
    file_id = fields.get("file_id")
    if file_id is not None and not isinstance(file_id, str):
        raise RequestError("file_id must be a string: the id POST /v1/files or /media answered", "file_id")
    read = analyzer.read_source("video", fields.get("video"), url, file_id, folder, job=True, id_field="file_id")
    return read.path


def _failure(error: Exception) -> JSONResponse:
    """The failure body; a bug or a device failure is logged, the caller gets no internals."""
    if isinstance(error, JobFailed):  # the job's own failure, answered by its kind as outside a job
        return ErrorReply(status_for_kind(error.kind), str(error), Shape.NATIVE).response()
    return translate(error, Shape.NATIVE, "handling the job").response()
