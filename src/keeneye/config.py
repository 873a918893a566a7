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
from typing import Annotated, Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Type, Union, get_args

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
    "DataConfig",
    "AugmentationConfig",
    "FineTuneConfig",
    "AnomalyConfig",
    "TrackingConfig",
    "Config",
    "load_config",
    "config_from_dict",
    "save_config",
    "config_json_schema",
    "parse_override",
]

ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
WEIGHTS_KEYWORDS = ("imagenet", "none")
#: model.views: how many views of an image may be stacked (data.preprocess.VIEW_SETS says which, bundle.InputSpec stores it).
ViewCount = Literal[1, 2, 4, 8]
VIEW_COUNTS: tuple[int, ...] = get_args(ViewCount)
_VIEW_COUNTS_TEXT = ", ".join(map(str, VIEW_COUNTS[:-1])) + f" or {VIEW_COUNTS[-1]}"  # "1, 2, 4 or 8"
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
StrictBool = Annotated[bool, Strict()]
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

    features: Annotated[
        Literal["gap", "gap+gmp", "multi", "multi+cov"],
        Field(
            description=(
                'What the embedding holds: "gap" = average of the last block; "gap+gmp" = its average and '
                'maximum (a small defect lighting a few positions survives the max); "multi" = average and '
                "maximum of the last block and of the mid-level block_13_expand_relu (finer texture, about "
                'the same cost); "multi+cov" = "multi" and the second moment of block_6_expand_relu\'s positions '
                "projected on their 48 principal axes, fitted on up to 128 of the run's training images (texture: "
                "which channels fire together; +2,304 values). Part of the embedding cache key and of the bundle. "
                "Default gap: gap+gmp raised magnetic-tile test F1 (+0.03, 5 of 5 group folds) but not its AUC or "
                "AP, made one more casting error, and loses more to int8 export (benchmarks/features.py, README); "
                "for multi+cov see README, Features for small defects."
            )
        ),
        _Expect('"gap", "gap+gmp", "multi" or "multi+cov"', ("string",)),
    ] = "gap"
    resize: Annotated[
        Literal["squash", "pad", "crop"],
        Field(
            description=(
                'How an image that is not square becomes image_size x image_size: "squash" (stretch, keeps '
                'everything), "pad" (letterbox with black bars, keeps the aspect ratio) or "crop" (the '
                "centre square, loses the borders). Ignored with tiles (tiles are square)."
            )
        ),
        _Expect('"squash", "pad" or "crop"', ("string",)),
    ] = "squash"
    reduced_decode: Annotated[
        bool,
        Strict(),
        Field(
            description=(
                "Decode JPEGs at least 2x image_size at 1/2, 1/4 or 1/8 scale inside libjpeg (2.6x faster to decode "
                "a 600 px casting image, measured) instead of at full size, for training and prediction alike (recorded "
                "in the bundle). Off by default: it changes pixels, which moved probabilities by 1.7e-3 on average and "
                "up to 0.2 on casting test images upscaled to 2x (benchmarks/inference.py), far more than the 1e-4 "
                "between engines. Only untiled squash inputs use it."
            ),
        ),
        _Expect("true or false", ("boolean",)),
    ] = False
    tiles: Annotated[
        StrictStr,
        Field(
            pattern=r"^(none|auto|[1-9][0-9]?x[1-9][0-9]?)$",
            description=(
                'Cut each image at native scale into overlapping square tiles, embed every tile, and max-pool '
                'the features over tiles before the head, so one tile can decide (small defects on large '
                'images): "none", "RxC" (e.g. "1x3": rows x columns), or "auto" (a grid chosen from the '
                "training images' median size: tiles of at most 2 x image_size native pixels, at most 16). "
                "Costs one backbone pass per tile. Not combined with fine_tune or augmentation.frozen_views."
            ),
        ),
        _Expect('"none", "auto" or "RxC" such as "2x4"', ("string",)),
    ] = "none"
    tile_overlap: Annotated[
        StrictFloat,
        Field(ge=0.0, le=0.75, description="Least overlap between neighbouring tiles, as a fraction of the tile side."),
        _Expect("a number from 0 to 0.75", ("integer", "number")),
    ] = 0.25
    views: Annotated[
        StrictInt,
        Field(
            description=(
                "Embed each image in this many views and average their features, so that the head sees features "
                "that do not depend on how the part or texture lay: 1 = the image only; 2 = + its left-right mirror; "
                "4 = + the up-down mirror and the half turn; 8 = + the four quarter-turned views. For parts and "
                "textures without an orientation (not for text or parts that always lie the same way). Costs one "
                "backbone pass per view, in training and prediction alike. Not combined with tiles, fine_tune or "
                "augmentation.frozen_views."
            ),
        ),
        _Expect(_VIEW_COUNTS_TEXT, ("integer",)),
    ] = 1

    @field_validator("views")
    @classmethod
    def _check_views(cls, value: int) -> int:
        if value not in VIEW_COUNTS:
            raise PydanticCustomError("views", f"must be {_VIEW_COUNTS_TEXT}")
        return value

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
    l2: Annotated[
        StrictFloat,
        Field(
            ge=0,
            lt=1,
            description="L2 penalty on the weights of the head's dense layers (0: none), e.g. 0.0001.",
        ),
        _Expect("a number >= 0 and < 1, e.g. 0.0001", ("integer", "number")),
    ] = 0.0
    auto: Annotated[
        bool,
        Strict(),
        Field(
            description=(
                "Choose the head by cross-validation (training.cv_folds group folds on the cached embeddings) from a "
                "small fixed set of candidates (the exact logistic head of kind \"logistic\", and dense heads of "
                "several hidden widths, dropout and L2, class weighting): the highest "
                "out-of-fold average precision wins, and a simpler candidate wins the tie when it is within one "
                "paired standard error of it (its per-fold AP minus the best's on the same folds: mean >= -sd/sqrt(K)). With model.features \"gap+gmp\" or \"multi\" the smaller feature sets inside the "
                "embedding (\"gap\", \"gap+gmp\": column subsets, no second backbone pass) enter too, with the "
                "logistic head, as simpler candidates; a chosen subset is exported as zero weights on the other columns. The candidates and their scores go into metrics.json and the report. false: the head "
                "as configured here (dense_units, dropout, l2) and training.class_weight."
            )
        ),
        _Expect("true or false", ("boolean",)),
    ] = False
    kind: Annotated[
        Literal["dense", "logistic"],
        Field(
            description=(
                '"dense": the dense_units / dropout / l2 head trained by Adam with early stopping. "logistic": '
                "standardised features + L2 logistic regression (scikit-learn, lbfgs) fitted to convergence, its "
                "strength C chosen from logistic_c by the out-of-fold average precision of the training.cv_folds "
                "group folds, then folded into the same one-layer Keras head (bundles and exports unchanged); "
                "deterministic, no epochs. dense_units, dropout and l2 do not apply (must be left unset or empty)."
            )
        ),
        _Expect('"dense" or "logistic"', ("string",)),
    ] = "dense"
    logistic_c: Annotated[
        List[Annotated[StrictFloat, Field(gt=0)]],
        Field(
            min_length=1,
            description=(
                "kind logistic (and the logistic candidate of head.auto): the inverse L2 strengths C to choose from "
                "by cross-validation (smaller = stronger regularisation); one value pins C."
            ),
        ),
        _Expect("a non-empty list of numbers > 0, e.g. [0.001, 0.01]", ("list",), item="a number > 0"),
    ] = Field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    anomaly_feature: Annotated[
        Union[Literal["auto"], StrictBool],
        Field(
            description=(
                "Add the one-class patch score (the anomaly section's PatchCore settings: patch features, coreset "
                "memory bank of good training images, mean of the largest patch distances) to the head's probability: "
                "a logistic regression on [logit of the head's probability, log of the score], fitted on out-of-fold "
                "values of the training.cv_folds group folds (each image scored against a bank without its own group), "
                "its threshold chosen on cross-fitted out-of-fold probabilities. The bundle then holds the patch "
                "feature graph (also as checked ONNX) and the bank too (predict, evaluate, serve use them; export writes "
                "float32 ONNX: the classifier with the patch graph, bank and stacker beside it). Small local "
                "defects that pooled embeddings miss: on magnetic tile it raised the test AP in every group fold and F1 in 4 of 5 "
                "(README). \"auto\" (default): keep the stacked model only when its out-of-fold AP beats the head's by more "
                "than one paired standard error over the folds, else publish the head alone and say why; true: always "
                "keep it; false: never try it. It needs cv_folds >= 2, no fine-tuning, no tiles: true refuses other "
                "settings, \"auto\" then publishes the head alone and says so. When kept it costs a second, shallower "
                "backbone pass and a nearest-neighbour search per image; trying it costs that pass over the training "
                "images."
            )
        ),
        _Expect('false, true or "auto"', ("boolean", "string")),
    ] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _logistic_is_one_layer(cls, data):
        """kind logistic is one linear layer: hidden layers, dropout or an Adam L2 penalty given with it are an error."""
        if not isinstance(data, dict) or data.get("kind") != "logistic":
            return data
        given = [key for key in ("dense_units", "dropout", "l2") if data.get(key) not in (None, [], 0, 0.0)]
        if given:
            raise PydanticCustomError(
                "logistic_one_layer",
                'kind "logistic" is one linear layer (its strength is logistic_c): remove {given}',
                {"given": ", ".join(given)},
            )
        return {**data, "dense_units": [], "dropout": 0.0, "l2": 0.0}


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
    oversample: Annotated[
        bool,
        Strict(),
        Field(
            description=(
                "Oversample the minority class: every epoch draws extra minority-class training images (with "
                "replacement, seeded) until both classes are seen equally often. An alternative to class_weight "
                "\"balanced\" (use one, not both). The threshold is still chosen on the untouched validation images."
            )
        ),
        _Expect("true or false", ("boolean",)),
    ] = False
    deterministic: Annotated[
        bool,
        Strict(),
        Field(
            description=(
                "Make TensorFlow ops deterministic (tf.config.experimental.enable_op_determinism): two runs with the "
                "same seed, config and hardware give bit-identical weights, at some cost in speed (mostly on GPU)."
            )
        ),
        _Expect("true or false", ("boolean",)),
    ] = False
    mixed_precision: Annotated[
        bool,
        Strict(),
        Field(
            description=(
                "Train in mixed precision (Keras \"mixed_float16\": float16 compute, float32 weights and output "
                "layer) when a GPU is present; ignored on CPU, where float16 is slower. The saved model is float32."
            )
        ),
        _Expect("true or false", ("boolean",)),
    ] = False
    distribute: Annotated[
        Literal["auto", "off", "mirrored", "multi_worker"],
        Field(
            description=(
                '"auto": several machines when the TF_CONFIG environment variable describes a cluster '
                "(MultiWorkerMirroredStrategy), else all local GPUs (MirroredStrategy with two or more, one GPU "
                'otherwise), else the CPU. "mirrored": MirroredStrategy over the local GPUs, or over the logical '
                'CPU devices when there is no GPU. "multi_worker": MultiWorkerMirroredStrategy (needs TF_CONFIG). '
                '"off": the default device only. batch_size is the global batch, split across the replicas.'
            )
        ),
        _Expect('"auto", "off", "mirrored" or "multi_worker"', ("string",)),
    ] = "auto"
    cv_folds: Annotated[
        StrictInt,
        Field(
            ge=0,
            le=20,
            description=(
                "Cross-validate the head on the cached embeddings: K group-aware, label-stratified, seeded folds over "
                "the training and validation images together (sklearn StratifiedGroupKFold on the split units, see "
                "data.auto_groups). The out-of-fold probabilities choose the threshold (and the head with "
                "head.auto), and the fold scores give the cross-validated estimate printed before the test score. "
                "Fewer folds are used when there are fewer positive groups. 0: no cross-validation, the head early-"
                "stops and the threshold is chosen on the validation split (as it is for a fine-tuned model)."
            ),
        ),
        _Expect("0, or an integer from 2 to 20", ("integer",)),
    ] = 5
    cv_publish: Annotated[
        Literal["refit", "average"],
        Field(
            description=(
                'With cv_folds: the head that goes into the bundle. "refit": one head trained on all training and '
                "validation images for the median of the folds' best epoch counts. \"average\": the mean of the K fold "
                "heads' probabilities (one Keras model holding all K heads)."
            )
        ),
        _Expect('"refit" or "average"', ("string",)),
    ] = "refit"
    embed_on: Annotated[
        Literal["local", "ray"],
        Field(
            description=(
                '"local": the embedding pass (the frozen backbone over every image not yet in the embedding cache) runs '
                'in this process. "ray": it runs on a Ray Data actor pool (pip install "keeneye[ray]"), each actor '
                "loading the feature extractor once; the vectors and the cache shards are the same as local. The cluster "
                "is training.ray_address, else $RAY_ADDRESS, else a local Ray on this machine's cores."
            )
        ),
        _Expect('"local" or "ray"', ("string",)),
    ] = "local"
    ray_address: Annotated[
        Optional[Annotated[StrictStr, Field(min_length=1)]],
        Field(description='With embed_on "ray": the Ray cluster to join, e.g. "ray://head:10001" or "auto"; null: $RAY_ADDRESS, else a local Ray.'),
        _Expect("a Ray address (string) or null", ("string", "null")),
    ] = None
    ray_actors: Annotated[
        StrictInt,
        Field(ge=1, description='With embed_on "ray": the number of actors (each holds one copy of the backbone and uses one CPU, or a GPU where every actor can have one).'),
        _Expect("an integer >= 1", ("integer",)),
    ] = 2

    @field_validator("cv_folds")
    @classmethod
    def _check_cv_folds(cls, value: int) -> int:
        if value == 1:
            raise PydanticCustomError("cv_folds_one", "one fold is not cross-validation (use 0 to turn it off, or 2 or more)")
        return value


# MobileNetV2's layer names (keras.applications); fine_tune.unfreeze may name one of them.
_MOBILENET_V2_LAYER_RE = re.compile(
    r"^(Conv1|bn_Conv1|Conv1_relu|Conv_1|Conv_1_bn|out_relu"
    r"|expanded_conv_(depthwise|depthwise_BN|depthwise_relu|project|project_BN)"
    r"|block_([1-9]|1[0-6])_(expand|expand_BN|expand_relu|pad|depthwise|depthwise_BN|depthwise_relu|project|project_BN|add))$"
)


class AugmentationConfig(BaseModel):
    """Random image transformations (Keras preprocessing layers) applied to training images only."""

    model_config = _FORBID

    flip: Annotated[
        Literal["none", "horizontal", "vertical", "horizontal_and_vertical"],
        Field(description="Random mirror flips (keras.layers.RandomFlip); \"none\" turns them off."),
        _Expect('"none", "horizontal", "vertical" or "horizontal_and_vertical"', ("string",)),
    ] = "horizontal_and_vertical"
    rotation: Annotated[
        StrictFloat,
        Field(
            ge=0,
            le=0.5,
            description=(
                "Largest random rotation, as a fraction of a full turn (keras.layers.RandomRotation): 0.05 is up to "
                "18 degrees either way, 0.5 any angle; 0 turns it off. Uncovered corners are filled by reflection."
            ),
        ),
        _Expect("a number from 0 to 0.5, e.g. 0.05", ("integer", "number")),
    ] = 0.05
    brightness: Annotated[
        StrictFloat,
        Field(
            ge=0,
            le=1,
            description=(
                "Largest random brightness shift, as a fraction of the 0-255 range (keras.layers.RandomBrightness); "
                "0 turns it off."
            ),
        ),
        _Expect("a number from 0 to 1, e.g. 0.1", ("integer", "number")),
    ] = 0.1
    contrast: Annotated[
        StrictFloat,
        Field(
            ge=0,
            le=1,
            description="Largest random contrast change, as a fraction (keras.layers.RandomContrast); 0 turns it off.",
        ),
        _Expect("a number from 0 to 1, e.g. 0.1", ("integer", "number")),
    ] = 0.1
    zoom: Annotated[
        StrictFloat,
        Field(
            ge=0,
            lt=1,
            description=(
                "Largest random zoom in or out about the centre, as a fraction of the image side "
                "(keras.layers.RandomZoom); 0 turns it off."
            ),
        ),
        _Expect("a number >= 0 and < 1, e.g. 0.1", ("integer", "number")),
    ] = 0.1
    crop: Annotated[
        StrictFloat,
        Field(
            ge=0,
            lt=0.5,
            description=(
                "Random crop at a random position keeping 1 - crop of each side, resized back to image_size "
                "(keras.layers.RandomCrop then Resizing); 0 turns it off."
            ),
        ),
        _Expect("a number >= 0 and < 0.5, e.g. 0.1", ("integer", "number")),
    ] = 0.0
    frozen_views: Annotated[
        StrictInt,
        Field(
            ge=0,
            le=16,
            description=(
                "For head training on the frozen backbone: this many augmented copies of every training image are "
                "embedded (each run, not cached) and added to the training features. 0 (default) trains the head on "
                "the cached features of the original images only. Fine-tuning augments online instead (see "
                "fine_tune.augment)."
            ),
        ),
        _Expect("an integer from 0 to 16", ("integer",)),
    ] = 0


class FineTuneConfig(BaseModel):
    """Fine-tuning: after the head, train the top of the backbone too, on images, at a low learning rate."""

    model_config = _FORBID

    enabled: Annotated[
        bool,
        Strict(),
        Field(
            description=(
                "Run the fine-tuning phase after the head is trained. The fine-tuned model is kept only when it beats "
                "the head-only model (see judge); otherwise the simpler head-only model is published."
            )
        ),
        _Expect("true or false", ("boolean",)),
    ] = False
    unfreeze: Annotated[
        Union[Annotated[StrictInt, Field(ge=1)], Annotated[StrictStr, Field(min_length=1)]],
        Field(
            description=(
                "Which MobileNetV2 layers to train: a number of layers counted from the top (MobileNetV2 has 154; "
                "layers without weights count too), or the name of the layer to unfreeze from, up to the top (e.g. "
                "\"block_13_expand\"). BatchNormalization layers always stay frozen, in inference mode."
            )
        ),
        _Expect('an integer >= 1 or a MobileNetV2 layer name such as "block_13_expand"', ("integer", "string")),
    ] = "block_16_expand"
    learning_rate: Annotated[
        StrictFloat,
        Field(gt=0, description=(
            "Learning rate of the optimizer (Adam) while fine-tuning: much lower than the head's. Default 3e-5: on "
            "magnetic-tile validation (cached_top from block_16_expand) it beat 1e-5, 1e-4 and 3e-4 "
            "(benchmarks/finetune_probe.py).")),
        _Expect("a number > 0, e.g. 0.00001", ("integer", "number")),
    ] = 3e-5
    epochs: Annotated[
        StrictInt,
        Field(ge=1, description="Maximum number of fine-tuning passes over the training images."),
        _Expect("an integer >= 1", ("integer",)),
    ] = 10
    patience: Annotated[
        StrictInt,
        Field(
            ge=0,
            description=(
                "Stop fine-tuning after this many epochs without improvement of the validation loss, keeping the "
                "best weights. 0 disables early stopping."
            ),
        ),
        _Expect("an integer >= 0", ("integer",)),
    ] = 3
    augment: Annotated[
        bool,
        Strict(),
        Field(description=(
            "method images: apply the augmentation section's random transformations to the images while fine-tuning "
            "(cached_top augments with fine_tune.views instead).")),
        _Expect("true or false", ("boolean",)),
    ] = True
    method: Annotated[
        Literal["images", "cached_top"],
        Field(
            description=(
                '"images": every epoch streams the images through the whole network (augmentation section online). '
                '"cached_top": the frozen bottom (below the first unfrozen layer) runs once per image and per view, '
                "and the epochs train only the top blocks and the head on those cached activations (much cheaper "
                "epochs on a CPU; augmentation = fine_tune.views symmetries of the square). Needs unfreeze at the "
                'first layer of a block, e.g. "block_16_expand".'
            )
        ),
        _Expect('"images" or "cached_top"', ("string",)),
    ] = "cached_top"
    views: Annotated[
        StrictInt,
        Field(
            ge=1,
            le=8,
            description=(
                "cached_top: how many of the 8 flips / quarter turns of each training image are cached (1 = the image "
                "only); each epoch shows every image in one of them, drawn at random. Suits textures and parts without "
                "an orientation."
            ),
        ),
        _Expect("an integer from 1 to 8", ("integer",)),
    ] = 8
    schedule: Annotated[
        Literal["constant", "cosine"],
        Field(
            description=(
                '"cosine": one epoch of linear warm-up to learning_rate, then cosine decay to 0 over the remaining '
                'epochs; "constant": learning_rate throughout.'
            )
        ),
        _Expect('"constant" or "cosine"', ("string",)),
    ] = "cosine"
    judge: Annotated[
        Literal["folds", "validation"],
        Field(
            description=(
                '"folds" (with training.cv_folds >= 2): fine-tune once per cross-validation fold, from that fold\'s '
                "frozen head, early-stopping on the held-out fold; keep fine-tuning only when its out-of-fold AP beats "
                "the frozen head's by more than one paired standard error over the folds, and then publish a "
                "fine-tune on all training + validation images for the median of the folds' best epochs (K + 1 "
                'fine-tunes; cached_top runs the frozen bottom once). "validation": one fine-tune on the training '
                "split, judged on the validation split: cheaper, but a split holds the defects of only a few parts, "
                "and on magnetic-tile it kept fine-tunes that then lost on every test fold (README). Without "
                "cross-validation the validation split judges."
            )
        ),
        _Expect('"folds" or "validation"', ("string",)),
    ] = "folds"

    @field_validator("unfreeze")
    @classmethod
    def _check_unfreeze(cls, value: Union[int, str]) -> Union[int, str]:
        if isinstance(value, str) and not _MOBILENET_V2_LAYER_RE.match(value):
            raise PydanticCustomError("layer_name", "is not a MobileNetV2 layer name")
        return value


class EvaluationConfig(BaseModel):
    """How the decision threshold is chosen and the model is evaluated."""

    model_config = _FORBID

    threshold: Annotated[
        Union[Literal["auto"], Annotated[StrictFloat, Field(gt=0, lt=1)]],
        Field(
            description=(
                "Probability at or above which an image is called positive. \"auto\" chooses it on held-out "
                "probabilities (out-of-fold with training.cv_folds, else the validation images; see threshold_objective "
                "and min_validation_per_class); a number strictly between 0 and 1 fixes it."
            )
        ),
        _Expect('"auto" or a number strictly between 0 and 1, e.g. 0.5', ("string", "number")),
    ] = "auto"
    min_validation_per_class: Annotated[
        StrictInt,
        Field(
            ge=1,
            description=(
                'With threshold "auto": the fewest held-out images each class needs for the threshold to be '
                "tuned (on validation; with training.cv_folds, out-of-fold, which holds every training and validation "
                "image); with fewer, the threshold falls back to 0.5 with a warning."
            ),
        ),
        _Expect("an integer >= 1", ("integer",)),
    ] = 5
    threshold_objective: Annotated[
        Literal["f1", "precision_at_recall", "recall_at_precision"],
        Field(
            description=(
                'What threshold "auto" optimises on the held-out probabilities: "f1" (of the positive class); '
                '"precision_at_recall": the most precise threshold that still finds target_recall of the positives '
                "(when a missed defect costs more than a false alarm); \"recall_at_precision\": the threshold that "
                "finds the most positives while keeping target_precision."
            )
        ),
        _Expect('"f1", "precision_at_recall" or "recall_at_precision"', ("string",)),
    ] = "f1"
    target_recall: Annotated[
        StrictFloat,
        Field(gt=0, le=1, description='The recall that threshold_objective "precision_at_recall" must reach.'),
        _Expect("a number > 0 and <= 1, e.g. 0.95", ("integer", "number")),
    ] = 0.95
    target_precision: Annotated[
        StrictFloat,
        Field(gt=0, le=1, description='The precision that threshold_objective "recall_at_precision" must keep.'),
        _Expect("a number > 0 and <= 1, e.g. 0.9", ("integer", "number")),
    ] = 0.9

    @property
    def objective_target(self) -> float | None:
        """The target that goes with threshold_objective (None for f1)."""
        return {"precision_at_recall": self.target_recall, "recall_at_precision": self.target_precision}.get(self.threshold_objective)


class DataConfig(BaseModel):
    """Where the images come from (a CSV manifest instead of a folder), how they are split, and the data audit."""

    model_config = _FORBID

    manifest_path: Annotated[
        Optional[Path],
        BeforeValidator(_reject_empty_path),
        Field(
            description=(
                "A CSV manifest to read the images from instead of data_folder_path: columns path and label "
                "(exactly two labels), optional split (training, validation or testing; empty means training) and "
                "group (images of one physical part, video or session: never split apart). Paths inside the CSV "
                "are relative to the CSV's folder. Must exist; "
                f"{_RELATIVE_NOTE}; stored absolute. null: use data_folder_path."
            )
        ),
        _Expect("the path of an existing CSV file with columns path,label[,split,group], or null", ("string", "null")),
    ] = None
    group_pattern: Annotated[
        Optional[Annotated[StrictStr, Field(min_length=1)]],
        Field(
            description=(
                "A regular expression that takes each image's group from its file name (e.g. \"^(vid\\d+)_\" for a "
                "video id prefix): the first capture group, or the whole match when there is none. Images of one "
                "group are never split between training, validation and testing. Fills only the groups that the "
                "manifest leaves empty; a file name that does not match is its own group. null: no pattern."
            )
        ),
        _Expect("a regular expression (Python syntax), or null", ("string", "null")),
    ] = None
    frame_pattern: Annotated[
        Optional[Annotated[StrictStr, Field(min_length=1)]],
        Field(
            description=(
                "A regular expression whose first capture group is the frame number in an image's file name, for "
                "folders of frames extracted from videos; the image's group (its video) comes from group_pattern, or "
                "from what precedes the number. null: names like 0001_000000012.jpg (video 0001, frame 12) are "
                "recognised by default (both parts digits)."
            )
        ),
        _Expect("a regular expression (Python syntax) with one capture group, or null", ("string", "null")),
    ] = None
    test_fraction: Annotated[
        StrictFloat,
        Field(
            ge=0,
            lt=0.9,
            description=(
                "When the data has no testing images (a CSV manifest without testing rows), the fraction of the "
                "images held out for testing, per class and group-aware like validation. Ignored when testing "
                "images are given."
            ),
        ),
        _Expect("a number >= 0 and < 0.9, e.g. 0.2", ("integer", "number")),
    ] = 0.2
    drop_leaked_test: Annotated[
        bool,
        Strict(),
        Field(
            description=(
                "Leave out of the evaluation the testing images that the audit finds leaked from training or "
                "validation (identical files, near-duplicates, or a shared group), so that test scores are honest. "
                "false: keep them and only warn."
            )
        ),
        _Expect("true or false", ("boolean",)),
    ] = False
    near_duplicate_similarity: Annotated[
        StrictFloat,
        Field(
            gt=0,
            le=1,
            description=(
                "Two images are near-duplicates by their backbone embeddings when each is the other's nearest "
                "neighbour (mutual nearest neighbours) and the cosine similarity of their embeddings (centred on the "
                "mean of all images) is at least this. Used for the automatic groups (data.auto_groups) and for the "
                "audit's leakage check during train. Mutual nearest neighbours, not a plain cosine cut: in a "
                "homogeneous set (solar cells, tiles) many different parts are above any usable cosine, and a plain "
                "cut chains them into one big group."
            ),
        ),
        _Expect("a number > 0 and <= 1, e.g. 0.95", ("integer", "number")),
    ] = 0.9
    auto_groups: Annotated[
        bool,
        Strict(),
        Field(
            description=(
                "Join images into groups by near-duplicate evidence before splitting: identical files, perceptual-hash "
                "neighbours (near_duplicate_hash_distance) and, in train, mutual nearest neighbours of the "
                "embeddings (near_duplicate_similarity); connected components become split units, so validation, "
                "the cross-validation folds and a generated testing split never separate near-copies. Groups given "
                "by the manifest or group_pattern rule: evidence that links two different given groups is ignored "
                "(the audit still reports it). false: only identical files and the given groups are kept together."
            )
        ),
        _Expect("true or false", ("boolean",)),
    ] = True
    near_duplicate_hash_distance: Annotated[
        StrictInt,
        Field(
            ge=-1,
            le=64,
            description=(
                "Largest Hamming distance between the 256-bit perceptual hashes (dHash) of two images for them to "
                "count as near-duplicates (0: identical at thumbnail size; 10 catches shifted or re-lit copies of "
                "the same part); -1 turns the hash check off. Works without the network, in keeneye audit as well "
                "as in train."
            ),
        ),
        _Expect("an integer from -1 to 64", ("integer",)),
    ] = 10

    @field_validator("manifest_path")
    @classmethod
    def _check_manifest(cls, value: Optional[Path], info: ValidationInfo) -> Optional[Path]:
        if value is None:
            return None
        resolved = _resolve(value, _base_dir(info))
        if not resolved.exists():
            raise PydanticCustomError(
                "path_not_found", "resolved to {resolved}, which does not exist", {"resolved": str(resolved)}
            )
        if not resolved.is_file():
            raise PydanticCustomError(
                "path_not_file",
                "resolved to {resolved}, which is a directory, not a file",
                {"resolved": str(resolved)},
            )
        return resolved

    @field_validator("group_pattern", "frame_pattern")
    @classmethod
    def _check_group_pattern(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        try:
            re.compile(value)
        except re.error as exc:
            raise PydanticCustomError("regex_invalid", "is not a valid regular expression ({problem})", {"problem": str(exc)})
        return value


_PATCH_LAYER_RE = re.compile(r"^block_([1-9]|1[0-6])_(expand_relu|depthwise_relu|project_BN|add)$")


class AnomalyConfig(BaseModel):
    """One-class (PatchCore) settings, used when mode is "anomaly": a memory bank of good patches."""

    model_config = _FORBID

    layers: Annotated[
        List[StrictStr],
        Field(
            min_length=1,
            max_length=4,
            description=(
                "MobileNetV2 layers whose outputs are the patch features; each is averaged over 3 x 3 neighbours, "
                "resized to one grid (see grid) and concatenated. Default: block_6_expand_relu (stride 8, 192 channels) "
                "and block_12_add (stride 16, the 96-channel residual stream), PatchCore's two middle stages; on the "
                "training parts (benchmarks/anomaly_layers.py) they beat block_6 + block_13_expand_relu on magnetic tile "
                "(inner-fold AUROC 0.86 vs 0.77) and on casting (0.97 vs 0.95), and the graph ends one block earlier."
            ),
        ),
        _Expect('a list of 1 to 4 MobileNetV2 layer names such as "block_6_expand_relu"', ("list",), item="a layer name"),
    ] = Field(default_factory=lambda: ["block_6_expand_relu", "block_12_add"])
    grid: Annotated[
        Literal["coarsest", "finest"],
        Field(
            description=(
                'The patch grid the layers are resized to: "coarsest" (the deepest layer\'s, e.g. 14 x 14 at 224 px with '
                'block_13) or "finest" (e.g. 28 x 28 with block_6): 4 times the patches, finer maps, 4 times the search time.'
            )
        ),
        _Expect('"coarsest" or "finest"', ("string",)),
    ] = "coarsest"
    feature_dim: Annotated[
        StrictInt,
        Field(
            ge=8,
            le=4096,
            description=(
                "Depth of each patch feature after the reduction (see projection; part of the feature model); "
                "memory and search time grow with it (128 and 256 scored alike on casting's training part; 128 and no "
                "reduction of the default layers' 288 channels scored 0.963 and 0.970 there). Larger than the "
                "concatenated depth keeps the features as they are."
            ),
        ),
        _Expect("an integer from 8 to 4096, e.g. 128", ("integer",)),
    ] = 128
    projection: Annotated[
        Literal["random", "pca"],
        Field(
            description=(
                'How the concatenated patch features are reduced to feature_dim: "random" (a fixed seeded random '
                'projection) or "pca" (the principal axes of the good training patches, fitted on a sample of them); '
                "either way a 1x1 convolution inside the feature graph. On casting's training part both kept the "
                "unreduced features' AUROC within 0.007 at 128 dimensions (pca 0.968, random 0.963, none 0.970)."
            )
        ),
        _Expect('"random" or "pca"', ("string",)),
    ] = "random"
    standardise: Annotated[
        bool,
        Strict(),
        Field(
            description=(
                "Divide every feature channel by its spread among the good training patches before the reduction "
                "(PaDiM's diagonal Mahalanobis idea), so channels that vary a lot on good parts do not dominate. "
                "Depends on the data, hence off by default: on casting's training part it raised the AUROC from 0.97 "
                "to 0.996, on magnetic tile's inner folds it lowered it from 0.86 to 0.72 (benchmarks/anomaly_layers.py)."
            )
        ),
        _Expect("true or false", ("boolean",)),
    ] = False
    coreset_share: Annotated[
        StrictFloat,
        Field(
            gt=0,
            le=1,
            description=(
                "Share of the good training patches kept in the memory bank, chosen by greedy k-center coreset "
                "selection (1 keeps them all)."
            ),
        ),
        _Expect("a number > 0 and <= 1, e.g. 0.1", ("integer", "number")),
    ] = 0.1
    max_bank_size: Annotated[
        StrictInt,
        Field(
            ge=1,
            description=(
                "Largest number of patches in the memory bank, whatever coreset_share says: bounds the bundle's "
                "size, the memory and the time each prediction takes (exact search time is proportional to it). "
                "10000 by measurement (benchmarks/anomaly_bank.py, casting's validation split, bank of the full good "
                "training set in greedy order): AUROC 0.979 / 0.982 / 0.981 / 0.980 with 5000 / 10000 / 20000 / "
                "48079 (the whole 10% coreset) patches, while the search took 8.5 / 18.5 / 39 / 69 ms per image "
                "on 2 cores: beyond 10000 the bank costs predict speed (a 10% coreset of casting predicts at 0.25x the "
                "supervised mode's) and gains nothing measurable."
            ),
        ),
        _Expect("an integer >= 1, e.g. 10000", ("integer",)),
    ] = 10000
    search: Annotated[
        Literal["exact", "ivf"],
        Field(
            description=(
                'Nearest-neighbour search in the memory bank: "exact" (every bank patch) or "ivf" (approximate, faiss '
                "IndexIVFFlat over about 4 sqrt(bank) lists, only the nprobe lists nearest to each patch searched), for "
                "banks too large to search exactly in time (e.g. max_bank_size raised to keep a whole 10% coreset). "
                "Recorded in the bundle; the index is rebuilt from memory_bank.npy when the bundle loads (about a second). "
                "Exports keep exact search (the bank beside the feature graph)."
            )
        ),
        _Expect('"exact" or "ivf"', ("string",)),
    ] = "exact"
    nprobe: Annotated[
        StrictInt,
        Field(
            ge=1,
            le=4096,
            description=(
                'Inverted lists searched per patch with search "ivf" (more: closer to exact, slower; at least the number '
                "of lists is exact). 16 by measurement on casting's validation split, never its test split "
                "(benchmarks/anomaly_ivf.py, 48079-patch bank, 877 lists): AUROC -0.0030 / -0.0009 / -0.0002 against "
                "exact search with 4 / 8 / 16 probes, at 9.3 / 11.4 / 15.6 ms per image against 55.5 ms exact."
            ),
        ),
        _Expect("an integer from 1 to 4096, e.g. 16", ("integer",)),
    ] = 16
    threshold_rule: Annotated[
        Literal["auto", "false_alarm_rate", "max_f1"],
        Field(
            description=(
                '"false_alarm_rate": the threshold is the (1 - false_alarm_rate) quantile of the scores of the held-out '
                'good (validation) images; "max_f1": the F1 rule of supervised mode, which needs labelled defects in '
                'validation (evaluation.min_validation_per_class); "auto": max_f1 when validation holds enough '
                "defects, else false_alarm_rate."
            )
        ),
        _Expect('"auto", "false_alarm_rate" or "max_f1"', ("string",)),
    ] = "auto"
    false_alarm_rate: Annotated[
        StrictFloat,
        Field(
            gt=0,
            lt=1,
            description="Share of good images expected to be flagged, for threshold_rule false_alarm_rate (e.g. 0.01).",
        ),
        _Expect("a number > 0 and < 1, e.g. 0.01", ("integer", "number")),
    ] = 0.01
    score_neighbours: Annotated[
        StrictInt,
        Field(
            ge=1,
            le=64,
            description=(
                "Image score: 1 = the largest patch distance; k > 1 = PatchCore's re-weighting of it (Roth et al. eq. 7, "
                "anomalib's num_neighbors, 9 there): lowered when the nearest good patch has k - 1 close neighbours "
                "that are all far from the image's patch."
            ),
        ),
        _Expect("an integer from 1 to 64, e.g. 9", ("integer",)),
    ] = 1
    score_top_k: Annotated[
        StrictInt,
        Field(
            ge=1,
            le=64,
            description=(
                "Image score: the mean of the k largest patch distances (1 = PatchCore's largest one). A defect covers "
                "several neighbouring patches; one odd patch of a good part then no longer decides alone. 10 scored "
                "best of 1, 3, 10 on the training parts of casting and magnetic tile (magnetic inner folds 0.86 vs 0.81 "
                "with 1)."
            ),
        ),
        _Expect("an integer from 1 to 64, e.g. 10", ("integer",)),
    ] = 10
    map_sigma: Annotated[
        StrictFloat,
        Field(ge=0, description="Gaussian smoothing of anomaly maps, in pixels at image_size (0: none)."),
        _Expect("a number >= 0, e.g. 4", ("integer", "number")),
    ] = 4.0

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: List[str]) -> List[str]:
        bad = [name for name in value if not _PATCH_LAYER_RE.match(name)]
        if bad:
            raise PydanticCustomError(
                "layer_name",
                "{bad} is not a MobileNetV2 block output; use names such as block_6_expand_relu or block_13_expand_relu",
                {"bad": ", ".join(bad)},
            )
        return value


class VideoConfig(BaseModel):
    """Video files and frame sequences: how frames are sampled and how per-frame probabilities become events."""

    model_config = _FORBID

    fps: Annotated[
        Optional[StrictFloat],
        Field(
            gt=0,
            le=1000,
            description=(
                "Frames per second sampled from video files, for training (each sampled frame is embedded like an "
                "image) and for predict/watch. null: every frame."
            ),
        ),
        _Expect("a number > 0 (frames per second), or null for every frame", ("integer", "number", "null")),
    ] = 5.0
    smoothing_frames: Annotated[
        StrictInt,
        Field(
            ge=1,
            le=1001,
            description=(
                "Width, in sampled frames, of the centred moving average applied to the probabilities over time "
                "before events are found (1: no smoothing). Live (watch), events are reported this many frames / 2 late."
            ),
        ),
        _Expect("an integer >= 1", ("integer",)),
    ] = 5
    enter_threshold: Annotated[
        Optional[StrictFloat],
        Field(
            gt=0,
            lt=1,
            description=(
                "An event starts when the smoothed probability reaches this value. null: the bundle's threshold."
            ),
        ),
        _Expect("a number strictly between 0 and 1, or null", ("number", "null")),
    ] = None
    hysteresis: Annotated[
        StrictFloat,
        Field(
            ge=0,
            lt=1,
            description=(
                "An event ends when the smoothed probability falls below enter_threshold minus this margin, so a "
                "probability wavering around the threshold does not cut one event into many."
            ),
        ),
        _Expect("a number >= 0 and < 1, e.g. 0.1", ("integer", "number")),
    ] = 0.1
    min_event_frames: Annotated[
        StrictInt,
        Field(ge=1, description="Events shorter than this many sampled frames are discarded as noise."),
        _Expect("an integer >= 1", ("integer",)),
    ] = 3


_URI_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:(//|$)|^databricks")


class TrackingConfig(BaseModel):
    """Experiment tracking: MLflow (parameters, metrics, artifacts, the model, a registry) and TensorBoard logs."""

    model_config = _FORBID

    mlflow: Annotated[
        bool,
        Strict(),
        Field(
            description=(
                "After the bundle is published, log the run to MLflow: the resolved config as parameters, the test "
                "metrics (at the threshold and at 0.5), timings, data counts and the cross-validated estimate as "
                "metrics, the audit and the report as artifacts, and the model as an MLflow pyfunc (uint8 image in, "
                "probability out). Needs pip install 'keeneye[mlflow]'. A tracking failure is a warning, never a "
                "failed run."
            )
        ),
        _Expect("true or false", ("boolean",)),
    ] = False
    mlflow_uri: Annotated[
        Optional[Annotated[StrictStr, Field(min_length=1)]],
        Field(
            description=(
                "Where MLflow logs: a tracking URI (http://host:5000, sqlite:///path/mlflow.db, databricks), or a "
                "folder for a local store that needs no server (an SQLite database mlflow.db plus an artifacts/ "
                f"folder; {_RELATIVE_NOTE}; stored absolute). null: the folder mlruns/ in output_dir."
            )
        ),
        _Expect("a tracking URI such as \"http://host:5000\", a folder path, or null", ("string", "null")),
    ] = None
    experiment: Annotated[
        StrictStr,
        Field(min_length=1, description="MLflow experiment the runs are logged under (created if missing)."),
        _Expect("a non-empty string", ("string",)),
    ] = "keeneye"
    registered_model: Annotated[
        Optional[Annotated[StrictStr, Field(min_length=1)]],
        Field(
            description=(
                "Also register the logged model in the MLflow model registry under this name (a new version per "
                "run). null: log the model without registering it."
            )
        ),
        _Expect("a model name, or null", ("string", "null")),
    ] = None
    tensorboard: Annotated[
        bool,
        Strict(),
        Field(
            description=(
                "Write Keras TensorBoard logs for every training phase into the run folder "
                "(runs/<name>/tensorboard/head, .../fine_tune); view them with tensorboard --logdir runs."
            )
        ),
        _Expect("true or false", ("boolean",)),
    ] = False

    @field_validator("mlflow_uri")
    @classmethod
    def _resolve_store_folder(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        # A URI goes to MLflow as given; a plain path is a local store folder, resolved like every config path.
        if value is None or _URI_SCHEME_RE.match(value):
            return value
        resolved = _resolve(value, _base_dir(info))
        if resolved.exists() and not resolved.is_dir():
            raise PydanticCustomError(
                "path_not_dir", "resolved to {resolved}, which exists and is a file, not a folder", {"resolved": str(resolved)}
            )
        return str(resolved)


class Config(BaseModel):
    """A keeneye run configuration (config.json). Relative paths are resolved against the config file's folder."""

    model_config = _FORBID

    data_folder_path: Annotated[
        Optional[Path],
        BeforeValidator(_reject_empty_path),
        Field(
            description=(
                "Required unless data.manifest_path is set (then leave it out). The folder holding "
                "training/<class>/ and testing/<class>/ (or train/, test/), with exactly two classes, "
                f"e.g. data/training/ok and data/training/defect. Must exist; {_RELATIVE_NOTE} (also for --set), and it is "
                "stored absolute."
            )
        ),
        _Expect("the path of an existing folder holding training/<class>/ and testing/<class>/", ("string",)),
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
    data: Annotated[
        DataConfig,
        Field(description="CSV manifest, group-aware splitting and data audit settings (an object)."),
        _Expect("an object", ("object",)),
    ] = Field(default_factory=DataConfig)
    augmentation: Annotated[
        AugmentationConfig,
        Field(description="Random transformations of training images, for fine-tuning and optionally the head (an object)."),
        _Expect("an object", ("object",)),
    ] = Field(default_factory=AugmentationConfig)
    fine_tune: Annotated[
        FineTuneConfig,
        Field(description="Optional fine-tuning of the top of the backbone after the head (an object)."),
        _Expect("an object", ("object",)),
    ] = Field(default_factory=FineTuneConfig)
    mode: Annotated[
        Literal["supervised", "anomaly"],
        Field(
            description=(
                '"supervised": a classifier trained on both classes. "anomaly": one-class PatchCore learned from the '
                "good (negative) training images only; labelled defects serve only to choose the threshold and to "
                "evaluate (see the anomaly section)."
            )
        ),
        _Expect('"supervised" or "anomaly"', ("string",)),
    ] = "supervised"
    anomaly: Annotated[
        AnomalyConfig,
        Field(description='One-class (PatchCore) settings, used when mode is "anomaly" (an object).'),
        _Expect("an object", ("object",)),
    ] = Field(default_factory=AnomalyConfig)

    video: Annotated[
        VideoConfig,
        Field(description="Frame sampling of video files and event detection over time (an object)."),
        _Expect("an object", ("object",)),
    ] = Field(default_factory=VideoConfig)
    tracking: Annotated[
        TrackingConfig,
        Field(description="Experiment tracking with MLflow and TensorBoard (an object)."),
        _Expect("an object", ("object",)),
    ] = Field(default_factory=TrackingConfig)

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

    @model_validator(mode="before")
    @classmethod
    def _manifest_replaces_folder(cls, data: Any) -> Any:
        # With data.manifest_path the data folder is not needed: a missing data_folder_path is not an error.
        if isinstance(data, dict) and "data_folder_path" not in data:
            section = data.get("data")
            if isinstance(section, dict) and section.get("manifest_path") is not None:
                data = {**data, "data_folder_path": None}
        return data

    @field_validator("data_folder_path")
    @classmethod
    def _check_data_folder(cls, value: Optional[Path], info: ValidationInfo) -> Optional[Path]:
        if value is None:
            return None  # allowed only with data.manifest_path (checked below)
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
    def _check_data_source(self) -> "Config":
        if self.data_folder_path is None and self.data.manifest_path is None:
            raise PydanticCustomError("data_source_missing", "is null")
        if self.data_folder_path is not None and self.data.manifest_path is not None:
            raise PydanticCustomError("data_source_both", "both set")
        return self

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
        if key == "data_folder_path":
            expected += f" ({_RELATIVE_NOTE}), or set data.manifest_path to a CSV manifest instead"
            return key, f"{label}: required key is missing; expected {expected}"
        return key, f"{label}: required key is missing; expected {expected} ({_RELATIVE_NOTE})"
    if etype == "data_source_missing":
        return "data_folder_path", (
            f"data_folder_path: is null and data.manifest_path is not set; give one of them: "
            f"{_expect_of(Config, 'data_folder_path').text}, or a CSV manifest as data.manifest_path ({_RELATIVE_NOTE})"
        )
    if etype == "data_source_both":
        return "data_folder_path", (
            "data_folder_path and data.manifest_path are both set; keep one: the images come either from a "
            "folder or from a CSV manifest (to drop the folder with --set, use --set data_folder_path=null)"
        )

    if etype == "logistic_one_layer":  # raised by HeadConfig as a whole: name the key that decides
        return f"{key}.kind", f"{key}.kind: {err['msg']}"
    value = _lookup(data, path)
    shown = _show(value) if value is not _MISSING else _show(err.get("input"))

    if etype == "regex_invalid":
        return key, f"{label}: {shown} {err['msg']}; expected {expect.text if expect else 'a regular expression'}"
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
    # data_folder_path is required unless data.manifest_path is given (and not both).
    schema["required"] = [k for k in schema.get("required", []) if k != "data_folder_path"]
    if not schema["required"]:
        del schema["required"]
    schema["oneOf"] = [
        {"required": ["data_folder_path"]},
        {"required": ["data"], "properties": {"data": {"required": ["manifest_path"], "properties": {"manifest_path": {"type": "string"}}}}},
    ]
    schema["properties"] = {
        "$schema": {
            "type": "string",
            "description": "Optional URL or path of this JSON Schema, for editors; ignored by keeneye.",
        },
        **schema["properties"],
    }
    return schema
