"""The HTTP face of the service (FastAPI): the JSON API under /v1, /healthz,
the OpenAPI docs, and the web page at /."""

from __future__ import annotations

import hmac
import mimetypes
import os
import stat
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import SoundtagError
from ..library import Hit, Library, Row
from .limits import BodyLimit
from .service import ApiError, Service, Settings

UPLOAD = {"requestBody": {"required": True, "description": "the audio: the raw body, or the multipart field `file`",
                          "content": {"multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                      "properties": {"file": {"type": "string", "format": "binary"}}}},
                                      "application/octet-stream": {"schema": {"type": "string",
                                                                              "format": "binary"}}}}}


def create_app(service: Service) -> FastAPI:
    """The application around a loaded service (started and stopped with the app)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        await service.stop()

    app = FastAPI(title="soundtag", version="1", lifespan=lifespan,
                  description="Audio tagging with a trained soundtag run, and its sound library.")
    app.add_middleware(BodyLimit, max_bytes=service.settings.max_upload_bytes)
    _errors(app)
    _pages(app)
    _tagging(app, service)
    _library(app, service)
    return app


def _errors(app: FastAPI) -> None:
    """Every refusal is JSON: {"error": message, "status": code}."""

    def answer(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "status": status}, status, headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return answer(e.status, e.message, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return answer(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return answer(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(SoundtagError)
    async def soundtag_error(request: Request, e: SoundtagError) -> JSONResponse:
        return answer(404 if "no file with id" in str(e) else 400, str(e))


def _pages(app: FastAPI) -> None:
    static = resources.files("soundtag.server") / "static"

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text())

    app.mount("/static", StaticFiles(packages=[("soundtag.server", "static")]), name="static")


def _key_check(service: Service):
    key = service.settings.api_key

    async def check(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key (send it as the X-API-Key header)",
                           {"WWW-Authenticate": "Bearer"})
    return check


def _tagging(app: FastAPI, service: Service) -> None:
    keyed = [Depends(_key_check(service))]
    classes = len(service.tagger.classes)

    @app.get("/healthz", summary="Liveness, with the requests in progress")
    async def healthz() -> dict:
        return {"status": "ok", "model": service.model, "in_flight": service.in_flight,
                "waiting_for_batch": service.batcher.waiting}

    @app.get("/v1/labels", dependencies=keyed, summary="The model's labels and their tuned thresholds")
    async def labels() -> dict:
        thresholds = service.thresholds or [None] * classes
        return {"model": service.model, "multilabel": service.tagger.multilabel,
                "activation": "sigmoid" if service.tagger.multilabel else "softmax",
                "labels": [{"label": c, "threshold": t} for c, t in zip(service.tagger.classes, thresholds)]}

    @app.post("/v1/tag", dependencies=keyed, openapi_extra=UPLOAD,
              summary="Tag one audio file: top labels, and segments when it is long")
    async def tag(request: Request, top: int = Query(5, ge=1, le=classes),
                  spectrogram: bool = Query(False, description="add the log-mel spectrogram for drawing")) -> dict:
        return await service.tag(request, top, spectrogram)


def _library(app: FastAPI, service: Service) -> None:
    keyed = [Depends(_key_check(service))]

    def library() -> Library:
        if service.library is None:
            raise ApiError(404, "no library: start the server with --db LIBRARY (made by soundtag index)")
        return service.library

    def items(hits: list[Hit], tags: bool = False) -> list[dict]:
        lib = library()
        return [{**h.to_dict(), **({"tags": [{"label": label, "score": round(s, 6)} for label, s in lib.tags(h.id)]}
                                   if tags else {})} for h in hits]

    @app.get("/v1/library", dependencies=keyed, summary="Browse the library's files by name")
    def browse(q: str = Query("", max_length=200), offset: int = Query(0, ge=0),
               limit: int = Query(50, ge=1, le=500)) -> dict:
        total, hits = library().entries(offset, limit, q)
        return {"total": total, "offset": offset, "items": items(hits, tags=True)}

    @app.get("/v1/search", dependencies=keyed, summary="Files tagged with a label, best first")
    def search(label: str = Query(..., max_length=200), min_score: float = Query(0.0, ge=0, le=1),
               limit: int = Query(50, ge=1, le=500)) -> dict:
        return {"label": label, "items": items(library().search(label, min_score, limit), tags=True)}

    @app.get("/v1/similar", dependencies=keyed, summary="Files that sound like a library file (by id)")
    def similar(id: int = Query(..., ge=1), k: int = Query(10, ge=1, le=500), approx: bool = False) -> dict:
        return {"query": id, "items": items(library().similar(id, k, approx), tags=True)}

    @app.post("/v1/similar", dependencies=keyed, openapi_extra=UPLOAD,
              summary="Files that sound like an uploaded one (embedded on the fly)")
    async def similar_upload(request: Request, k: int = Query(10, ge=1, le=500), approx: bool = False) -> dict:
        lib = library()
        if lib.model.id != service.model:
            raise ApiError(409, f"the library was indexed with model {lib.model.id}, the server runs "
                                f"{service.model}: their embeddings do not compare")
        vector = await service.embed(request)
        hits = await run_in_threadpool(lib.similar, vector, k, approx)
        return {"query": "upload", "items": await run_in_threadpool(items, hits, True)}

    @app.get("/v1/library/{file_id}/audio", dependencies=keyed, summary="A library file's audio, by id")
    def audio_of(file_id: int) -> FileResponse:
        row = library().get(file_id)
        if not _playable(row):
            raise ApiError(404, f"file {file_id} has no playable audio (unreadable, changed or gone since indexing)")
        media = mimetypes.guess_type(row.path)[0] or "application/octet-stream"
        return FileResponse(row.path, media_type=media)


def _playable(row: Row) -> bool:
    """Whether a record's file was tagged and is still the regular file of the size recorded."""
    try:
        st = os.stat(row.path)
    except OSError:
        return False
    return row.error is None and stat.S_ISREG(st.st_mode) and st.st_size == row.size


def serve(run: str | Path, settings: Settings, host: str = "127.0.0.1", port: int = 8000, backend: str = "auto",
          db: str | Path | None = None) -> None:
    """Load the run and serve it until interrupted."""
    import uvicorn
    app = create_app(Service.load(run, settings, backend, db))
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_keep_alive=5)
