"""Real ImageNet weights on real inspection photos: a small casting subset must reach test F1 >= 0.90."""

from __future__ import annotations

from pathlib import Path

import pytest

from rich.console import Console

from keeneye import api
from keeneye.config import config_from_dict


def casting_subset(source: Path, target: Path, per_class: dict[str, int]) -> Path:
    """Symlinks to the first N images per split and class (sorted names: deterministic, no copies)."""
    for split, folder in (("training", "train"), ("testing", "test")):
        for label in ("def_front", "ok_front"):
            destination = target / split / label
            destination.mkdir(parents=True)
            for image in sorted((source / folder / label).glob("*.jpeg"))[: per_class[split]]:
                (destination / image.name).symlink_to(image)
    return target


@pytest.mark.slow
def test_casting_subset_reaches_f1_090(tmp_path, casting_data, imagenet_weights) -> None:
    data = casting_subset(casting_data, tmp_path / "data", {"training": 60, "testing": 40})
    config = config_from_dict(
        {
            "data_folder_path": str(data),
            "output_dir": str(tmp_path / "runs"),
            "model": {"weights": str(imagenet_weights)},
            "training": {"epochs": 60, "validation_fraction": 0.2, "early_stopping_patience": 8, "seed": 1},
        },
        base_dir=tmp_path,
    )
    result = api.train(config, console=Console(quiet=True))
    assert result.class_names == ("ok_front", "def_front")  # positive class inferred from the folder names
    assert result.metrics["n"] == 80
    assert result.metrics["at_threshold"]["f1"] >= 0.90, result.metrics["at_threshold"]
