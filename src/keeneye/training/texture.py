"""Fitting the texture projection of model.features "multi+cov" on the run's own images.

Why fitted and not fixed: the second moment of a 192-channel block is 18,528 numbers, so its positions
are projected to TEXTURE_DIM axes first. On magnetic-tile (5 group folds) a seeded random projection
kept none of the second moment's gain (AP +0.005, 3 of 5 folds), the principal axes of the training
images' positions kept all of it (benchmarks/texture_pooling.py, README). The fit is unlabelled and
reads only images that are not given as testing (like model.tiles "auto"), so the testing split
never shapes a feature; the projection then lives in the extractor's weights (the bundle, its ONNX
and every export compute it), and its hash is part of the embedding cache key.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from keeneye.data.preprocess import InputSpec
from keeneye.errors import DataError
from keeneye.model.backbone import TEXTURE_DIM, set_texture_projection, texture_maps_model
from keeneye.model.patchcore import fit_patch_transform
from keeneye.runtime.batches import run_engine

#: Images the projection is fitted on (a random sample; the positions of 128 images measured as well as
#: 60,000 positions drawn from all of magnetic-tile's training folds).
MAX_IMAGES = 128
#: Positions kept for the PCA, drawn evenly from the sampled images (100,000 x 192 floats: 77 MB).
MAX_POSITIONS = 100_000


def fit_texture_projection(extractor: Any, paths: Sequence[str], spec: InputSpec, seed: int, batch_size: int = 32,
                           progress: Callable[[int], None] | None = None) -> int:
    """Set `extractor`'s texture projection to the principal axes of TEXTURE_LAYER's positions in up to
    MAX_IMAGES of `paths` (as they lie: no views; every tile of a tiled image). Returns how many images it used.

    Files that fail to decode are left out of the sample only: the embedding pass reports them.
    """
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(paths), size=min(MAX_IMAGES, len(paths)), replace=False).tolist()) if len(paths) else []
    maps = texture_maps_model(extractor)
    size = int(maps.input_shape[1])
    single = spec.image_only()
    per_image = max(1, MAX_POSITIONS // max(1, len(chosen)))
    kept: list[np.ndarray] = []

    def positions(batch: np.ndarray) -> np.ndarray:
        squares = batch.reshape(-1, size, size, 3)
        out = np.asarray(maps.predict_on_batch(squares), np.float32)
        return out.reshape(len(batch), -1, out.shape[-1])

    def sink(keys: list[int], result: np.ndarray) -> None:
        for image in result:
            take = rng.choice(len(image), size=min(per_image, len(image)), replace=False)
            kept.append(image[np.sort(take)])

    run = run_engine(positions, [paths[i] for i in chosen], single, batch_size, progress=progress, sink=sink)
    if not kept:
        raise DataError("model.features multi+cov: none of the sampled training images could be decoded "
                         f"({len(run.failures)} failed), so the texture projection cannot be fitted")
    kernel, bias = fit_patch_transform(np.concatenate(kept), TEXTURE_DIM, "pca", seed=seed)
    set_texture_projection(extractor, kernel, bias)
    return len(kept)
