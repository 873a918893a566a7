"""The REST service: `create_app(bundle or Predictor, settings) -> FastAPI`.

Endpoints
    POST /predict   one or several images: multipart files (any field name), JSON
                    `{"images": [{"name": ..., "data": "<base64>"}]}`, or one raw `image/*` body.
                    Optional `?threshold=` overrides the bundle's threshold for this request.
    GET  /health    liveness: the process and its event loop answer.
    GET  /ready     readiness: model loaded and warmed up, batcher running, not shutting down (else 503).
    GET  /metadata  the bundle's metadata.json without anything path-like, plus the serving settings.
    GET  /stats     request and batching counters (forward passes, images per pass, ...).
    GET  /docs      OpenAPI documentation, offline (`/redoc` too; `/openapi.json` for the schema).
    GET  /          the inspection web page; POST /explain: predictions with Grad-CAM heat maps (see ui.py).

Status policy for /predict
    200  at least one image was predicted. Images that could not be used are reported in their
         own slot (`probability` and `label` null, `error` = {code, message}).
    422  every image of the request failed (`error.code` = "no_valid_images"); `results` still
         holds each image's reason. Also a JSON body of the wrong shape ("invalid_request").
    400  empty body, malformed JSON or multipart, JSON nested deeper than max_json_depth or with
         too many values, no images in the request.
    408  the body did not arrive within body_timeout_s (slow or stalled client); connection closed.
    413  body larger than max_body_bytes, or more than max_images_per_request images.
    415  missing or unsupported Content-Type.
    503  shutting down, too much work queued (back-pressure), no room for the body within
         max_buffered_body_bytes in time, or the model took longer than request_timeout_s.
         Bad input never produces a 5xx.
Every error body is `{"error": {"code": ..., "message": ...}}`.

Concurrency: the event loop only does I/O. Uploads are parsed and decoded in a small thread pool;
the model is called only from one dedicated thread, fed by the micro-batcher (see batcher.py).
Every request is logged as one JSON line (logger "keeneye.serving.access"): method, path, status,
duration, number of images, error codes. Image bytes are never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import keeneye
from keeneye.errors import KeeneyeError
from keeneye.evaluation.metrics import predict_labels
from keeneye.inference.predictor import Predictor
from keeneye.serving.batcher import MicroBatcher, Unavailable
from keeneye.serving.errors import error_response, keeneye_error_response
from keeneye.serving.inputs import (
    ImageRejected,
    RequestRejected,
    Upload,
    check_count,
    clean_name,
    parse_json_body,
    prepare_image,
)
from keeneye.serving.limits import BodyBudget, read_body, reservation
from keeneye.serving.settings import ServeSettings, batching_for
from keeneye.serving.ui import add_ui_routes

log = logging.getLogger("keeneye.serving")
access_log = logging.getLogger("keeneye.serving.access")

_REPLAY_CHUNK = 1024 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


# --- response schemas (for /docs) ---------------------------------------------------------


class ImageError(BaseModel):
    code: str
    message: str


class ImageResult(BaseModel):
    name: str
    probability: Optional[float]
    label: Optional[str]
    threshold: float
    error: Optional[ImageError]


class PredictResponse(BaseModel):
    results: List[ImageResult]
    n_images: int
    n_ok: int
    n_failed: int
    positive_class: str
    model: str


class ErrorResponse(BaseModel):
    error: ImageError
    results: Optional[List[ImageResult]] = None


_PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["files"],
                "properties": {"files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}},
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["images"],
                "properties": {
                    "images": {
                        "type": "array",
                        "minItems": 1,
                        "description": "At least one image.",
                        "items": {
                            "type": "object",
                            "required": ["data"],
                            "properties": {"name": {"type": "string"}, "data": {"type": "string", "format": "base64"}},
                        },
                    }
                },
            }
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}


# --- metadata without paths ---------------------------------------------------------------

_PATH_KEY = re.compile(r"(^|_)(path|paths|dir|dirs|folder|root|file|files)$", re.IGNORECASE)
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def looks_like_path(text: str) -> bool:
    """A filesystem path (absolute, home-relative, or a relative one with a separator and no spaces)."""
    if "://" in text:
        return False
    if text.startswith(("/", "~", "./", "../", "\\\\")) or _DRIVE.match(text):
        return True
    return ("/" in text or "\\" in text) and not any(ch.isspace() for ch in text)


def public_metadata(value: Any) -> Any:
    """A copy without path-valued keys; other path-like strings are cut to their last component."""
    if isinstance(value, dict):
        return {k: public_metadata(v) for k, v in value.items() if not (isinstance(k, str) and _PATH_KEY.search(k))}
    if isinstance(value, list):
        return [public_metadata(v) for v in value]
    if isinstance(value, str) and looks_like_path(value):
        return re.split(r"[\\/]", value.rstrip("/\\"))[-1]
    return value


# --- logging ------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access records carry their fields in `record.fields`."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str = "info") -> None:
    """Send keeneye.serving's records to stderr as JSON lines (called by `keeneye serve`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("keeneye.serving")
    logger.handlers = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


class AccessLogMiddleware:
    """Pure ASGI: request id, one JSON log line and a status counter per HTTP request."""

    def __init__(self, app, service: "Service") -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        info = {"n_images": 0, "n_failed": 0, "errors": []}
        scope["keeneye.log"] = info
        request_id = None
        for key, value in scope.get("headers", []):
            if key == b"x-request-id":
                text = value.decode("latin-1")
                request_id = text if _REQUEST_ID.match(text) else None
        request_id = request_id or uuid.uuid4().hex[:16]
        status = None  # stays None if no response was sent (e.g. cancelled at the end of a shutdown grace period)

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = 500
            raise
        finally:
            if status is not None:
                self.service.count(status)
            client = scope.get("client")
            access_log.info(
                "request",
                extra={"fields": {
                    "event": "request", "request_id": request_id, "method": scope.get("method"), "path": scope.get("path"),
                    "status": status, "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    "n_images": info["n_images"], "n_failed": info["n_failed"], "errors": info["errors"],
                    "client": client[0] if client else None,
                }},
            )


# --- the service --------------------------------------------------------------------------


class ModelFailed(Exception):
    """The forward pass itself failed on a batch: a server fault (500), not the client's."""


class Service:
    """What one app instance holds: the predictor, its threads, the batcher and counters."""

    def __init__(self, source: str | os.PathLike | Predictor, settings: ServeSettings) -> None:
        self.source = source
        self.settings = settings
        self.predictor: Predictor | None = source if isinstance(source, Predictor) else None
        self.batcher: MicroBatcher | None = None
        self.model_pool: ThreadPoolExecutor | None = None
        self.decode_pool: ThreadPoolExecutor | None = None
        self.ready = False
        self.batching: bool | None = None  # settings.batching, or the engine's default once the engine is known
        self.draining = False
        self.started = time.time()
        self.status_counts: dict[int, int] = {}
        self.images_ok = 0
        self.images_failed = 0
        self.body_budget = BodyBudget(settings.max_buffered_body_bytes)

    def count(self, status: int) -> None:
        self.status_counts[status] = self.status_counts.get(status, 0) + 1

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        self.model_pool = ThreadPoolExecutor(1, thread_name_prefix="keeneye-model")
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="keeneye-decode")
        if self.predictor is None:
            path = self.source
            batch = max(32, settings.max_batch_size)
            try:
                self.predictor = await loop.run_in_executor(
                    self.model_pool, lambda: Predictor.from_bundle(path, engine=settings.engine, batch_size=batch)
                )
            except Exception as exc:
                log.error("could not load the model from %s: %s", path, exc)
                raise
        size = self.predictor.bundle.image_size
        started = time.perf_counter()
        await loop.run_in_executor(self.model_pool, self.predictor.predict_images, [np.zeros((size, size, 3), np.uint8)])
        self.batching = batching_for(settings, self.predictor.engine_name)
        self.batcher = MicroBatcher(
            self.predictor.predict_images, self.model_pool, enabled=self.batching,
            max_batch_size=settings.max_batch_size, max_wait_s=settings.max_batch_wait_ms / 1000,
            max_pending_images=settings.max_pending_images,
        )
        self.batcher.start()
        self.ready = True
        log.info("model ready", extra={"fields": {
            "event": "ready", "bundle": self.bundle_name, "engine": self.predictor.engine_name, "image_size": size,
            "batching": self.batching, "warmup_ms": round((time.perf_counter() - started) * 1000, 1),
        }})

    async def stop(self) -> None:
        """After the server stopped taking requests and in-flight ones finished: drain and release."""
        self.draining = True
        self.ready = False
        if self.batcher is not None:
            await self.batcher.close(self.settings.shutdown_timeout_s)
        for pool in (self.model_pool, self.decode_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        log.info("shutdown complete", extra={"fields": {"event": "stopped", "status_counts": self.status_counts}})

    @property
    def bundle_name(self) -> str:
        return self.predictor.bundle.path.name if self.predictor is not None else Path(str(self.source)).name

    # --- request handling ---------------------------------------------------------------

    async def read_uploads(self, request: Request) -> list[Upload]:
        settings = self.settings
        content_type = request.headers.get("content-type", "")
        mime = content_type.split(";", 1)[0].strip().lower()
        body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        if not body:
            raise RequestRejected(400, "empty_body", "empty request body: send images as multipart files, JSON or an image/* body")
        if not mime:
            raise RequestRejected(415, "unsupported_media_type", "missing Content-Type header; " + _ACCEPTED)
        loop = asyncio.get_running_loop()
        if mime == "multipart/form-data":
            return await self.parse_multipart(request, body)
        if mime == "application/json" or mime.endswith("+json"):
            return await loop.run_in_executor(self.decode_pool, parse_json_body, body, settings)
        if mime.startswith("image/") or mime == "application/octet-stream":
            name = request.headers.get("x-filename") or "image"
            return [Upload(clean_name(name, 0), body)]
        raise RequestRejected(415, "unsupported_media_type", f"Content-Type {mime!r} is not accepted; " + _ACCEPTED)

    async def parse_multipart(self, request: Request, body: bytes) -> list[Upload]:
        settings = self.settings
        replayed = Request(request.scope, _replay(body))
        try:
            form = await replayed.form(max_files=settings.max_images_per_request, max_fields=64, max_part_size=1024 * 1024)
        except StarletteHTTPException as exc:
            if "Too many files" in str(exc.detail):
                raise RequestRejected(
                    413, "too_many_images",
                    f"more than max_images_per_request={settings.max_images_per_request} files in one request",
                ) from None
            raise RequestRejected(400, "malformed_multipart", f"malformed multipart body: {exc.detail}") from None
        try:
            uploads, fields = [], []
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    data = await value.read()
                    uploads.append(Upload(clean_name(value.filename or key, len(uploads)), data))
                else:
                    fields.append(key)
        finally:
            await form.close()
        if not uploads:
            found = f" (found only text fields: {', '.join(fields[:5])})" if fields else ""
            raise RequestRejected(400, "no_images", f"no files in the multipart body{found}; send images as files, e.g. -F files=@part.jpg")
        check_count(len(uploads), settings)
        return uploads

    async def prepare_all(self, uploads: list[Upload], full_size: bool = False) -> list[np.ndarray | ImageRejected]:
        """Decode every upload in the pool with the server's limits; an upload's failure is its own result.

        Sized as in training (resize rule, tiles) unless `full_size`: Grad-CAM draws on the image as sent.
        """
        loop = asyncio.get_running_loop()
        size = None if full_size else self.predictor.input_spec

        async def one(upload: Upload):
            if upload.error is not None:
                return upload.error
            try:
                return await loop.run_in_executor(self.decode_pool, prepare_image, upload.data, size, self.settings)
            except ImageRejected as exc:
                return exc
            except Exception as exc:  # a decoder bug must not turn bad input into a 500
                log.exception("unexpected error while decoding %s", upload.name)
                return ImageRejected("decode_error", f"could not be decoded ({type(exc).__name__})")

        return list(await asyncio.gather(*(one(upload) for upload in uploads)))

    async def predict(self, request: Request, threshold: float | None) -> JSONResponse:
        info = request.scope.get("keeneye.log", {"errors": []})
        try:
            uploads, prepared, probabilities = await self.predict_uploads(request, info)
        except KeeneyeError as exc:  # RequestRejected, Unavailable: answered as serving/errors.py says
            return keeneye_error_response(exc, info)
        except ModelFailed as exc:
            info["errors"].append("inference_failed")
            return error_response(500, "inference_failed", f"the model failed on this batch ({exc}); see the server log")
        return self.predictions_response(uploads, prepared, probabilities, threshold, info)

    async def predict_uploads(self, request: Request, info: dict) -> tuple[list[Upload], list, np.ndarray]:
        """Read and decode the request's images (within the body budget), then run the model on the good ones."""
        if not self.ready:
            raise Unavailable("shutting_down" if self.draining else "not_ready", "the model is not ready")
        async with self.body_budget.reserve(reservation(request, self.settings), self.settings.request_timeout_s):
            uploads = await self.read_uploads(request)
            info["n_images"] = len(uploads)
            prepared = await self.prepare_all(uploads)
        good = [item for item in prepared if isinstance(item, np.ndarray)]
        probabilities = np.empty(0, np.float32)
        if good:
            try:
                probabilities = await asyncio.wait_for(self.batcher.predict(good), self.settings.request_timeout_s)
            except asyncio.TimeoutError:
                raise Unavailable("inference_timeout", f"the model did not answer within {self.settings.request_timeout_s} s") from None
            except Unavailable:
                raise
            except Exception as exc:  # the model itself failed: a server fault, said as such
                log.error("forward pass failed", exc_info=exc)
                raise ModelFailed(type(exc).__name__) from exc
        return uploads, prepared, probabilities

    def predictions_response(self, uploads: list[Upload], prepared: list, probabilities: np.ndarray,
                             threshold: float | None, info: dict) -> JSONResponse:
        """One slot per image (probability and label, or the image's error); 422 when no image was usable."""
        bundle = self.predictor.bundle
        used = bundle.threshold if threshold is None else float(threshold)
        negative, positive = bundle.class_names
        labels = predict_labels(probabilities, used)
        results, k = [], 0
        for upload, item in zip(uploads, prepared):
            if isinstance(item, ImageRejected):
                results.append({"name": upload.name, "probability": None, "label": None, "threshold": used,
                                "error": {"code": item.code, "message": item.message}})
                info["errors"].append(item.code)
            else:
                results.append({"name": upload.name, "probability": float(probabilities[k]),
                                "label": positive if labels[k] else negative, "threshold": used, "error": None})
                k += 1
        n_ok = len(probabilities)
        info["n_failed"] = n_failed = len(uploads) - n_ok
        self.images_ok += n_ok
        self.images_failed += n_failed
        body = {"results": results, "n_images": len(uploads), "n_ok": n_ok, "n_failed": n_failed,
                "positive_class": positive, "model": self.bundle_name}
        if not n_ok:
            reasons = "; ".join(f"{r['name']}: {r['error']['message']}" for r in results[:5])
            more = f" (and {len(results) - 5} more)" if len(results) > 5 else ""
            body["error"] = {"code": "no_valid_images",
                             "message": f"none of the {len(results)} images could be used: {reasons}{more}"}
            return JSONResponse(body, status_code=422)
        return JSONResponse(body)

    def stats(self) -> dict:
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "ready": self.ready,
            "draining": self.draining,
            "engine": self.predictor.engine_name if self.predictor else None,
            "batching": self.batching,
            "responses_by_status": {str(k): v for k, v in sorted(self.status_counts.items())},
            "images_predicted": self.images_ok,
            "images_rejected": self.images_failed,
            "pending_images": self.batcher.pending_images if self.batcher else 0,
            "body_bytes_reserved": self.body_budget.reserved,
            "requests_waiting_for_body_budget": self.body_budget.waiting,
            "batcher": self.batcher.stats.to_dict() if self.batcher else None,
        }


_ACCEPTED = "send multipart/form-data (image files), application/json ({\"images\": [{\"name\", \"data\": base64}]}) or an image/* body"


def _replay(body: bytes | bytearray):
    """An ASGI `receive` that hands `body` out again, in chunks (each copied only when handed out, so the
    body is not held twice), yielding to the loop between them."""
    position = 0
    started = False

    async def receive():
        nonlocal position, started
        if position < len(body) or not started:
            if started:
                await asyncio.sleep(0)
            started = True
            chunk = bytes(body[position : position + _REPLAY_CHUNK])
            position += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": position < len(body)}
        return {"type": "http.disconnect"}

    return receive


def create_app(model: str | os.PathLike | Predictor, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving a bundle folder (loaded at startup) or an already built Predictor.

    Use as `uvicorn.run(create_app("runs/x"))`, or `with TestClient(create_app(...)) as client:`
    (the `with` runs startup: model load, warm-up, batcher).
    """
    settings = settings or ServeSettings()
    service = Service(model, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="keeneye",
        version=keeneye.__version__,
        description=(
            "Binary image classification for visual inspection. POST images to /predict; each image gets "
            "its probability of the positive class, its label and the threshold used, or the reason it "
            "could not be used; POST /explain adds a Grad-CAM heat map. People can use the web page at /. "
            "See the module docstring of keeneye.serving.app for the status policy."
        ),
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc come from add_ui_routes, with their scripts served locally (offline)
        redoc_url=None,
    )
    app.state.service = service
    app.add_middleware(AccessLogMiddleware, service=service)
    add_error_handlers(app)
    add_service_routes(app, service)
    add_ui_routes(app, service, _PREDICT_BODY)  # the page at /, offline /docs and /redoc, POST /explain
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error, expected or not, answers with the JSON error body; keeneye's own through serving/errors.py."""

    @app.exception_handler(KeeneyeError)
    async def keeneye_error(request: Request, exc: KeeneyeError):
        return keeneye_error_response(exc, request.scope.get("keeneye.log"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "body"))
            parts.append(f"{where}: {error.get('msg')}")
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect):
        return error_response(400, "client_disconnected", "the client closed the connection before the body was read")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log")


def add_service_routes(app: FastAPI, service: Service) -> None:
    """/health, /ready, /metadata, /stats and POST /predict."""

    @app.get("/health", summary="Liveness")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: model loaded, batcher running, not shutting down")
    async def ready():
        if service.ready and service.batcher is not None and service.batcher.alive:
            return {"ready": True, "model": service.bundle_name, "engine": service.predictor.engine_name}
        reason = "shutting down" if service.draining else "model not loaded" if not service.ready else "batcher stopped"
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)

    @app.get("/metadata", summary="Bundle metadata (no paths) and serving settings")
    async def metadata():
        if service.predictor is None:
            return error_response(503, "not_ready", "the model is not loaded yet")
        predictor = service.predictor
        body = public_metadata(predictor.bundle.metadata)
        body["serving"] = {
            "bundle": service.bundle_name, "engine": predictor.engine_name,
            "image_size": predictor.bundle.image_size, "threshold": predictor.bundle.threshold, "batching": service.batching,
            "settings": service.settings.model_dump(mode="json"),
        }
        return body

    @app.get("/stats", summary="Request and batching counters")
    async def stats():
        return service.stats()

    @app.post("/predict", summary="Predict one or several images", response_model=None, responses=_PREDICT_RESPONSES,
              openapi_extra={"requestBody": _PREDICT_BODY})
    async def predict(
        request: Request,
        threshold: Optional[float] = Query(None, ge=0.0, le=1.0, description="Decision threshold for this request (default: the bundle's)."),
    ):
        return await service.predict(request, threshold)


_PREDICT_RESPONSES = {
    200: {"model": PredictResponse, "description": "At least one image predicted; failed images carry `error`."},
    400: {"model": ErrorResponse, "description": "Empty body, malformed or too deeply nested JSON, malformed multipart, no images."},
    408: {"model": ErrorResponse, "description": "The body did not arrive within body_timeout_s."},
    413: {"model": ErrorResponse, "description": "Body too large or too many images."},
    415: {"model": ErrorResponse, "description": "Unsupported Content-Type."},
    422: {"model": ErrorResponse, "description": "No image could be used (per-image reasons in `results`), or JSON of the wrong shape."},
    503: {"model": ErrorResponse, "description": "Shutting down, overloaded or model timeout; retry."},
}
