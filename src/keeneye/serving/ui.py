"""What a person sees in a browser: the inspection page at `/`, offline API docs, Grad-CAM heat maps.

    GET  /          the inspection page (static/index.html, app.js, style.css; package data, no CDN).
                    It only calls the JSON API: /metadata, /predict and /explain.
    GET  /docs      Swagger UI, GET /redoc ReDoc: their scripts come from the `fastapi-offline`
                    package (served under /docs-assets/), so the docs render without a network.
    POST /explain   like /predict (same bodies, limits and per-image errors), and each usable image
                    also gets `heatmap`: a PNG data URL of its Grad-CAM overlay (keeneye.explain), or for
                    a one-class bundle its anomaly-map overlay (keeneye.inference.anomaly).
                    Run on the model thread, one request at a time, like the forward passes.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.resources
import logging
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from keeneye.errors import BundleError, KeeneyeError
from keeneye.serving.batcher import Unavailable
from keeneye.serving.errors import error_response, keeneye_error_response
from keeneye.serving.inputs import ImageRejected
from keeneye.serving.limits import reservation

log = logging.getLogger("keeneye.serving")

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: The fastapi-offline package ships Swagger UI and ReDoc builds (swagger-ui-bundle.js, swagger-ui.css,
#: redoc.standalone.js, favicon.png); FastAPI's own /docs would load them from a CDN.
DOCS_ASSETS_PACKAGE = "fastapi_offline"


def docs_assets_dir() -> Path:
    """Folder of the packaged Swagger UI / ReDoc files."""
    return Path(str(importlib.resources.files(DOCS_ASSETS_PACKAGE) / "static"))


def png_data_url(image: np.ndarray) -> str:
    """An RGB uint8 image as a `data:image/png;base64,...` URL (what an <img src> takes)."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB array
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


class Explainer:
    """Grad-CAM on the service's Keras model, built on first use, always called on the model thread."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.cam = None

    def __call__(self, images: list[np.ndarray], names: list[str], threshold: float) -> list[dict]:
        from keeneye.explain import GradCam, explain_decoded, with_probabilities
        from keeneye.inference.anomaly import anomaly_overlays, has_anomaly_feature, is_anomaly_bundle, stacked_explanation
        from keeneye.model.gradcam import MAX_OVERLAY_SIDE, fit_display

        bundle = self.service.predictor.bundle
        if is_anomaly_bundle(bundle):  # one-class bundle: the anomaly map (patch distances to the good ones)
            explained = anomaly_overlays(self.service.predictor.engine, images, bundle.image_size, bundle.class_names, threshold)
            return [{"probability": item.probability, "label": item.label, "heatmap": png_data_url(item.overlay),
                     "one_class_heatmap": None, "tile": None} for item in explained]
        if self.cam is None:
            self.cam = GradCam(bundle.keras_model())  # an ONNX predictor's bundle may not hold it yet
        explained = explain_decoded(self.cam, images, threshold, bundle.class_names, names, spec=bundle.input_spec)
        one_class = [None] * len(explained)
        if has_anomaly_feature(bundle):  # Grad-CAM is the head's view; the probability also holds the one-class score
            spec, engine = bundle.input_spec, self.service.predictor.engine  # one patch pass: probability and map
            parts = [stacked_explanation(engine, spec, threshold, spec.prepare(image), fit_display(image, MAX_OVERLAY_SIDE))
                     for image in images]
            explained = with_probabilities(explained, [p for p, _ in parts], threshold, bundle.class_names)
            one_class = [png_data_url(overlay) for _, overlay in parts]
        return [{"probability": item.probability, "label": item.label, "heatmap": png_data_url(item.overlay),
                 "one_class_heatmap": part, "tile": item.tile} for item, part in zip(explained, one_class)]


async def explain_request(service: Any, explainer: Explainer, request: Request, threshold: float | None) -> JSONResponse:
    """POST /explain: per-image probability, label and Grad-CAM overlay, or the image's error."""
    info = request.scope.get("keeneye.log", {"errors": []})
    if not service.ready:
        return keeneye_error_response(Unavailable("shutting_down" if service.draining else "not_ready", "the model is not ready"), info)
    try:  # the body is held within the server's shared memory budget until its images are decoded, as for /predict
        async with service.body_budget.reserve(reservation(request, service.settings), service.settings.request_timeout_s):
            uploads = await service.read_uploads(request)
            info["n_images"] = len(uploads)
            decoded = await service.prepare_all(uploads, full_size=True)
    except KeeneyeError as exc:  # RequestRejected, Unavailable: answered as serving/errors.py says
        return keeneye_error_response(exc, info)
    good = [(upload.name, item) for upload, item in zip(uploads, decoded) if isinstance(item, np.ndarray)]
    bundle = service.predictor.bundle
    used = bundle.threshold if threshold is None else float(threshold)
    explained: list[dict] = []
    if good:
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(service.model_pool, explainer, [image for _, image in good], [name for name, _ in good], used)
        try:
            explained = await asyncio.wait_for(work, service.settings.request_timeout_s)
        except asyncio.TimeoutError:
            timeout = Unavailable("inference_timeout", f"the model did not answer within {service.settings.request_timeout_s} s")
            return keeneye_error_response(timeout, info)
        except BundleError as exc:  # Grad-CAM cannot read this bundle's model (not a keeneye classifier): say so, not 500
            info["errors"].append("explain_unsupported")
            return error_response(501, "explain_unsupported", f"no heat map for this model: {exc} Use POST /predict.")
        except Exception as exc:
            log.error("Grad-CAM failed", exc_info=exc)
            info["errors"].append("explain_failed")
            return error_response(500, "explain_failed", f"the heat map could not be computed ({type(exc).__name__}); see the server log")
    results, k = [], 0
    for upload, item in zip(uploads, decoded):
        if isinstance(item, ImageRejected):
            info["errors"].append(item.code)
            results.append({"name": upload.name, "probability": None, "label": None, "threshold": used, "heatmap": None, "one_class_heatmap": None, "tile": None,
                            "error": {"code": item.code, "message": item.message}})
        else:
            results.append({"name": upload.name, **explained[k], "threshold": used, "error": None})
            k += 1
    info["n_failed"] = len(uploads) - len(good)
    body = {"results": results, "n_images": len(uploads), "n_ok": len(good), "n_failed": len(uploads) - len(good),
            "positive_class": bundle.positive_class, "model": service.bundle_name}
    if not good:
        body["error"] = {"code": "no_valid_images", "message": f"none of the {len(results)} images could be used"}
        return JSONResponse(body, status_code=422)
    return JSONResponse(body)


def add_ui_routes(app: FastAPI, service: Any, request_body: dict | None = None) -> None:
    """The page, its static files, offline /docs and /redoc, and POST /explain (create it with docs_url=None)."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/docs-assets", StaticFiles(directory=docs_assets_dir()), name="docs-assets")
    explainer = Explainer(service)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request):
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - API docs",
            swagger_js_url=root + "/docs-assets/swagger-ui-bundle.js", swagger_css_url=root + "/docs-assets/swagger-ui.css",
            swagger_favicon_url=root + "/docs-assets/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request):
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - API reference",
            redoc_js_url=root + "/docs-assets/redoc.standalone.js", redoc_favicon_url=root + "/docs-assets/favicon.png",
            with_google_fonts=False,
        )

    @app.post(
        "/explain", summary="Predict images and draw where the model looked (Grad-CAM)", response_model=None,
        responses={200: {"description": "Like /predict; each usable image also has `heatmap`, a PNG data URL of its overlay."},
                   422: {"description": "No image could be used (reasons per image)."}},
        openapi_extra={"requestBody": request_body} if request_body else None,
    )
    async def explain(
        request: Request,
        threshold: Optional[float] = Query(None, ge=0.0, le=1.0, description="Decision threshold for this request (default: the bundle's)."),
    ):
        return await explain_request(service, explainer, request, threshold)
