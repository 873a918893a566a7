"""Grad-CAM for every model.features mode and for stacks of tiles or views.

The maps are computed per square of the input stack and laid back where the squares came from
(data/preprocess.InputSpec.lay_over_image); with tiles the overlay outlines the tile that decided
(tests/test_features_tiles.py checks that it is the one carrying the defect).
"""

from __future__ import annotations

import numpy as np
import pytest

from keeneye.data.preprocess import VIEW_SETS, InputSpec, dihedral, tile_boxes, undo_dihedral


def test_maps_of_turned_views_are_turned_back_onto_the_image():
    square = np.random.default_rng(0).random((7, 7)).astype(np.float32)
    for view in range(8):
        assert np.array_equal(undo_dihedral(dihedral(square[None], view), view)[0], square)
    views = np.stack([dihedral(square[None], view)[0] for view in VIEW_SETS[8]])  # what each view's map would show
    np.testing.assert_allclose(InputSpec(16, views=8).lay_over_image(views, 7, 7), square, atol=1e-6)
    assert not np.allclose(views.mean(axis=0), square)  # without turning them back the views would blur: the test can fail


def test_each_tile_map_lands_on_its_tile_and_a_single_square_follows_the_resize_rule():
    spec = InputSpec(16, tiles=(1, 3), overlap=0.0)
    maps = np.zeros((3, 3, 3), np.float32)
    maps[2] = 1.0  # only the last tile lights up
    heat = spec.lay_over_image(maps, 40, 120)
    top, left, side = tile_boxes(40, 120, 1, 3, 0.0)[2]
    assert heat.shape == (40, 120) and left == 80 and side == 40
    assert np.allclose(heat[:, 80:], 1.0) and np.all(heat[:, :80] == 0.0)

    for height, width, rows, cols in [(500, 1250, 2, 4), (37, 91, 3, 2), (1000, 333, 5, 1), (100, 300, 1, 3)]:
        grid = InputSpec(16, tiles=(rows, cols), overlap=0.25)  # tiles longer than a side start before the image
        assert np.allclose(grid.lay_over_image(np.ones((rows * cols, 3, 3), np.float32), height, width), 1.0)  # all covered

    ones = np.ones((1, 4, 4), np.float32)
    cropped = InputSpec(16, "crop").lay_over_image(ones, 60, 100)  # the model saw the centre 60 x 60 only
    assert np.allclose(cropped[:, 20:80], 1.0) and np.all(cropped[:, :20] == 0.0) and np.all(cropped[:, 80:] == 0.0)
    letterbox = np.zeros((1, 100, 100), np.float32)
    letterbox[0, 25:75] = 1.0  # the image fills the middle band of the padded square
    assert np.allclose(InputSpec(16, "pad").lay_over_image(letterbox, 50, 100), 1.0)


@pytest.mark.parametrize("features,tiles,views", [("multi", None, 2), ("gap+gmp", (1, 2), 1), ("multi+cov", None, 1)])
def test_grad_cam_gives_the_models_probability_and_a_map_per_square(imagenet_weights, features, tiles, views):
    """The graph Grad-CAM differentiates is the bundle's own (same probability), for stacked inputs too."""
    import keras

    from keeneye.demo import add_defect, surface_texture
    from keeneye.model.backbone import build_input_extractor, resolve_weights
    from keeneye.model.gradcam import GradCam, explain_batch
    from keeneye.model.head import build_classifier, build_head

    spec = InputSpec(96, tiles=tiles, views=views)
    extractor = build_input_extractor(1.0, 96, resolve_weights("imagenet", 1.0, 96), features, spec.n_tiles, views)
    keras.utils.set_random_seed(0)
    head = build_head(extractor.output_shape[-1], [], 0.0)  # one linear unit: the logit is k . features + b
    classifier = build_classifier(extractor, head)
    rng = np.random.default_rng(4)
    images = [add_defect(rng, surface_texture(rng, 96)) for _ in range(2)] + [surface_texture(rng, 96)]
    if tiles:
        images = [np.concatenate([image, surface_texture(rng, 96)], 1) for image in images]
    batch = np.stack([spec.prepare(image) for image in images])
    cam = GradCam(classifier)
    found = cam.explain(batch, 0.5)
    np.testing.assert_allclose(found.probabilities, np.asarray(classifier.predict(batch, verbose=0)).ravel(), atol=1e-5)
    grid = {"multi": 6, "multi+cov": 12}.get(features, 3)  # block_13 (stride 16), block_6 (8) or the last block (32) at 96 px
    assert found.maps.shape == (3, spec.passes, grid, grid) and found.shares.shape == (3, spec.passes)
    assert np.allclose(found.maps.reshape(3, -1).max(axis=1), 1.0)  # each image has a map: the gradient got through
    if features == "multi":
        expected = multi_maps_by_hand(classifier, head, batch, found.probabilities >= 0.5, views)
        np.testing.assert_allclose(found.maps, expected, atol=1e-4)
    explained = explain_batch(cam, batch, images, 0.5, ("good", "defect"), ["a", "b", "c"], spec)
    for item, image in zip(explained, images):
        assert item.heatmap.shape == image.shape[:2] and item.overlay.shape == image.shape
        assert (item.tile is not None) == (tiles is not None)


def multi_maps_by_hand(classifier, head, batch: np.ndarray, positive: np.ndarray, views: int) -> np.ndarray:
    """Grad-CAM of a "multi" views model with a linear head, in closed form: the mean gradient of the logit over a map
    of h x w positions is (k_avg + k_max) / (views * h * w) per channel, for the mid-level map's own pooled columns and
    for the last block's; each map weighted by its own, the last one stretched (bilinear) onto the mid grid, added,
    signed for the predicted class, ReLU, each image's largest value 1."""
    import cv2

    from keeneye.model.gradcam import GradCam

    extractor = GradCam._per_square(classifier)[0]
    backbone = next(layer for layer in extractor.layers if hasattr(layer, "layers"))
    squares = batch.reshape(-1, 96, 96, 3)
    mid, last = (np.asarray(m) for m in backbone(extractor.get_layer("mobilenet_v2_preprocess")(squares)))
    kernel = head.get_layer("probability").get_weights()[0][:, 0]
    c_mid, c_last = mid.shape[-1], last.shape[-1]  # columns: mid avg, mid max, last avg, last max
    w_mid = (kernel[:c_mid] + kernel[c_mid : 2 * c_mid]) / (views * mid.shape[1] * mid.shape[2])
    w_last = (kernel[2 * c_mid : 2 * c_mid + c_last] + kernel[2 * c_mid + c_last :]) / (views * last.shape[1] * last.shape[2])
    size = mid.shape[1:3]
    summed = mid @ w_mid + np.stack([cv2.resize(m, size[::-1], interpolation=cv2.INTER_LINEAR) for m in last @ w_last])
    signs = np.repeat(np.where(positive, 1.0, -1.0), views)[:, None, None]
    maps = np.maximum(summed * signs, 0.0).reshape(len(batch), views, *size)
    return maps / maps.reshape(len(batch), -1).max(axis=1)[:, None, None, None]
