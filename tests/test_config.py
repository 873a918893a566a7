"""Unit tests of keeneye.config: loading, overrides, saving, schema and, above all, the error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keeneye.config import (
    Config,
    ModelConfig,
    config_from_dict,
    config_json_schema,
    load_config,
    save_config,
)
from keeneye.errors import ConfigError

PYDANTIC_WORDS = ("validation error", "Input should", "pydantic", "type=", "errors.pydantic.dev")


def write(folder: Path, content, name: str = "config.json") -> Path:
    path = folder / name
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2), encoding="utf-8")
    return path


def error_of(path: Path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert info.value.exit_code == 2
    for word in PYDANTIC_WORDS:
        assert word not in message, f"pydantic wording leaked: {message}"
    assert "Traceback" not in message
    return message


def bad(project: Path, **sections) -> str:
    """Error message for a config that has a valid data folder plus the given (bad) settings."""
    data = {"data_folder_path": "data", **sections}
    return error_of(write(project, data))


# ----------------------------------------------------------------------------------------------
# Loading valid configs
# ----------------------------------------------------------------------------------------------


def test_minimal_config_gets_defaults_and_absolute_paths(project: Path) -> None:
    cfg = load_config(write(project, {"data_folder_path": "data"}))
    assert cfg.data_folder_path == project / "data"
    assert cfg.data_folder_path.is_absolute()
    assert cfg.output_dir == project / "runs"
    assert cfg.cache_dir is None and cfg.run_name is None and cfg.positive_class is None
    assert cfg.max_dropped_fraction == 0.05
    assert cfg.model == ModelConfig()
    assert (cfg.model.backbone, cfg.model.alpha, cfg.model.image_size, cfg.model.weights) == (
        "mobilenet_v2",
        1.0,
        224,
        "imagenet",
    )
    assert cfg.head.dense_units == [128] and cfg.head.dropout == 0.2
    t = cfg.training
    assert (t.epochs, t.batch_size, t.learning_rate, t.validation_fraction, t.seed) == (50, 32, 1e-3, 0.15, 42)
    assert t.early_stopping_patience == 5 and t.class_weight == "none"
    assert cfg.evaluation.threshold == "auto" and cfg.evaluation.min_validation_per_class == 5
    assert cfg.config_path == project / "config.json"


def test_config_path_is_absolute_even_for_a_relative_argument(project: Path, monkeypatch) -> None:
    write(project, {"data_folder_path": "data"})
    monkeypatch.chdir(project)
    cfg = load_config("config.json")
    assert cfg.config_path == project / "config.json"
    assert cfg.data_folder_path == project / "data"


def test_full_config(project: Path) -> None:
    (project / "weights").mkdir()
    (project / "weights" / "backbone.weights.h5").write_bytes(b"")
    cfg = load_config(
        write(
            project,
            {
                "$schema": "./keeneye.schema.json",
                "data_folder_path": "data",
                "positive_class": "defect",
                "max_dropped_fraction": 0,
                "output_dir": "out",
                "run_name": "exp-1.a_b",
                "cache_dir": "cache",
                "model": {"backbone": "mobilenet_v2", "alpha": 0.35, "image_size": 96, "weights": "weights/backbone.weights.h5"},
                "head": {"dense_units": [], "dropout": 0},
                "training": {
                    "epochs": 3,
                    "batch_size": 8,
                    "learning_rate": 1,
                    "validation_fraction": 0,
                    "seed": -1,
                    "early_stopping_patience": 0,
                    "class_weight": "balanced",
                },
                "evaluation": {"threshold": 0.3, "min_validation_per_class": 1},
            },
        )
    )
    assert cfg.positive_class == "defect" and cfg.run_name == "exp-1.a_b"
    assert cfg.output_dir == project / "out" and cfg.cache_dir == project / "cache"
    assert cfg.model.weights == str(project / "weights" / "backbone.weights.h5")
    assert cfg.model.alpha == 0.35 and cfg.model.image_size == 96
    assert cfg.head.dense_units == [] and cfg.head.dropout == 0.0
    assert cfg.training.learning_rate == 1.0 and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.class_weight == "balanced"
    assert cfg.evaluation.threshold == 0.3


def test_absolute_paths_are_kept(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "abs-out"
    cfg = load_config(write(project, {"data_folder_path": str(project / "data"), "output_dir": str(out)}))
    assert cfg.data_folder_path == project / "data" and cfg.output_dir == out


def test_int_alpha_is_accepted_as_float(project: Path) -> None:
    cfg = load_config(write(project, {"data_folder_path": "data", "model": {"alpha": 1}}))
    assert cfg.model.alpha == 1.0


def test_utf8_bom_is_accepted(project: Path) -> None:
    path = project / "config.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"data_folder_path": "data"}).encode())
    assert load_config(path).data_folder_path == project / "data"


def test_config_path_is_not_dumped(project: Path) -> None:
    cfg = load_config(write(project, {"data_folder_path": "data"}))
    assert "config_path" not in cfg.model_dump()
    assert "config_path" not in json.loads(cfg.model_dump_json())


def test_config_from_dict_resolves_against_base_dir(project: Path) -> None:
    cfg = config_from_dict({"data_folder_path": "data", "$schema": "x"}, project)
    assert cfg.data_folder_path == project / "data"
    assert cfg.output_dir == project / "runs"
    assert cfg.config_path is None


def test_config_from_dict_names_the_source_in_errors(project: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"data_folder_path": "data", "training": {"epochs": 0}}, project, source="notebook cell 3")
    assert str(info.value) == "notebook cell 3: training.epochs: expected an integer >= 1, got 0"


def test_config_from_dict_rejects_a_non_dict(project: Path) -> None:
    with pytest.raises(ConfigError, match=r"<dict>: the top level must be a JSON object .* got a list"):
        config_from_dict([1, 2], project)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# save_config round trip
# ----------------------------------------------------------------------------------------------


def test_save_then_load_round_trip(project: Path, tmp_path: Path, monkeypatch) -> None:
    (project / "w.h5").write_bytes(b"")
    cfg = load_config(
        write(
            project,
            {
                "data_folder_path": "data",
                "cache_dir": "cache",
                "run_name": "r1",
                "model": {"weights": "w.h5", "alpha": 0.5},
                "head": {"dense_units": [64, 32]},
                "evaluation": {"threshold": 0.4},
            },
        )
    )
    saved = tmp_path / "somewhere" / "else" / "resolved.json"
    save_config(cfg, saved)
    text = json.loads(saved.read_text(encoding="utf-8"))
    assert "config_path" not in text
    assert text["data_folder_path"] == str(project / "data")
    assert text["output_dir"] == str(project / "runs")
    assert text["model"]["weights"] == str(project / "w.h5")
    monkeypatch.chdir(tmp_path)
    again = load_config(saved)
    assert again.model_dump() == cfg.model_dump()
    assert again.config_path == saved


# ----------------------------------------------------------------------------------------------
# JSON Schema
# ----------------------------------------------------------------------------------------------


def _objects(schema: dict):
    yield "Config", schema
    for name, sub in schema.get("$defs", {}).items():
        yield name, sub


def test_schema_describes_every_property() -> None:
    schema = config_json_schema()
    json.dumps(schema)  # serialisable
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["$defs"]) == {"ModelConfig", "HeadConfig", "TrainingConfig", "EvaluationConfig", "DataConfig",
                                    "AugmentationConfig", "FineTuneConfig", "VideoConfig", "TrackingConfig", "AnomalyConfig"}
    count = 0
    for name, obj in _objects(schema):
        assert obj.get("additionalProperties") is False, name
        assert obj.get("description"), name
        for prop, spec in obj["properties"].items():
            assert isinstance(spec.get("description"), str) and len(spec["description"]) > 15, f"{name}.{prop}"
            count += 1
    assert count == 1 + 15 + 2 + 10 + 7 + 16 + 5 + 8 + 7 + 10 + 5 + 5 + 14  # "$schema" + every field (mode, anomaly: 2; model: 10 with features, resize, reduced_decode, tiles, tile_overlap, views; head: 7 with kind, logistic_c, anomaly_feature; training: 16 with embed_on, ray_address, ray_actors; fine_tune: 10 with method, views, schedule, judge; video: 5, tracking: 5; anomaly section: 14 with score_neighbours, projection, standardise, score_top_k, search, nprobe)


def test_schema_required_and_excluded_fields() -> None:
    schema = config_json_schema()
    assert "required" not in schema  # data_folder_path or data.manifest_path, exactly one:
    assert [alternative["required"] for alternative in schema["oneOf"]] == [["data_folder_path"], ["data"]]
    assert "config_path" not in schema["properties"]
    assert "$schema" in schema["properties"]
    for name, obj in _objects(schema):
        if name != "Config":
            assert not obj.get("required"), name
    alpha = schema["$defs"]["ModelConfig"]["properties"]["alpha"]
    assert alpha["enum"] == [0.35, 0.5, 0.75, 1.0, 1.3, 1.4]
    assert "relative" in schema["properties"]["data_folder_path"]["description"]


# ----------------------------------------------------------------------------------------------
# Errors: the file itself
# ----------------------------------------------------------------------------------------------


def test_missing_file_names_the_absolute_path(project: Path, monkeypatch) -> None:
    monkeypatch.chdir(project)
    message = error_of(Path("nope.json"))
    assert message == f"config file not found: {project / 'nope.json'}"


def test_directory_instead_of_file(project: Path) -> None:
    message = error_of(project / "data")
    assert str(project / "data") in message
    assert "is a directory, not a file" in message
    write(project, {"data_folder_path": "data"})
    assert f"did you mean {project / 'config.json'}?" in error_of(project)


def test_invalid_json_line_and_column(project: Path, monkeypatch) -> None:
    write(project, '{\n  "data_folder_path": "data"\n  "training": {}\n}\n')
    monkeypatch.chdir(project)
    message = error_of(Path("config.json"))
    first, *rest = message.splitlines()
    assert first == "config.json: invalid JSON at line 3, column 3: Expecting ',' delimiter"
    assert rest == ['  3 |   "training": {}', "    |   ^"]


def test_invalid_json_trailing_comma_hint(project: Path) -> None:
    path = write(project, '{\n  "data_folder_path": "data",\n}')
    message = error_of(path)
    assert message.startswith(f"{path}: invalid JSON at line 3, column 1: Expecting property name")
    assert "trailing comma" in message


def test_invalid_json_comment_hint(project: Path) -> None:
    message = error_of(write(project, '{\n  // data\n  "data_folder_path": "data"\n}'))
    assert "line 2, column 3" in message and "comments" in message


def test_top_level_not_an_object(project: Path) -> None:
    path = write(project, "[1, 2]")
    assert error_of(path) == (
        f'{path}: the top level must be a JSON object ({{...}} with keys such as "data_folder_path"), got a list'
    )


def test_empty_file(project: Path) -> None:
    path = write(project, "  \n")
    assert error_of(path).startswith(f"{path}: the file is empty")


def test_duplicate_key(project: Path) -> None:
    path = write(project, '{"data_folder_path": "data", "training": {"epochs": 1, "epochs": 2}}')
    assert error_of(path) == f'{path}: invalid JSON: the key "epochs" appears twice in the same object; remove one'


def test_nan_is_rejected(project: Path) -> None:
    path = write(project, '{"data_folder_path": "data", "training": {"learning_rate": NaN}}')
    assert "NaN is not valid JSON" in error_of(path)


# ----------------------------------------------------------------------------------------------
# Errors: keys
# ----------------------------------------------------------------------------------------------


def test_missing_data_folder_path(project: Path) -> None:
    path = write(project, {"training": {"epochs": 3}})
    assert error_of(path) == (
        f"{path}: data_folder_path: required key is missing; expected the path of an existing folder holding "
        "training/<class>/ and testing/<class>/ (relative paths are resolved against the config file's folder), "
        "or set data.manifest_path to a CSV manifest instead"
    )


def test_unknown_nested_key_suggests_closest(project: Path) -> None:
    path = write(project, {"data_folder_path": "data", "training": {"epoch": 3}})
    assert error_of(path) == f"{path}: training.epoch: unknown key; did you mean 'training.epochs'?"


def test_unknown_key_is_case_insensitive_for_suggestions(project: Path) -> None:
    assert "did you mean 'head.dense_units'?" in bad(project, head={"Dense_Units": [3]})


def test_unknown_top_level_key_belonging_to_a_section(project: Path) -> None:
    assert "epochs: unknown key; did you mean 'training.epochs'?" in bad(project, epochs=3)


def test_unknown_top_level_typo(project: Path) -> None:
    assert "data_folder: unknown key; did you mean 'data_folder_path'?" in error_of(write(project, {"data_folder": "d"}))


def test_unknown_key_without_close_match_lists_valid_keys(project: Path) -> None:
    message = bad(project, model={"xyzzy": 1})
    assert message.endswith(
        "model.xyzzy: unknown key; valid keys in 'model' are: backbone, alpha, image_size, weights, features, resize, reduced_decode, tiles, tile_overlap, views"
    )


def test_schema_key_only_allowed_at_top_level(project: Path) -> None:
    assert "training.$schema: unknown key" in bad(project, training={"$schema": "x"})


# ----------------------------------------------------------------------------------------------
# Errors: types and ranges
# ----------------------------------------------------------------------------------------------

TYPE_CASES = [
    ({"training": {"epochs": "ten"}}, 'training.epochs: expected an integer >= 1, got "ten" (a string)'),
    ({"training": {"epochs": "10"}}, 'training.epochs: expected an integer >= 1, got "10" (a string)'),
    ({"training": {"epochs": True}}, "training.epochs: expected an integer >= 1, got true (a boolean)"),
    ({"training": {"epochs": 10.5}}, "training.epochs: expected an integer >= 1, got 10.5 (not a whole number)"),
    ({"training": {"epochs": 0}}, "training.epochs: expected an integer >= 1, got 0"),
    ({"training": {"batch_size": None}}, "training.batch_size: expected an integer >= 1, got null (null)"),
    ({"training": {"learning_rate": "0.001"}}, 'training.learning_rate: expected a number > 0, e.g. 0.001, got "0.001" (a string)'),
    ({"training": {"learning_rate": 0}}, "training.learning_rate: expected a number > 0, e.g. 0.001, got 0"),
    ({"training": {"validation_fraction": 2}}, "training.validation_fraction: expected a number >= 0 and < 0.9, e.g. 0.15, got 2"),
    ({"training": {"early_stopping_patience": -1}}, "training.early_stopping_patience: expected an integer >= 0, got -1"),
    ({"training": {"class_weight": "Balanced"}}, 'training.class_weight: expected "none" or "balanced", got "Balanced"'),
    ({"training": {"seed": False}}, "training.seed: expected an integer, got false (a boolean)"),
    ({"head": {"dense_units": 128}}, "head.dense_units: expected a list of integers >= 1, e.g. [128] or [256, 64] ([] for none), got 128 (an integer)"),
    ({"head": {"dense_units": [64, 0]}}, "head.dense_units[1]: expected an integer >= 1, got 0"),
    ({"head": {"dense_units": ["64"]}}, 'head.dense_units[0]: expected an integer >= 1, got "64" (a string)'),
    ({"head": {"dropout": 1}}, "head.dropout: expected a number >= 0 and < 1, got 1"),
    ({"model": 5}, "model: expected an object with any of the keys backbone, alpha, image_size, weights, features, resize, reduced_decode, tiles, tile_overlap, views, got 5 (an integer)"),
    ({"training": [1]}, "training: expected an object with any of the keys epochs, batch_size, learning_rate, validation_fraction, seed, early_stopping_patience, class_weight, oversample, deterministic, mixed_precision, distribute, cv_folds, cv_publish, embed_on, ray_address, ray_actors, got [1] (a list)"),
    ({"model": {"alpha": 0.6}}, "model.alpha: expected one of 0.35, 0.5, 0.75, 1.0, 1.3, 1.4, got 0.6"),
    ({"model": {"alpha": True}}, "model.alpha: expected one of 0.35, 0.5, 0.75, 1.0, 1.3, 1.4, got true (a boolean)"),
    ({"model": {"alpha": "1.0"}}, 'model.alpha: expected one of 0.35, 0.5, 0.75, 1.0, 1.3, 1.4, got "1.0" (a string)'),
    ({"model": {"backbone": "resnet50"}}, 'model.backbone: expected "mobilenet_v2", got "resnet50"'),
    ({"model": {"image_size": 16}}, "model.image_size: expected an integer from 32 to 1024, got 16"),
    ({"model": {"weights": None}}, 'model.weights: expected "imagenet", "none" or the path of an existing .h5 / .weights.h5 file, got null (null)'),
    ({"evaluation": {"threshold": 1.5}}, 'evaluation.threshold: expected "auto" or a number strictly between 0 and 1, e.g. 0.5, got 1.5'),
    ({"evaluation": {"threshold": 0}}, 'evaluation.threshold: expected "auto" or a number strictly between 0 and 1, e.g. 0.5, got 0'),
    ({"evaluation": {"threshold": "Auto"}}, 'evaluation.threshold: expected "auto" or a number strictly between 0 and 1, e.g. 0.5, got "Auto"'),
    ({"evaluation": {"threshold": True}}, 'evaluation.threshold: expected "auto" or a number strictly between 0 and 1, e.g. 0.5, got true (a boolean)'),
    ({"evaluation": {"min_validation_per_class": 0}}, "evaluation.min_validation_per_class: expected an integer >= 1, got 0"),
    ({"max_dropped_fraction": 1.5}, "max_dropped_fraction: expected a number from 0 to 1, e.g. 0.05, got 1.5"),
    ({"positive_class": 1}, "positive_class: expected the name of a class sub-folder, or null, got 1 (an integer)"),
    ({"positive_class": ""}, 'positive_class: expected the name of a class sub-folder, or null, got ""'),
    ({"run_name": "../escape"}, "run_name: \"../escape\" is not a safe folder name; expected a folder name of letters, digits, '.', '_' and '-' only, or null"),
    ({"run_name": ".."}, "run_name: \"..\" is not a safe folder name"),
    ({"output_dir": 3}, "output_dir: expected a folder path (it need not exist yet), got 3 (an integer)"),
]


@pytest.mark.parametrize("sections, expected", TYPE_CASES, ids=[e.split(":")[0] + "=" + e.split("got ")[-1] if "got " in e else e.split(":")[0] for _, e in TYPE_CASES])
def test_wrong_type_or_range(project: Path, sections: dict, expected: str) -> None:
    message = bad(project, **sections)
    path = project / "config.json"
    assert message.startswith(f"{path}: {expected}"), message
    assert "\n" not in message  # a single problem is a single line


def test_several_problems_are_listed_one_per_line(project: Path) -> None:
    path = write(
        project,
        {
            "data_folder_path": "data",
            "model": {"alpha": 0.6},
            "head": {"dense_units": 128},
            "training": {"epochs": "ten", "epoch": 3},
        },
    )
    lines = error_of(path).splitlines()
    assert lines[0] == f"{path}: 4 problems:"
    assert lines[1:] == [
        "  model.alpha: expected one of 0.35, 0.5, 0.75, 1.0, 1.3, 1.4, got 0.6",
        "  head.dense_units: expected a list of integers >= 1, e.g. [128] or [256, 64] ([] for none), got 128 (an integer)",
        '  training.epochs: expected an integer >= 1, got "ten" (a string)',
        "  training.epoch: unknown key; did you mean 'training.epochs'?",
    ]


# ----------------------------------------------------------------------------------------------
# Errors: paths
# ----------------------------------------------------------------------------------------------


def test_data_folder_does_not_exist(project: Path) -> None:
    path = write(project, {"data_folder_path": "images/train"})
    assert error_of(path) == (
        f'{path}: data_folder_path: "images/train" resolved to {project / "images" / "train"}, which does not exist; '
        "expected the path of an existing folder holding training/<class>/ and testing/<class>/ "
        "(relative paths are resolved against the config file's folder)"
    )


def test_data_folder_is_a_file(project: Path) -> None:
    (project / "labels.csv").write_text("x")
    message = error_of(write(project, {"data_folder_path": "labels.csv"}))
    assert f'data_folder_path: "labels.csv" resolved to {project / "labels.csv"}, which is a file, not a folder' in message


def test_data_folder_empty_string(project: Path) -> None:
    assert 'data_folder_path: "" is an empty path' in error_of(write(project, {"data_folder_path": ""}))


def test_weights_file_missing(project: Path) -> None:
    message = bad(project, model={"weights": "weights/mine.h5"})
    assert message.endswith(
        f'model.weights: "weights/mine.h5" resolved to {project / "weights" / "mine.h5"}, which does not exist; '
        'expected "imagenet", "none" or the path of an existing .h5 / .weights.h5 file '
        "(relative paths are resolved against the config file's folder)"
    )


def test_weights_is_a_directory_or_not_h5(project: Path) -> None:
    assert "which is a directory, not a file" in bad(project, model={"weights": "data"})
    (project / "w.keras").write_bytes(b"")
    assert "which is not a .h5 / .weights.h5 file" in bad(project, model={"weights": "w.keras"})


def test_weights_keywords_are_case_sensitive(project: Path) -> None:
    assert f'"ImageNet" resolved to {project / "ImageNet"}, which does not exist' in bad(project, model={"weights": "ImageNet"})
    assert load_config(write(project, {"data_folder_path": "data", "model": {"weights": "none"}})).model.weights == "none"


def test_output_dir_that_is_a_file(project: Path) -> None:
    (project / "runs.txt").write_text("x")
    assert f'output_dir: "runs.txt" resolved to {project / "runs.txt"}, which exists and is a file' in bad(project, output_dir="runs.txt")


# ----------------------------------------------------------------------------------------------
# --set overrides
# ----------------------------------------------------------------------------------------------


def test_overrides_are_applied(project: Path) -> None:
    (project / "other" / "a").mkdir(parents=True)
    cfg = load_config(
        write(project, {"data_folder_path": "data", "training": {"batch_size": 4}}),
        [
            "training.epochs=3",
            "head.dense_units=[64,32]",
            "evaluation.threshold=0.4",
            "model.weights=none",
            "data_folder_path=other",
            "run_name=exp1",
            "positive_class=null",
            "evaluation.threshold=auto",
            "training={\"seed\": 7}",
        ],
    )
    assert cfg.training.epochs == 3 and cfg.training.batch_size == 4 and cfg.training.seed == 7
    assert cfg.head.dense_units == [64, 32]
    assert cfg.evaluation.threshold == "auto"  # the later override wins
    assert cfg.model.weights == "none"
    assert cfg.data_folder_path == project / "other"  # relative to the config folder, not the cwd
    assert cfg.run_name == "exp1" and cfg.positive_class is None


def test_override_error_says_it_came_from_set(project: Path) -> None:
    path = write(project, {"data_folder_path": "data"})
    assert error_of(path, ["training.epochs=0"]) == (
        f"{path}: training.epochs (from --set training.epochs=0): expected an integer >= 1, got 0"
    )


def test_override_unknown_key_gets_did_you_mean(project: Path) -> None:
    path = write(project, {"data_folder_path": "data"})
    assert error_of(path, ["training.epoch=3"]) == (
        f"{path}: training.epoch (from --set training.epoch=3): unknown key; did you mean 'training.epochs'?"
    )
    assert error_of(path, ["trainig.epochs=3"]) == (
        f"{path}: trainig (from --set trainig.epochs=3): unknown key; did you mean 'training'?"
    )


def test_override_string_that_parses_as_json_gets_a_quoting_hint(project: Path) -> None:
    message = error_of(write(project, {"data_folder_path": "data"}), ["run_name=123"])
    assert message.endswith(
        "run_name (from --set run_name=123): expected a folder name of letters, digits, '.', '_' and '-' only, "
        "or null, got 123 (an integer); to pass it as a string, quote it: --set 'run_name=\"123\"'"
    )
    assert load_config(project / "config.json", ['run_name="123"']).run_name == "123"


def test_override_missing_path(project: Path) -> None:
    message = error_of(write(project, {"data_folder_path": "data"}), ["data_folder_path=nowhere"])
    assert (
        f'data_folder_path (from --set data_folder_path=nowhere): "nowhere" resolved to {project / "nowhere"}, '
        "which does not exist"
    ) in message


def test_file_errors_are_not_attributed_to_set(project: Path) -> None:
    message = error_of(write(project, {"data_folder_path": "data", "training": {"batch_size": 0}}), ["training.epochs=0"])
    assert "training.batch_size: expected an integer >= 1, got 0" in message
    assert "training.epochs (from --set training.epochs=0)" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("training.epochs", "invalid --set 'training.epochs': expected section.key=value or key=value (e.g. --set training.epochs=3)"),
        ("=3", "invalid --set '=3': the key '' is empty or has an empty part"),
        ("training..epochs=3", "invalid --set 'training..epochs=3': the key 'training..epochs' is empty or has an empty part"),
        ("training.epochs.max=3", "invalid --set 'training.epochs.max=3': 'training.epochs' is a single value, not a section, so it has no key 'max'; use --set training.epochs=VALUE"),
    ],
)
def test_malformed_overrides(project: Path, override: str, expected: str) -> None:
    assert error_of(write(project, {"data_folder_path": "data"}), [override]).startswith(expected)


def test_override_inside_a_non_object_from_the_file(project: Path) -> None:
    path = write(project, {"data_folder_path": "data", "training": 5})
    assert error_of(path, ["training.epochs=3"]) == (
        f"invalid --set 'training.epochs=3': 'training' is 5 (in {path}), not an object, so it has no key 'epochs'"
    )


def test_malformed_override_reported_before_reading_the_file(project: Path) -> None:
    assert error_of(project / "missing.json", ["oops"]).startswith("invalid --set 'oops'")


def test_overrides_do_not_modify_the_file(project: Path) -> None:
    path = write(project, {"data_folder_path": "data"})
    before = path.read_text()
    load_config(path, ["training.epochs=3"])
    assert path.read_text() == before


def test_config_errors_are_config_errors_not_pydantic(project: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"data_folder_path": "data", "training": {"epochs": "x"}}, project)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert isinstance(Config.model_json_schema(), dict)


def test_number_for_a_string_field_is_named_a_number(project: Path) -> None:
    assert "run_name: expected a folder name of letters, digits, '.', '_' and '-' only, or null, got 1.5 (a number)" in bad(
        project, run_name=1.5
    )


# ----------------------------------------------------------------------------------------------
# The data section: CSV manifest instead of a folder, group-aware splitting, audit
# ----------------------------------------------------------------------------------------------


def test_data_section_defaults(project: Path) -> None:
    cfg = load_config(write(project, {"data_folder_path": "data"}))
    d = cfg.data
    assert d.manifest_path is None and d.group_pattern is None and d.drop_leaked_test is False
    assert d.test_fraction == 0.2 and 0 < d.near_duplicate_similarity <= 1 and d.near_duplicate_hash_distance >= 0


def test_manifest_replaces_the_data_folder(project: Path) -> None:
    (project / "lists").mkdir()
    (project / "lists" / "labels.csv").write_text("path,label\n")
    cfg = load_config(write(project, {"data": {"manifest_path": "lists/labels.csv", "group_pattern": "^(v\\d+)_"}}))
    assert cfg.data_folder_path is None
    assert cfg.data.manifest_path == project / "lists" / "labels.csv" and cfg.data.manifest_path.is_absolute()
    saved = project / "saved.json"
    save_config(cfg, saved)
    assert load_config(saved).data.manifest_path == cfg.data.manifest_path  # round trip with data_folder_path null


def test_manifest_and_folder_together_is_an_error(project: Path) -> None:
    (project / "labels.csv").write_text("path,label\n")
    message = bad(project, data={"manifest_path": "labels.csv"})
    assert message == (
        f"{project / 'config.json'}: data_folder_path and data.manifest_path are both set; keep one: the images come "
        "either from a folder or from a CSV manifest (to drop the folder with --set, use --set data_folder_path=null)"
    )


def test_null_data_folder_without_manifest(project: Path) -> None:
    message = error_of(write(project, {"data_folder_path": None}))
    assert "data_folder_path: is null and data.manifest_path is not set; give one of them" in message
    assert "data.manifest_path" in message and "\n" not in message


def test_manifest_path_errors(project: Path) -> None:
    path = write(project, {"data": {"manifest_path": "missing.csv"}})
    assert error_of(path) == (
        f'{path}: data.manifest_path: "missing.csv" resolved to {project / "missing.csv"}, which does not exist; '
        "expected the path of an existing CSV file with columns path,label[,split,group], or null "
        "(relative paths are resolved against the config file's folder)"
    )
    assert "which is a directory, not a file" in error_of(write(project, {"data": {"manifest_path": "data"}}))


DATA_CASES = [
    ({"group_pattern": "(unclosed"}, 'data.group_pattern: "(unclosed" is not a valid regular expression (missing ), unterminated subpattern at position 0); expected a regular expression (Python syntax), or null'),
    ({"group_pattern": 3}, "data.group_pattern: expected a regular expression (Python syntax), or null, got 3 (an integer)"),
    ({"test_fraction": 0.95}, "data.test_fraction: expected a number >= 0 and < 0.9, e.g. 0.2, got 0.95"),
    ({"drop_leaked_test": "yes"}, 'data.drop_leaked_test: expected true or false, got "yes" (a string)'),
    ({"drop_leaked_test": 1}, "data.drop_leaked_test: expected true or false, got 1 (an integer)"),
    ({"near_duplicate_similarity": 0}, "data.near_duplicate_similarity: expected a number > 0 and <= 1, e.g. 0.95, got 0"),
    ({"near_duplicate_hash_distance": 65}, "data.near_duplicate_hash_distance: expected an integer from -1 to 64, got 65"),
    ({"split": "group"}, "data.split: unknown key; valid keys in 'data' are: manifest_path, group_pattern, frame_pattern, test_fraction, drop_leaked_test, near_duplicate_similarity, auto_groups, near_duplicate_hash_distance"),
]


@pytest.mark.parametrize("section, expected", DATA_CASES, ids=[e.split(":")[0] + "-" + str(i) for i, (_, e) in enumerate(DATA_CASES)])
def test_data_section_errors(project: Path, section: dict, expected: str) -> None:
    message = bad(project, data=section)
    assert message == f"{project / 'config.json'}: {expected}", message


def test_data_override_with_set(project: Path) -> None:
    (project / "labels.csv").write_text("path,label\n")
    path = write(project, {"data_folder_path": "data"})
    cfg = load_config(path, ["data_folder_path=null", "data.manifest_path=labels.csv", "data.drop_leaked_test=true"])
    assert cfg.data_folder_path is None and cfg.data.manifest_path == project / "labels.csv" and cfg.data.drop_leaked_test


# ----------------------------------------------------------------------------------------------
# Fine-tuning, augmentation and the training options of issue #4
# ----------------------------------------------------------------------------------------------


def test_training_sections_defaults(project: Path) -> None:
    cfg = load_config(write(project, {"data_folder_path": "data"}))
    t, a, f = cfg.training, cfg.augmentation, cfg.fine_tune
    assert (t.oversample, t.deterministic, t.mixed_precision, t.distribute) == (False, False, False, "auto")
    assert (a.flip, a.rotation, a.brightness, a.contrast, a.zoom, a.crop, a.frozen_views) == (
        "horizontal_and_vertical", 0.05, 0.1, 0.1, 0.1, 0.0, 0)
    assert (f.enabled, f.unfreeze, f.learning_rate, f.epochs, f.patience, f.augment) == (False, "block_16_expand", 3e-5, 10, 3, True)
    assert (f.method, f.views, f.schedule) == ("cached_top", 8, "cosine")


def test_fine_tune_unfreeze_takes_a_count_or_a_layer_name(project: Path) -> None:
    for value in (1, 154, "block_13_expand", "Conv_1", "expanded_conv_project_BN", "block_16_project"):
        cfg = load_config(write(project, {"data_folder_path": "data", "fine_tune": {"enabled": True, "unfreeze": value}}))
        assert cfg.fine_tune.unfreeze == value and type(cfg.fine_tune.unfreeze) is type(value)


def test_new_sections_round_trip_and_take_overrides(project: Path, tmp_path: Path) -> None:
    path = write(project, {"data_folder_path": "data"})
    cfg = load_config(path, ["fine_tune.enabled=true", "fine_tune.unfreeze=block_14_add", "training.oversample=true",
                             "augmentation.flip=none", "training.distribute=mirrored"])
    assert cfg.fine_tune.enabled and cfg.fine_tune.unfreeze == "block_14_add" and cfg.training.oversample
    assert cfg.augmentation.flip == "none" and cfg.training.distribute == "mirrored"
    save_config(cfg, tmp_path / "saved.json")
    assert load_config(tmp_path / "saved.json").model_dump() == cfg.model_dump()


ISSUE4_CASES = [
    ({"training": {"oversample": "yes"}}, 'training.oversample: expected true or false, got "yes" (a string)'),
    ({"training": {"deterministic": 1}}, "training.deterministic: expected true or false, got 1 (an integer)"),
    ({"training": {"mixed_precision": None}}, "training.mixed_precision: expected true or false, got null (null)"),
    ({"training": {"distribute": "multi"}}, 'training.distribute: expected "auto", "off", "mirrored" or "multi_worker", got "multi"'),
    ({"augmentation": {"flip": "both"}}, 'augmentation.flip: expected "none", "horizontal", "vertical" or "horizontal_and_vertical", got "both"'),
    ({"augmentation": {"rotation": 0.6}}, "augmentation.rotation: expected a number from 0 to 0.5, e.g. 0.05, got 0.6"),
    ({"augmentation": {"brightness": -0.1}}, "augmentation.brightness: expected a number from 0 to 1, e.g. 0.1, got -0.1"),
    ({"augmentation": {"contrast": "0.1"}}, 'augmentation.contrast: expected a number from 0 to 1, e.g. 0.1, got "0.1" (a string)'),
    ({"augmentation": {"zoom": 1}}, "augmentation.zoom: expected a number >= 0 and < 1, e.g. 0.1, got 1"),
    ({"augmentation": {"crop": 0.5}}, "augmentation.crop: expected a number >= 0 and < 0.5, e.g. 0.1, got 0.5"),
    ({"augmentation": {"frozen_views": 17}}, "augmentation.frozen_views: expected an integer from 0 to 16, got 17"),
    ({"augmentation": {"frozen_views": 1.5}}, "augmentation.frozen_views: expected an integer from 0 to 16, got 1.5 (not a whole number)"),
    ({"augmentation": {"flips": "none"}}, "augmentation.flips: unknown key; did you mean 'augmentation.flip'?"),
    ({"fine_tune": {"enabled": "true"}}, 'fine_tune.enabled: expected true or false, got "true" (a string)'),
    ({"fine_tune": {"unfreeze": 0}}, 'fine_tune.unfreeze: expected an integer >= 1 or a MobileNetV2 layer name such as "block_13_expand", got 0'),
    ({"fine_tune": {"unfreeze": True}}, 'fine_tune.unfreeze: expected an integer >= 1 or a MobileNetV2 layer name such as "block_13_expand", got true (a boolean)'),
    ({"fine_tune": {"unfreeze": 2.5}}, 'fine_tune.unfreeze: expected an integer >= 1 or a MobileNetV2 layer name such as "block_13_expand", got 2.5 (not a whole number)'),
    ({"fine_tune": {"unfreeze": "block_17_add"}}, 'fine_tune.unfreeze: expected an integer >= 1 or a MobileNetV2 layer name such as "block_13_expand", got "block_17_add"'),
    ({"fine_tune": {"unfreeze": ""}}, 'fine_tune.unfreeze: expected an integer >= 1 or a MobileNetV2 layer name such as "block_13_expand", got ""'),
    ({"fine_tune": {"learning_rate": 0}}, "fine_tune.learning_rate: expected a number > 0, e.g. 0.00001, got 0"),
    ({"fine_tune": {"epochs": 0}}, "fine_tune.epochs: expected an integer >= 1, got 0"),
    ({"fine_tune": {"patience": -1}}, "fine_tune.patience: expected an integer >= 0, got -1"),
    ({"fine_tune": {"augment": "no"}}, 'fine_tune.augment: expected true or false, got "no" (a string)'),
    ({"fine_tune": {"judge": "test"}}, 'fine_tune.judge: expected "folds" or "validation", got "test"'),
    ({"fine_tune": True}, "fine_tune: expected an object with any of the keys enabled, unfreeze, learning_rate, epochs, patience, augment, method, views, schedule, judge, got true (a boolean)"),
    ({"fine_tune": {"unfreez": 3}}, "fine_tune.unfreez: unknown key; did you mean 'fine_tune.unfreeze'?"),
    ({"augment": {}}, "augment: unknown key; did you mean 'augmentation'?"),
]


@pytest.mark.parametrize("sections, expected", ISSUE4_CASES, ids=[e.split(":")[0] + "-" + str(i) for i, (_, e) in enumerate(ISSUE4_CASES)])
def test_training_section_errors(project: Path, sections: dict, expected: str) -> None:
    message = bad(project, **sections)
    assert message == f"{project / 'config.json'}: {expected}", message
