"""keeneye's one error hierarchy: errors caused by the user's input or environment, not by a bug.

Every class says how the command line ends (`exit_code`, read in one place: `cli.KeeneyeGroup`)
and carries a stable `code` for programs; the REST service turns them into HTTP answers in one
place too (`serving/errors.py`). The CLI prints the message without a traceback.

    KeeneyeError                 exit 1   anything keeneye can explain
    ├── ConfigError              exit 2   config file or override missing, malformed, invalid
    ├── DataError                exit 2   data folder or manifest unusable as it is
    ├── DecodeError              exit 2   one file is not a usable image (data/decode.py)
    ├── WeightsError             exit 2   backbone weights missing or unreadable
    ├── BundleError              exit 2   model bundle missing, incomplete, unreadable
    ├── EngineError              exit 2   inference engine unavailable or unusable (inference/engines.py)
    ├── ExportError              exit 2   export impossible as asked (inference/export.py)
    │   └── ExportVerificationError exit 3  the export disagrees with model.keras
    ├── RayError                 exit 2   Ray missing or unreachable (inference/distributed.py)
    └── ServiceError             exit 1   a REST request cannot be served (serving/)
        ├── RequestRejected               the whole request is unusable (its own HTTP status)
        ├── ImageRejected                 one image of a request is unusable
        └── Unavailable                   the service cannot take the request now (serving/batcher.py)
"""

from __future__ import annotations


class KeeneyeError(Exception):
    """Base for errors caused by the user's input or environment, not by a bug."""

    exit_code = 1
    code = "error"


class ConfigError(KeeneyeError):
    """The config file or an override is missing, malformed or invalid."""

    exit_code = 2
    code = "invalid_config"


class DataError(KeeneyeError):
    """The data folder or manifest cannot be used as it is (wrong layout, too many bad files)."""

    exit_code = 2
    code = "invalid_data"


class WeightsError(KeeneyeError):
    """The backbone's pretrained weights could not be found or loaded."""

    exit_code = 2
    code = "weights_unavailable"


class BundleError(KeeneyeError):
    """A model bundle is missing, incomplete or unreadable."""

    exit_code = 2
    code = "invalid_bundle"


class ServiceError(KeeneyeError):
    """A REST request cannot be served; `code` is stable for programs, `message` is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
