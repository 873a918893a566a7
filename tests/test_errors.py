"""One error hierarchy (issue #10): every error meant for the user is a KeeneyeError; the CLI turns
it into an exit code in one place, the REST service into an HTTP answer in one place."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import keeneye.runs
from keeneye.cli import app
from keeneye.data.decode import DecodeError, decode_image_bytes
from keeneye.errors import BundleError, ConfigError, DataError, KeeneyeError, ServiceError, WeightsError
from keeneye.inference.engines import EngineError
from keeneye.inference.export import ExportError, ExportVerificationError
from keeneye.serving.app import add_error_handlers
from keeneye.serving.batcher import Unavailable
from keeneye.serving.errors import http_status, keeneye_error_response
from keeneye.serving.inputs import ImageRejected, RequestRejected


@pytest.mark.parametrize("kind, exit_code", [
    (ConfigError, 2), (DataError, 2), (DecodeError, 2), (WeightsError, 2), (BundleError, 2), (EngineError, 2),
    (ExportError, 2), (ExportVerificationError, 3), (Unavailable, 1), (ImageRejected, 1), (RequestRejected, 1),
])
def test_every_user_error_is_a_keeneye_error_with_its_exit_code(kind: type, exit_code: int) -> None:
    assert issubclass(kind, KeeneyeError)
    assert kind.exit_code == exit_code


def test_a_decode_failure_is_caught_as_a_keeneye_error() -> None:
    with pytest.raises(KeeneyeError) as caught:
        decode_image_bytes(b"definitely not an image", 32)
    assert isinstance(caught.value, DecodeError) and caught.value.reason == str(caught.value)


class Odd(KeeneyeError):
    exit_code = 7


@pytest.mark.parametrize("error, exit_code", [(Odd("seven"), 7), (DecodeError("truncated JPEG"), 2), (Unavailable("busy", "later"), 1)])
def test_the_cli_maps_any_keeneye_error_to_its_exit_code(monkeypatch, error: KeeneyeError, exit_code: int) -> None:
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(keeneye.runs, "compare_runs", fail)
    result = CliRunner().invoke(app, ["runs", "compare", "a", "b"])
    assert result.exit_code == exit_code, result.output
    assert f"error: {error}" in result.stderr and "Traceback" not in result.output


def test_the_cli_leaves_bugs_alone(monkeypatch) -> None:
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(keeneye.runs, "compare_runs", bug)
    result = CliRunner().invoke(app, ["runs", "compare", "a", "b"])
    assert isinstance(result.exception, ZeroDivisionError)


@pytest.mark.parametrize("error, status, headers", [
    (RequestRejected(413, "too_many_images", "too many", {"X-Limit": "32"}), 413, {"X-Limit": "32"}),
    (Unavailable("overloaded", "too much work queued"), 503, {"Retry-After": "1"}),
    (ImageRejected("decode_error", "not an image"), 422, {}),
    (ConfigError("bad threshold"), 422, {}),
    (DecodeError("truncated PNG"), 422, {}),
    (BundleError("no model.keras"), 503, {}),
    (Odd("odd"), 500, {}),
])
def test_serving_maps_errors_to_http_statuses(error: KeeneyeError, status: int, headers: dict) -> None:
    assert http_status(error) == (status, headers)
    info: dict = {"errors": []}
    response = keeneye_error_response(error, info)
    assert response.status_code == status
    assert info["errors"] == [error.code]


def test_a_keeneye_error_raised_in_a_route_gets_the_json_error_body() -> None:
    service = FastAPI()
    add_error_handlers(service)

    @service.get("/busy")
    async def busy():
        raise Unavailable("overloaded", "too much work queued")

    @service.get("/broken")
    async def broken():
        raise BundleError("the bundle has no model.keras")

    with TestClient(service) as client:
        answer = client.get("/busy")
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert answer.json() == {"error": {"code": "overloaded", "message": "too much work queued"}}
        answer = client.get("/broken")
        assert answer.status_code == 503
        assert answer.json() == {"error": {"code": "invalid_bundle", "message": "the bundle has no model.keras"}}


def test_service_errors_carry_code_and_message() -> None:
    for error in (ImageRejected("too_large", "over 16 MiB"), Unavailable("not_ready", "the model is not ready"),
                  RequestRejected(415, "unsupported_media_type", "send images")):
        assert isinstance(error, ServiceError) and error.code and error.message == str(error)
