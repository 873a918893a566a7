"""The embedded default: a small, seeded two-class inspection set (textured surfaces, some scratched).

`keeneye demo` writes it, writes a config for it, then trains and evaluates, so a new user sees
the whole flow in a minute without bringing data.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

DEMO_CLASSES = ("good", "defect")


def surface_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A brushed-metal-like grey surface: smoothed noise, directional grain and uneven lighting."""
    noise = rng.normal(0, 1, (size, size)).astype(np.float32)
    grain = cv2.GaussianBlur(noise, (0, 0), sigmaX=float(rng.uniform(6, 14)), sigmaY=float(rng.uniform(0.5, 1.5)))
    blotches = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), sigmaX=size / 10)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    light = float(rng.uniform(-25, 25)) * (xx - 0.5) + float(rng.uniform(-25, 25)) * (yy - 0.5)
    base = float(rng.uniform(110, 160))
    gray = base + light + 18 * grain / (grain.std() + 1e-6) + 10 * blotches / (blotches.std() + 1e-6)
    tint = rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    return np.clip(gray[..., None] * tint, 0, 255).astype(np.uint8)


def add_defect(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """A dark scratch, a cluster of pits or a bright crack."""
    size = image.shape[0]
    out = image.copy()
    kind = rng.integers(3)
    if kind == 0:
        start = rng.uniform(0.15, 0.85, 2) * size
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.3, 0.6) * size
        end = start + length * np.array([np.cos(angle), np.sin(angle)])
        cv2.line(out, tuple(int(v) for v in start), tuple(int(v) for v in end), (35, 35, 35), int(rng.integers(2, 4)), cv2.LINE_AA)
    elif kind == 1:
        center = rng.uniform(0.2, 0.8, 2) * size
        for _ in range(int(rng.integers(4, 9))):
            point = center + rng.normal(0, size * 0.06, 2)
            cv2.circle(out, tuple(int(v) for v in point), int(rng.integers(2, 5)), (30, 30, 30), -1, cv2.LINE_AA)
    else:
        points = [rng.uniform(0.1, 0.9, 2) * size]
        for _ in range(5):
            points.append(points[-1] + rng.normal(0, size * 0.08, 2))
        polyline = np.array(points, dtype=np.int32).reshape(-1, 1, 2)
        cv2.polylines(out, [polyline], False, (235, 235, 235), 2, cv2.LINE_AA)
    return out


def make_demo_dataset(folder: Path, seed: int = 0, train_per_class: int = 60, test_per_class: int = 30, size: int = 160) -> Path:
    """Write `folder/{training,testing}/{good,defect}/*.png`; returns `folder`."""
    rng = np.random.default_rng(seed)
    for split, count in (("training", train_per_class), ("testing", test_per_class)):
        for label in DEMO_CLASSES:
            target = folder / split / label
            target.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                image = surface_texture(rng, size)
                if label == "defect":
                    image = add_defect(rng, image)
                cv2.imwrite(str(target / f"{label}_{index:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return folder


def write_demo_config(folder: Path, data_folder: Path, output_dir: Path, extra: dict | None = None) -> Path:
    """A config.json for the demo data (relative paths, as a user would write it)."""
    config = {
        "data_folder_path": str(data_folder),
        "output_dir": str(output_dir),
        "run_name": "demo",
        "positive_class": "defect",
        "head": {"dense_units": [64], "dropout": 0.2},
        "training": {"epochs": 60, "batch_size": 16, "validation_fraction": 0.25, "early_stopping_patience": 8, "seed": 0},
    }
    for key, value in (extra or {}).items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path
