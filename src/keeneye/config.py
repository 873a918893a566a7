"""The run configuration (``config.json``): schema, loading, ``--set`` overrides and error messages.

One rule for paths: a relative path in the config (or in a ``--set`` override) is resolved against
the folder that holds the config file, never against the current working directory. After
loading, every path in the :class:`Config` is absolute.

Every problem is reported as a single :class:`~keeneye.errors.ConfigError` whose message names the
file, the key (dotted, e.g. ``training.epochs``), the offending value and what was expected; when
several keys are wrong they are all listed, one per line.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Type, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from keeneye.errors import ConfigError

__all__ = [
    "ModelConfig",
    "HeadConfig",
    "TrainingConfig",
    "EvaluationConfig",
    "Config",
    "load_config",
    "config_from_dict",
    "save_config",
    "config_json_schema",
    "parse_override",
]

ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
WEIGHTS_KEYWORDS = ("imagenet", "none")
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_RELATIVE_NOTE = "relative paths are resolved against the config file's folder"


# --------------------------------------------------------------------------------------------
# Field metadata used only for error messages (pydantic ignores unknown Annotated metadata).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Expect:
    """What a field accepts, in words, for error messages.

    ``kinds`` are the JSON kinds the field accepts ("string", "integer", "number", "boolean",
    "null", "list", "object"); when the given value is of another kind, the message says so.
    ``item`` is the expectation for one element of a list field.
    """

    text: str
    kinds: Tuple[str, ...]
    item: Optional[str] = None


def _reject_bool(value: Any) -> Any:
    # Literal[1.0, ...] would accept True (True == 1 == 1.0); JSON booleans are never numbers here.
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "a boolean is not a number")
    return value


def _reject_empty_path(value: Any) -> Any:
    # Path("") is ".", which would silently mean "the config file's folder".
    if isinstance(value, str) and value.strip() == "":
        raise PydanticCustomError("path_empty", "is an empty path")
    return value


StrictInt = Annotated[int, Strict()]
StrictFloat = Annotated[float, Strict()]  # strict float still accepts int, rejects bool and str
StrictStr = Annotated[str, Strict()]
Alpha = Annotated[Literal[0.35, 0.5, 0.75, 1.0, 1.3, 1.4], BeforeValidator(_reject_bool)]


# --------------------------------------------------------------------------------------------
# Path helpers (validation context carries the folder relative paths are resolved against)
# --------------------------------------------------------------------------------------------


def _base_dir(info: ValidationInfo) -> Path:
    ctx = info.context if isinstance(info.context, Mapping) else {}
    base = ctx.get("base_dir")
    return Path(base) if base is not None else Path.cwd()


def _resolve(value: Union[str, os.PathLike], base_dir: Path) -> Path:
    p = Path(os.path.expanduser(os.fspath(value)))
    if not p.is_absolute():
        p = Path(base_dir) / p
    return Path(os.path.abspath(p))


# --------------------------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------------------------

_FORBID = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=False)


class ModelConfig(BaseModel):
    """The backbone network."""

    model_config = _FORBID

    backbone: Annotated[
        Literal["mobilenet_v2"],
        Field(description='The pretrained backbone that extracts image features. Only "mobilenet_v2" is supported.'),
        _Expect('"mobilenet_v2"', ("string",)),
    ] = "mobilenet_v2"
    alpha: Annotated[
        Alpha,
        Field(
            description=(
                "MobileNetV2 width multiplier: smaller is faster and less accurate, larger is slower and more "
                "accurate. ImageNet weights exist for every value; keeneye loads the alpha's 224 px no-top "
                "file for any image_size."
            )
        ),
        _Expect("one of 0.35, 0.5, 0.75, 1.0, 1.3, 1.4", ("integer", "number")),
    ] = 1.0
    image_size: Annotated[
        StrictInt,
        Field(
            ge=32,
            le=1024,
            description=(
                "Side length in pixels of the square images fed to the network (every image is resized to "
                "image_size x image_size). ImageNet weights were trained at 96, 128, 160, 192 and 224; other "
                "sizes work but start from the 224 weights."
            ),
        ),
        _Expect("an integer from 32 to 1024", ("integer",)),
    ] = 224
    weights: Annotated[
        StrictStr,
        Field(
            description=(
                'Initial backbone weights: "imagenet" (the Keras ImageNet weights), "none" (random '
                "initialisation, rarely what you want), or the path of a .h5 / .weights.h5 file, which must "
                f"exist ({_RELATIVE_NOTE}; stored absolute)."
            )
        ),
        _Expect('"imagenet", "none" or the path of an existing .h5 / .weights.h5 file', ("string",)),
    ] = "imagenet"

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, value: str, info: ValidationInfo) -> str:
        if value in WEIGHTS_KEYWORDS:
            return value
        if value.strip() == "":
            raise PydanticCustomError("path_empty", "is an empty path")
        resolved = _resolve(value, _base_dir(info))
        if not resolved.exists():
            raise PydanticCustomError(
                "path_not_found",
                "resolved to {resolved}, which does not exist",
                {"resolved": str(resolved)},
            )
        if not resolved.is_file():
            raise PydanticCustomError(
                "path_not_file",
                "resolved to {resolved}, which is a directory, not a file",
                {"resolved": str(resolved)},
            )
        if not resolved.name.lower().endswith(".h5"):
            raise PydanticCustomError(
                "weights_not_h5",
                "resolved to {resolved}, which is not a .h5 / .weights.h5 file",
                {"resolved": str(resolved)},
            )
        return str(resolved)


class HeadConfig(BaseModel):
    """The small classifier trained on top of the backbone's features."""

    model_config = _FORBID

    dense_units: Annotated[
        List[Annotated[StrictInt, Field(ge=1)]],
        Field(
            description=(
                "Sizes of the hidden dense (ReLU) layers between the backbone features and the output, in order, "
                "e.g. [128] or [256, 64]. An empty list [] means no hidden layer: logistic regression on the "
                "features."
            )
        ),
        _Expect("a list of integers >= 1, e.g. [128] or [256, 64] ([] for none)", ("list",), item="an integer >= 1"),
    ] = Field(default_factory=lambda: [128])
    dropout: Annotated[
        StrictFloat,
        Field(
            ge=0,
            lt=1,
            description=(
                "Dropout rate applied before each dense layer of the head during training (0 disables dropout)."
            ),
        ),
        _Expect("a number >= 0 and < 1", ("integer", "number")),
    ] = 0.2


class TrainingConfig(BaseModel):
    """How the head is trained."""

    model_config = _FORBID

    epochs: Annotated[
        StrictInt,
        Field(ge=1, description="Maximum number of passes over the training images (early stopping may end sooner)."),
        _Expect("an integer >= 1", ("integer",)),
    ] = 50
    batch_size: Annotated[
        StrictInt,
        Field(ge=1, description="Number of images per training step."),
        _Expect("an integer >= 1", ("integer",)),
    ] = 32
    learning_rate: Annotated[
        StrictFloat,
        Field(gt=0, description="Learning rate of the optimizer (Adam), e.g. 0.001."),
        _Expect("a number > 0, e.g. 0.001", ("integer", "number")),
    ] = 1e-3
    validation_fraction: Annotated[
        StrictFloat,
        Field(
            ge=0,
            lt=0.9,
            description=(
                "Fraction of the images held out, per class, for validation (early stopping and choosing the "
                "decision threshold). 0 holds out nothing."
            ),
        ),
        _Expect("a number >= 0 and < 0.9, e.g. 0.15", ("integer", "number")),
    ] = 0.15
    seed: Annotated[
        StrictInt,
        Field(description="Random seed for the train/validation split, shuffling and weight initialisation."),
        _Expect("an integer", ("integer",)),
    ] = 42
    early_stopping_patience: Annotated[
        StrictInt,
        Field(
            ge=0,
            description=(
                "Stop training after this many epochs without improvement of the validation loss, keeping the "
                "best weights. 0 disables early stopping."
            ),
        ),
        _Expect("an integer >= 0", ("integer",)),
    ] = 5
    class_weight: Annotated[
        Literal["none", "balanced"],
        Field(
            description=(
                '"balanced" weights each class inversely to its number of training images (useful when defects '
                'are rare); "none" weights every image equally.'
            )
        ),
        _Expect('"none" or "balanced"', ("string",)),
    ] = "none"


class EvaluationConfig(BaseModel):
    """How the decision threshold is chosen and the model is evaluated."""

    model_config = _FORBID

    threshold: Annotated[
        Union[Literal["auto"], Annotated[StrictFloat, Field(gt=0, lt=1)]],
        Field(
            description=(
                "Probability above which an image is called positive. \"auto\" chooses it on the validation "
                "images (falling back to 0.5 when there are too few, see min_validation_per_class); a number "
                "strictly between 0 and 1 fixes it."
            )
        ),
        _Expect('"auto" or a number strictly between 0 and 1, e.g. 0.5', ("string", "number")),
    ] = "auto"
    min_validation_per_class: Annotated[
        StrictInt,
        Field(
            ge=1,
            description=(
                'With threshold "auto": the fewest validation images each class needs for the threshold to be '
                "tuned; with fewer, the threshold falls back to 0.5."
            ),
        ),
        _Expect("an integer >= 1", ("integer",)),
    ] = 5


class Config(BaseModel):
    """A keeneye run configuration (config.json). Relative paths are resolved against the config file's folder."""

    model_config = _FORBID

    data_folder_path: Annotated[
        Path,
        BeforeValidator(_reject_empty_path),
        Field(
            description=(
                "Required. The folder of training images, with one sub-folder per class (exactly two classes), "
                f"e.g. data/ok and data/defect. Must exist; {_RELATIVE_NOTE} (also for --set), and it is "
                "stored absolute."
            )
        ),
        _Expect("the path of an existing folder with one sub-folder of images per class", ("string",)),
    ]
    positive_class: Annotated[
        Optional[Annotated[StrictStr, Field(min_length=1)]],
        Field(
            description=(
                'Name of the class sub-folder that counts as positive (e.g. "defect"): the model outputs the '
                "probability of this class. null lets keeneye decide from the folder names; set it to be explicit."
            )
        ),
        _Expect("the name of a class sub-folder, or null", ("string", "null")),
    ] = None
    max_dropped_fraction: Annotated[
        StrictFloat,
        Field(
            ge=0,
            le=1,
            description=(
                "Largest fraction of image files that may be skipped as unreadable or corrupt before the run "
                "stops with an error (0 tolerates none, 1 tolerates any number)."
            ),
        ),
        _Expect("a number from 0 to 1, e.g. 0.05", ("integer", "number")),
    ] = 0.05
    output_dir: Annotated[
        Path,
        BeforeValidator(_reject_empty_path),
        Field(
            description=(
                "Folder under which each run writes its own sub-folder (model bundle, metrics, plots). Created if "
                f"missing; {_RELATIVE_NOTE}; stored absolute."
            )
        ),
        _Expect("a folder path (it need not exist yet)", ("string",)),
    ] = Path("runs")
    run_name: Annotated[
        Optional[StrictStr],
        Field(
            description=(
                "Name of this run's folder under output_dir; only letters, digits, '.', '_' and '-' "
                "([A-Za-z0-9._-]). null: a name is generated when the run starts."
            )
        ),
        _Expect("a folder name of letters, digits, '.', '_' and '-' only, or null", ("string", "null")),
    ] = None
    cache_dir: Annotated[
        Optional[Path],
        BeforeValidator(_reject_empty_path),
        Field(
            description=(
                "Folder for the cache of backbone embeddings, which makes re-training on the same images "
                f"faster; entries are keyed by image content, backbone, weights and input size. null: the default "
                "folder ($KEENEYE_CACHE_DIR, else ~/.cache/keeneye). Created if missing; "
                f"{_RELATIVE_NOTE}; stored absolute."
            )
        ),
        _Expect("a folder path (it need not exist yet), or null", ("string", "null")),
    ] = None
    model: Annotated[
        ModelConfig,
        Field(description="The backbone network (an object)."),
        _Expect("an object", ("object",)),
    ] = Field(default_factory=ModelConfig)
    head: Annotated[
        HeadConfig,
        Field(description="The classifier head trained on the backbone's features (an object)."),
        _Expect("an object", ("object",)),
    ] = Field(default_factory=HeadConfig)
    training: Annotated[
        TrainingConfig,
        Field(description="Training settings (an object)."),
        _Expect("an object", ("object",)),
    ] = Field(default_factory=TrainingConfig)
    evaluation: Annotated[
        EvaluationConfig,
        Field(description="Threshold and evaluation settings (an object)."),
        _Expect("an object", ("object",)),
    ] = Field(default_factory=EvaluationConfig)

    _config_path: Optional[Path] = PrivateAttr(default=None)

    @property
    def config_path(self) -> Optional[Path]:
        """Absolute path of the file this config was loaded from (None when built from a dict)."""
        return self._config_path

    @config_path.setter
    def config_path(self, value: Optional[Union[str, os.PathLike]]) -> None:
        self._config_path = None if value is None else Path(os.path.abspath(os.fspath(value)))

    @model_validator(mode="before")
    @classmethod
    def _drop_schema_key(cls, data: Any) -> Any:
        # Editors put "$schema" at the top of the file to find the JSON Schema; it is not a setting.
        if isinstance(data, dict) and "$schema" in data:
            data = {k: v for k, v in data.items() if k != "$schema"}
        return data

    @field_validator("data_folder_path")
    @classmethod
    def _check_data_folder(cls, value: Path, info: ValidationInfo) -> Path:
        resolved = _resolve(value, _base_dir(info))
        if not resolved.exists():
            raise PydanticCustomError(
                "path_not_found", "resolved to {resolved}, which does not exist", {"resolved": str(resolved)}
            )
        if not resolved.is_dir():
            raise PydanticCustomError(
                "path_not_dir",
                "resolved to {resolved}, which is a file, not a folder",
                {"resolved": str(resolved)},
            )
        return resolved

    @field_validator("output_dir", "cache_dir")
    @classmethod
    def _check_out_dir(cls, value: Optional[Path], info: ValidationInfo) -> Optional[Path]:
        if value is None:
            return None
        resolved = _resolve(value, _base_dir(info))
        if resolved.exists() and not resolved.is_dir():
            raise PydanticCustomError(
                "path_not_dir",
                "resolved to {resolved}, which exists and is a file, not a folder",
                {"resolved": str(resolved)},
            )
        return resolved

    @field_validator("run_name")
    @classmethod
    def _check_run_name(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        if not _RUN_NAME_RE.match(value) or value in (".", ".."):
            raise PydanticCustomError("run_name", "is not a safe folder name")
        return value

    @model_validator(mode="after")
    def _resolve_defaults(self, info: ValidationInfo) -> "Config":
        # Defaults are not validated, so make the default output_dir absolute here as well.
        if not self.output_dir.is_absolute():
            self.output_dir = _resolve(self.output_dir, _base_dir(info))
        return self


# --------------------------------------------------------------------------------------------
# Schema introspection helpers
# --------------------------------------------------------------------------------------------


def _section_model(annotation: Any) -> Optional[Type[BaseModel]]:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _expect_of(model: Type[BaseModel], name: str) -> Optional[_Expect]:
    field = model.model_fields.get(name)
    if field is None:
        return None
    for meta in field.metadata:
        if isinstance(meta, _Expect):
            return meta
    return None


def _all_keys() -> List[str]:
    keys = []
    for name, field in Config.model_fields.items():
        sub = _section_model(field.annotation)
        keys.append(name)
        if sub is not None:
            keys.extend(f"{name}.{k}" for k in sub.model_fields)
    return keys


def _model_at(section: Tuple[str, ...]) -> Optional[Type[BaseModel]]:
    model: Optional[Type[BaseModel]] = Config
    for part in section:
        if model is None or part not in model.model_fields:
            return None
        model = _section_model(model.model_fields[part].annotation)
    return model


# --------------------------------------------------------------------------------------------
# Turning pydantic errors into one readable message
# --------------------------------------------------------------------------------------------

_MISSING = object()
_PATH_ERRORS = frozenset({"path_empty", "path_not_found", "path_not_file", "path_not_dir", "weights_not_h5"})


def _show(value: Any) -> str:
    """A value as it would be written in JSON."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return text


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, os.PathLike):
        return "string"
    return type(value).__name__


_KIND_WORDS = {
    "null": "null",
    "boolean": "a boolean",
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "list": "a list",
    "object": "an object",
}


def _lookup(data: Any, loc: Sequence[Any]) -> Any:
    for part in loc:
        if isinstance(data, dict) and isinstance(part, str) and part in data:
            data = data[part]
        elif isinstance(data, (list, tuple)) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return _MISSING
    return data


def _loc_to_key(loc: Sequence[Any]) -> Tuple[Tuple[Any, ...], str, Optional[_Expect], bool]:
    """Map a pydantic error location to (data path, dotted key, field expectation, is_item)."""
    model: Optional[Type[BaseModel]] = Config
    path: List[Any] = []
    expect: Optional[_Expect] = None
    is_item = False
    for part in loc:
        if model is not None and isinstance(part, str) and part in model.model_fields:
            path.append(part)
            expect = _expect_of(model, part)
            model = _section_model(model.model_fields[part].annotation)
        elif model is None and isinstance(part, int):
            path.append(part)
            is_item = True
        elif model is None:
            continue  # union branch tags such as "literal['auto']" or "constrained-float"
        else:
            path.append(part)  # an unknown key (extra_forbidden)
            expect = None
    key = ""
    for part in path:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return tuple(path), key, expect, is_item


def _suggest_key(section: Tuple[str, ...], name: str) -> str:
    """'did you mean ...?' for an unknown key, or the list of valid keys in its section."""
    model = _model_at(section)
    prefix = ".".join(section) + "." if section else ""
    where = f"'{'.'.join(section)}'" if section else "the top level"
    valid = list(model.model_fields) if model is not None else []
    lowered = {v.lower(): v for v in valid}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    if close:
        return f"did you mean '{prefix}{lowered[close[0]]}'?"
    # A key that belongs to another section, e.g. top-level "epochs" -> "training.epochs".
    elsewhere = [k for k in _all_keys() if k.rsplit(".", 1)[-1].lower() == name.lower() and k != prefix + name]
    if elsewhere:
        return f"did you mean '{elsewhere[0]}'?"
    return f"valid keys in {where} are: {', '.join(valid)}"


def _override_for(key_path: Tuple[Any, ...], origins: Mapping[Tuple[str, ...], str]) -> Optional[str]:
    """The --set override that produced the value at key_path (or one of its parents/children)."""
    str_path = tuple(p for p in key_path if isinstance(p, str))
    best = None
    for opath, text in origins.items():
        n = min(len(opath), len(str_path))
        if opath[:n] == str_path[:n]:
            best = text
    return best


def _format_error(err: Mapping[str, Any], data: Any, origins: Mapping[Tuple[str, ...], str]) -> Tuple[str, str]:
    """One error -> (dotted key, 'key: problem' line)."""
    etype = err["type"]
    path, key, expect, is_item = _loc_to_key(err["loc"])
    origin = _override_for(path, origins)
    label = key or "(top level)"
    if origin is not None:
        label += f" (from --set {origin})"

    if etype == "extra_forbidden":
        section = tuple(p for p in path[:-1] if isinstance(p, str))
        return key, f"{label}: unknown key; {_suggest_key(section, str(path[-1]))}"

    if etype == "missing":
        expected = expect.text if expect else "a value"
        return key, f"{label}: required key is missing; expected {expected} ({_RELATIVE_NOTE})"

    value = _lookup(data, path)
    shown = _show(value) if value is not _MISSING else _show(err.get("input"))

    if etype == "run_name":
        return key, f"{label}: {shown} {err['msg']}; expected {expect.text if expect else 'a folder name'}"
    if etype in _PATH_ERRORS:
        expected = expect.text if expect else "an existing path"
        return key, f"{label}: {shown} {err['msg']}; expected {expected} ({_RELATIVE_NOTE})"

    if is_item and expect is not None and expect.item:
        expected = expect.item
        kinds: Tuple[str, ...] = ("integer",)
    elif expect is not None:
        expected = expect.text
        kinds = expect.kinds
        section = _model_at(tuple(p for p in path if isinstance(p, str)))
        if section is not None:
            expected = f"an object with any of the keys {', '.join(section.model_fields)}"
    else:  # not expected to happen; fall back to pydantic's own words
        return key, f"{label}: {err['msg']}, got {shown}"
    kind = _kind(value if value is not _MISSING else err.get("input"))
    suffix = ""
    if kind not in kinds and not (kind == "integer" and "number" in kinds):
        words = "not a whole number" if kind == "number" and "integer" in kinds else _KIND_WORDS.get(kind, kind)
        suffix = f" ({words})"
    line = f"{label}: expected {expected}, got {shown}{suffix}"
    if origin is not None and "string" in kinds and kind in ("integer", "number", "boolean", "null") and suffix:
        # --set parses values as JSON; say how to pass a string that looks like JSON.
        name, _, raw = origin.partition("=")
        line += f"; to pass it as a string, quote it: --set '{name}=\"{raw}\"'"
    return key, line


def _validation_message(
    exc: ValidationError, data: Any, source: str, origins: Mapping[Tuple[str, ...], str]
) -> str:
    lines: List[str] = []
    seen: set = set()
    for err in exc.errors(include_url=False):
        key, line = _format_error(err, data, origins)
        if key in seen:  # each branch of a union (e.g. evaluation.threshold) reports the key again
            continue
        seen.add(key)
        lines.append(line)
    if len(lines) == 1:
        return f"{source}: {lines[0]}"
    return f"{source}: {len(lines)} problems:\n" + "\n".join(f"  {line}" for line in lines)


# --------------------------------------------------------------------------------------------
# JSON parsing and overrides
# --------------------------------------------------------------------------------------------


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (use a number)")


def _parse_json(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def _json_error_message(source: str, text: str, exc: json.JSONDecodeError) -> str:
    msg = f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
    before = text[: exc.pos].rstrip()
    here = text[exc.pos : exc.pos + 2]
    if here.startswith(("//", "/*", "#")):
        msg += " (JSON does not allow comments)"
    elif here.startswith("'"):
        msg += " (JSON strings and keys need double quotes)"
    elif before.endswith(",") and here[:1] in ("}", "]"):
        msg += " (JSON does not allow a trailing comma before } or ])"
    lines = text.splitlines()
    if 1 <= exc.lineno <= len(lines):
        line = lines[exc.lineno - 1]
        if len(line) <= 200:
            gutter = f"  {exc.lineno} | "
            msg += f"\n{gutter}{line}\n{' ' * (len(gutter) - 2)}| {' ' * (exc.colno - 1)}^"
    return msg


def parse_override(text: str) -> Tuple[Tuple[str, ...], Any]:
    """Parse one ``--set`` override: ``section.key=value`` or ``key=value``.

    The value is parsed as JSON when it parses (``3``, ``[64, 32]``, ``0.4``, ``true``, ``null``,
    ``"quoted"``), otherwise taken as a string (``/data/x``, ``none``). Returns (key path, value).
    """
    if "=" not in text:
        raise ConfigError(
            f"invalid --set {text!r}: expected section.key=value or key=value (e.g. --set training.epochs=3)"
        )
    raw_key, raw_value = text.split("=", 1)
    parts = tuple(p.strip() for p in raw_key.strip().split("."))
    if not raw_key.strip() or any(p == "" for p in parts):
        raise ConfigError(
            f"invalid --set {text!r}: the key {raw_key.strip()!r} is empty or has an empty part; "
            "expected section.key=value or key=value (e.g. --set training.epochs=3)"
        )
    try:
        value = _parse_json(raw_value)
    except (ValueError, _DuplicateKey):
        value = raw_value
    return parts, value


def _deep_merge(base: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in new.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _apply_overrides(
    data: Dict[str, Any], overrides: Sequence[str], source: str
) -> Tuple[Dict[str, Any], Dict[Tuple[str, ...], str]]:
    """Apply ``--set`` overrides to a copy of ``data``; returns it and {key path: override text}."""
    data = json.loads(json.dumps(data, default=str)) if overrides else data  # deep copy of JSON data
    origins: Dict[Tuple[str, ...], str] = {}
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            here = ".".join(parts[: i + 1])
            if part in node and not isinstance(node[part], dict):
                was = origins.get(parts[: i + 1])
                where = f"set by --set {was}" if was else f"in {source}"
                raise ConfigError(
                    f"invalid --set {text!r}: '{here}' is {_show(node[part])} ({where}), not an object, "
                    f"so it has no key '{parts[i + 1]}'"
                )
            parent = _model_at(parts[:i])
            if parent is not None and part in parent.model_fields and _model_at(parts[: i + 1]) is None:
                raise ConfigError(
                    f"invalid --set {text!r}: '{here}' is a single value, not a section, "
                    f"so it has no key '{parts[i + 1]}'; use --set {here}=VALUE"
                )
            node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node.get(last), dict) and isinstance(value, dict):
            node[last] = _deep_merge(node[last], value)
        else:
            node[last] = value
        origins[parts] = text
    return data, origins


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _validate(
    data: Any, base_dir: Path, source: str, origins: Mapping[Tuple[str, ...], str] = {}
) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a JSON object ({{...}} with keys such as \"data_folder_path\"), "
            f"got {_KIND_WORDS.get(_kind(data), _kind(data))}"
        )
    try:
        return Config.model_validate(data, context={"base_dir": Path(os.path.abspath(base_dir))})
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc, data, source, origins)) from None


def config_from_dict(
    data: Mapping[str, Any],
    base_dir: Union[str, os.PathLike, None] = None,
    source: str = "<dict>",
    overrides: Sequence[str] = (),
) -> Config:
    """Validate a config given as a dict (e.g. from a notebook); same rules and messages as a file.

    Relative paths are resolved against ``base_dir`` (default: the current directory); ``source``
    is what error messages name as the file. Raises :class:`ConfigError`.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if not isinstance(data, Mapping):
        return _validate(data, base, source)
    plain = dict(data)
    plain.pop("$schema", None)
    plain, origins = _apply_overrides(plain, overrides, source)
    return _validate(plain, base, source, origins)


def load_config(path: Union[str, os.PathLike], overrides: Sequence[str] = ()) -> Config:
    """Read, override (``--set``) and validate a config file. Raises :class:`ConfigError`.

    Relative paths inside the file and in ``overrides`` are resolved against the file's folder.
    """
    source = os.fspath(path)
    abs_path = Path(os.path.abspath(os.path.expanduser(source)))
    for text in overrides:  # report malformed overrides before anything else
        parse_override(text)
    if abs_path.is_dir():
        hint = ""
        if (abs_path / "config.json").is_file():
            hint = f"; did you mean {abs_path / 'config.json'}?"
        raise ConfigError(f"config file {abs_path} is a directory, not a file; pass the path of the JSON file{hint}")
    if not abs_path.exists():
        raise ConfigError(f"config file not found: {abs_path}")
    try:
        raw = abs_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {abs_path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start}); save the config file as UTF-8 JSON") from None
    if not text.strip():
        raise ConfigError(f"{source}: the file is empty; expected a JSON object such as {{\"data_folder_path\": \"data\"}}")
    try:
        data = _parse_json(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(_json_error_message(source, text, exc)) from None
    except _DuplicateKey as exc:
        raise ConfigError(
            f"{source}: invalid JSON: the key \"{exc.args[0]}\" appears twice in the same object; remove one"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"{source}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        return _validate(data, abs_path.parent, source)
    data.pop("$schema", None)
    data, origins = _apply_overrides(data, overrides, source)
    cfg = _validate(data, abs_path.parent, source, origins)
    cfg.config_path = abs_path
    return cfg


def save_config(config: Config, path: Union[str, os.PathLike]) -> None:
    """Write the resolved config (defaults filled, paths absolute) as JSON, loadable by :func:`load_config`."""
    path = Path(path)
    text = json.dumps(config.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"cannot write config file {path}: {exc.strerror or exc}") from None


def config_json_schema() -> dict:
    """JSON Schema (draft 2020-12) of config.json, with a description for every field."""
    schema = Config.model_json_schema()
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    schema["properties"] = {
        "$schema": {
            "type": "string",
            "description": "Optional URL or path of this JSON Schema, for editors; ignored by keeneye.",
        },
        **schema["properties"],
    }
    return schema
