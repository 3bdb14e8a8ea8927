"""Media sent once, referred to by id: OpenAI's files API under ``/v1/files`` and its native twin
under ``/media`` (the native failure body), both on the worker's media.MediaLibrary.

    POST   /v1/files  (or /media)        multipart ``file`` (+ ``purpose``): the file object
    GET    /v1/files                     {"object": "list", "data": [file objects], "has_more": false}
    GET    /v1/files/{id}                the file object
    GET    /v1/files/{id}/content        the bytes
    DELETE /v1/files/{id}                {"id", "object": "file", "deleted": true}

An upload is checked as a request's medium is (media.identify in a decode process) before it is
kept, so a file no request could read is refused here with that request's 4xx. The file object is
the ``openai`` package's ``FileObject`` (what ``client.files.create`` parses) plus ``kind``
(image or video). Requests refer to it by ``file_id`` in a chat ``file`` part, ``media_id`` on the
native routes and ``file_id`` on /jobs/submit (http_api.analysis.Analyzer.read_source).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

from anyio import to_thread
from openai.types import FileDeleted, FileObject
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

import media
from http_api.errors import RequestError, translate
from http_api.routes import Shape

# What a stored medium may be for (OpenAI's purposes for files a request reads).
PURPOSES = ("vision", "user_data")
UPLOAD_FIELDS = frozenset({"file", "purpose"})
MEDIA_PREFIX = "/media"  # where service.py mounts the native twin
COPY_CHUNK_BYTES = 1024 * 1024
MAX_FILENAME_CHARS = 255


def file_object(record: media.StoredMedia) -> dict[str, Any]:
    """OpenAI's file object for ``record``, plus ``kind``."""
    stored = FileObject(
        id=record.id,
        object="file",
        bytes=record.bytes,
        created_at=record.created_at,
        expires_at=record.expires_at,
        filename=record.filename,
        purpose=record.purpose,  # type: ignore[arg-type]  # one of PURPOSES
        status="processed",
    )
    return stored.model_dump(exclude_none=True) | {"kind": record.kind}


def routes(library: Callable[[], media.MediaLibrary], shape: Shape, prefix: str = "") -> list[Route]:
    """The files routes under ``prefix`` of their app; failures in ``shape``."""

    def failure(error: Exception) -> Response:
        return translate(error, shape, "handling the file").response()

    async def upload(request: Request) -> Response:
        try:
            return JSONResponse(file_object(await _receive(library(), request)))
        except Exception as error:
            return failure(error)

    async def listing(request: Request) -> Response:
        purpose = request.query_params.get("purpose")
        try:
            held = await to_thread.run_sync(library().store.list)
        except Exception as error:
            return failure(error)
        data = [file_object(record) for record in held if purpose in (None, record.purpose)]
        return JSONResponse({"object": "list", "data": data, "has_more": False})

    async def retrieve(request: Request) -> Response:
        try:
            record = await to_thread.run_sync(library().store.get, request.path_params["file_id"])
        except Exception as error:
            return failure(error)
        return JSONResponse(file_object(record))

    async def content(request: Request) -> Response:
        store = library().store
        try:
            record = await to_thread.run_sync(store.get, request.path_params["file_id"])
        except Exception as error:
            return failure(error)
        return FileResponse(store.blobs / record.digest, filename=record.filename or None)

    async def delete(request: Request) -> Response:
        try:
            record = await to_thread.run_sync(library().store.delete, request.path_params["file_id"])
        except Exception as error:
            return failure(error)
        return JSONResponse(FileDeleted(id=record.id, object="file", deleted=True).model_dump())

    root = prefix or "/"  # /v1's app has them under /files; /media's app at its root
    return [
        Route(root, upload, methods=["POST"]),
        Route(root, listing, methods=["GET"]),
        Route(f"{prefix}/{{file_id}}", retrieve, methods=["GET"]),
        Route(f"{prefix}/{{file_id}}/content", content, methods=["GET"]),
        Route(f"{prefix}/{{file_id}}", delete, methods=["DELETE"]),
    ]


def create_app(library: Callable[[], media.MediaLibrary]) -> Starlette:
    """The native twin, mounted at ``/media``: the same routes, the native failure body."""
    return Starlette(routes=routes(library, Shape.NATIVE))


async def _receive(library: media.MediaLibrary, request: Request) -> media.StoredMedia:
    """The multipart upload, streamed into the store's folder, checked, then stored."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip()
    if media_type != "multipart/form-data":
        raise RequestError("upload the file as multipart/form-data: curl -F file=@clip.mp4 -F purpose=vision")
    with library.store.incoming() as target:
        fields: dict[str, Any] = {}
        filename = ""
        try:
            async with request.form(max_files=1) as form:
                for name, value in form.multi_items():
                    if name not in UPLOAD_FIELDS:
                        raise RequestError(f"'{name}' is not a field of a file upload: send 'file' and 'purpose'", name)
                    if name in fields:
                        raise RequestError(f"the field '{name}' is given twice", name)
                    if name == "file":
                        if not isinstance(value, UploadFile):
                            raise RequestError("'file' must be the file itself (curl -F file=@clip.mp4)", "file")
                        filename = (value.filename or "")[:MAX_FILENAME_CHARS]
                        await to_thread.run_sync(_save, value, target)
                    fields[name] = value
        except MultiPartException as error:
            raise RequestError(f"the multipart body cannot be read: {error}") from error
        if "file" not in fields:
            raise RequestError("no file: upload it as the multipart field 'file' (curl -F file=@clip.mp4)", "file")
        purpose = str(fields.get("purpose") or "vision")
        if purpose not in PURPOSES:
            raise RequestError(
                f"purpose {purpose!r}: a stored medium's purpose is one of {', '.join(PURPOSES)}", "purpose"
            )
        return await to_thread.run_sync(lambda: library.add_upload(target, filename=filename, purpose=purpose))


def _save(upload: UploadFile, target: Any) -> None:
    with open(target, "wb") as out:
        shutil.copyfileobj(upload.file, out, COPY_CHUNK_BYTES)


class MountRoot:
    """ASGI middleware: a request to ``/media`` itself goes to the root of the app mounted there
    (Starlette's mount would answer it with a redirect to ``/media/``, which curl does not follow
    for a POST)."""

    def __init__(self, app: Any, path: str = MEDIA_PREFIX) -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") == self.path:
            scope = {**scope, "path": f"{self.path}/", "raw_path": f"{self.path}/".encode()}
        await self.app(scope, receive, send)
