"""The config error cases through the real CLI: exit code 2, the message on stderr, no traceback.

With click >= 8.2 CliRunner keeps stderr apart: ``result.stderr`` holds what the CLI printed to
stderr, ``result.stdout`` the rest, and ``result.output`` both interleaved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keeneye.cli import app

runner = CliRunner()


def write(folder: Path, content) -> Path:
    path = folder / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2), encoding="utf-8")
    return path


def check(path: Path, *overrides: str):
    args = ["config", "check", str(path)]
    for override in overrides:
        args += ["--set", override]
    return runner.invoke(app, args)


def assert_config_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stdout == ""  # nothing but the error, and that on stderr
    assert "error:" in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in {result.stderr!r}"
    assert "Input should" not in result.stderr and "validation error" not in result.stderr


def test_check_valid_config_prints_resolved_json(project: Path) -> None:
    result = check(write(project, {"data_folder_path": "data"}), "training.epochs=3")
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.stdout)
    assert resolved["data_folder_path"] == str(project / "data")
    assert resolved["output_dir"] == str(project / "runs")
    assert resolved["training"]["epochs"] == 3
    assert "config_path" not in resolved


def test_schema_prints_valid_json() -> None:
    result = runner.invoke(app, ["config", "schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert schema["oneOf"][0] == {"required": ["data_folder_path"]}  # or data.manifest_path
    assert schema["properties"]["data_folder_path"]["description"]


def test_missing_file(project: Path) -> None:
    assert_config_error(check(project / "nope.json"), f"config file not found: {project / 'nope.json'}")


def test_directory_instead_of_file(project: Path) -> None:
    assert_config_error(check(project / "data"), f"config file {project / 'data'} is a directory, not a file")


def test_invalid_json(project: Path) -> None:
    path = write(project, '{\n  "data_folder_path": "data"\n  "training": {}\n}\n')
    assert_config_error(check(path), f"{path}: invalid JSON at line 3, column 3: Expecting ',' delimiter")


def test_top_level_not_an_object(project: Path) -> None:
    path = write(project, '"data"')
    assert_config_error(check(path), f"{path}: the top level must be a JSON object", "got a string")


def test_missing_required_key(project: Path) -> None:
    path = write(project, {})
    assert_config_error(check(path), f"{path}: data_folder_path: required key is missing; expected the path of an existing folder")


def test_unknown_key(project: Path) -> None:
    path = write(project, {"data_folder_path": "data", "training": {"epoch": 3}})
    assert_config_error(check(path), f"{path}: training.epoch: unknown key; did you mean 'training.epochs'?")


def test_unknown_key_without_suggestion(project: Path) -> None:
    path = write(project, {"data_folder_path": "data", "evaluation": {"zzz": 1}})
    assert_config_error(check(path), "evaluation.zzz: unknown key; valid keys in 'evaluation' are: threshold, min_validation_per_class")


@pytest.mark.parametrize(
    "sections, fragment",
    [
        ({"training": {"epochs": "ten"}}, 'training.epochs: expected an integer >= 1, got "ten" (a string)'),
        ({"head": {"dense_units": 128}}, "head.dense_units: expected a list of integers >= 1, e.g. [128] or [256, 64] ([] for none), got 128 (an integer)"),
        ({"model": 5}, "model: expected an object with any of the keys backbone, alpha, image_size, weights, features, resize, reduced_decode, tiles, tile_overlap, views, got 5 (an integer)"),
        ({"model": {"alpha": 0.6}}, "model.alpha: expected one of 0.35, 0.5, 0.75, 1.0, 1.3, 1.4, got 0.6"),
        ({"training": {"validation_fraction": 2}}, "training.validation_fraction: expected a number >= 0 and < 0.9, e.g. 0.15, got 2"),
        ({"training": {"epochs": True}}, "training.epochs: expected an integer >= 1, got true (a boolean)"),
    ],
)
def test_wrong_type_or_range(project: Path, sections: dict, fragment: str) -> None:
    path = write(project, {"data_folder_path": "data", **sections})
    assert_config_error(check(path), f"{path}: {fragment}")


def test_several_problems(project: Path) -> None:
    path = write(project, {"data_folder_path": "data", "model": {"alpha": 0.6}, "training": {"epoch": 3}})
    result = check(path)
    assert_config_error(result, f"{path}: 2 problems:\n", "\n  model.alpha: expected one of", "\n  training.epoch: unknown key")


def test_data_folder_missing(project: Path) -> None:
    path = write(project, {"data_folder_path": "images"})
    assert_config_error(check(path), f'data_folder_path: "images" resolved to {project / "images"}, which does not exist')


def test_data_folder_is_a_file(project: Path) -> None:
    (project / "list.txt").write_text("x")
    path = write(project, {"data_folder_path": "list.txt"})
    assert_config_error(check(path), f'data_folder_path: "list.txt" resolved to {project / "list.txt"}, which is a file, not a folder')


def test_weights_missing(project: Path) -> None:
    path = write(project, {"data_folder_path": "data", "model": {"weights": "w.h5"}})
    assert_config_error(check(path), f'model.weights: "w.h5" resolved to {project / "w.h5"}, which does not exist')


def test_override_error_names_set(project: Path) -> None:
    path = write(project, {"data_folder_path": "data"})
    assert_config_error(
        check(path, "training.epochs=0"),
        f"{path}: training.epochs (from --set training.epochs=0): expected an integer >= 1, got 0",
    )


def test_override_unknown_key(project: Path) -> None:
    path = write(project, {"data_folder_path": "data"})
    assert_config_error(
        check(path, "model.alfa=0.5"), "model.alfa (from --set model.alfa=0.5): unknown key; did you mean 'model.alpha'?"
    )


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("training.epochs", "invalid --set 'training.epochs': expected section.key=value or key=value"),
        ("=3", "invalid --set '=3': the key '' is empty"),
        ("training.epochs.max=3", "'training.epochs' is a single value, not a section, so it has no key 'max'"),
    ],
)
def test_malformed_override(project: Path, override: str, fragment: str) -> None:
    assert_config_error(check(write(project, {"data_folder_path": "data"}), override), fragment)


def test_user_values_are_printed_verbatim(project: Path) -> None:
    path = write(project, {"data_folder_path": "data", "run_name": "[red]x"})
    assert_config_error(check(path), 'run_name: "[red]x" is not a safe folder name')
