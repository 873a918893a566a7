"""How a decoded image becomes the model's input: resize rule (squash, pad, crop) and tiles.

One `InputSpec` is built from the run's config at training time, recorded in the bundle's
`metadata.json` ("input") and rebuilt from there by every consumer (predict, evaluate, serve,
export checks), so the model always sees its inputs prepared exactly as in training.

Tiles (small defects on large images): the image is cut at native scale into a fixed grid of
`rows x cols` overlapping square tiles, each resized to `image_size`, and the tiles are stacked
vertically into one (T*S, S, 3) array. The model (model/backbone.build_tiled_classifier) splits
that stack back into T tiles, embeds each and max-pools the features over tiles before the head,
so one tile can decide. The grid is fixed per bundle (so the model input shape is fixed); the
tile side follows each image's size so that the grid covers the whole image.

Views (textures and parts without an orientation): the square image and `views - 1` of its mirror
images and quarter turns (VIEW_SETS) are stacked the same way into one (V*S, S, 3) array; the model
(model/backbone.build_views_extractor) embeds each view and averages the features, so the head sees
features that do not depend on how the part lay. The first view is always the image itself.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Iterable, Literal

import cv2
import numpy as np

from keeneye.data.decode import AREA_SHRINK_FACTOR, decode_image_bytes, load_image, probe, resize_square

ResizeMode = Literal["squash", "pad", "crop"]
RESIZE_MODES: tuple[str, ...] = ("squash", "pad", "crop")
MAX_AUTO_TILES = 16
#: model.views: which dihedral views (see `dihedral`) a view count stacks, the image itself first.
#: 2 = + its left-right mirror; 4 = + the up-down mirror and the half turn; 8 = the whole group.
VIEW_SETS: dict[int, tuple[int, ...]] = {1: (0,), 2: (0, 4), 4: (0, 4, 6, 2), 8: (0, 4, 6, 2, 1, 3, 5, 7)}


def dihedral(images: np.ndarray, view: int) -> np.ndarray:
    """View `view` (0..7) of square images (N, S, S, C): `view % 4` quarter turns, mirrored when view >= 4."""
    turned = np.rot90(images, view % 4, axes=(1, 2))
    return np.ascontiguousarray(turned[:, :, ::-1] if view >= 4 else turned)


def undo_dihedral(images: np.ndarray, view: int) -> np.ndarray:
    """The inverse of `dihedral` (N, S, S[, C]): a map computed on view `view` laid back the way the image lay."""
    mirrored = images[:, :, ::-1] if view >= 4 else images
    return np.ascontiguousarray(np.rot90(mirrored, -(view % 4), axes=(1, 2)))


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """decode.resize_square's interpolation rule for a (width, height) target."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    strong_shrink = max(image.shape[1] / width, image.shape[0] / height) > AREA_SHRINK_FACTOR
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if strong_shrink else cv2.INTER_LINEAR)


def fit_square(image: np.ndarray, size: int, mode: str = "squash") -> np.ndarray:
    """(H, W, 3) -> (size, size, 3): squash (stretch), pad (letterbox, black bars) or crop (centre).

    Squash keeps everything but distorts the aspect ratio; pad keeps shape and everything at a
    lower scale; crop keeps shape and scale of the centre and loses the borders.
    """
    if mode == "squash":
        return resize_square(image, size)
    height, width = image.shape[:2]
    if height == width:
        return resize_square(image, size)
    if mode == "crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return resize_square(np.ascontiguousarray(image[top : top + side, left : left + side]), size)
    if mode != "pad":
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    canvas = np.zeros((size, size, 3), np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = _resize(image, new_w, new_h)
    return canvas


def _starts(length: int, side: int, count: int) -> list[int]:
    """`count` evenly spread starts of windows of `side` over `length` (first at 0, last at the end)."""
    if count == 1 or side >= length:  # a window as long as the side or longer: centred (padded by the caller)
        return [-((side - length) // 2)] * count
    return [round(i * (length - side) / (count - 1)) for i in range(count)]


def tile_boxes(height: int, width: int, rows: int, cols: int, overlap: float) -> list[tuple[int, int, int]]:
    """(top, left, side) of the rows x cols square tiles of an image, row by row.

    The side is the smallest that lets the grid cover the image with at least `overlap` between
    neighbours; a tile can reach past an image side shorter than it (that part is padded black).
    """
    side_h = height / (rows - (rows - 1) * overlap)
    side_w = width / (cols - (cols - 1) * overlap)
    side = max(1, math.ceil(max(side_h, side_w)))
    return [(top, left, side) for top in _starts(height, side, rows) for left in _starts(width, side, cols)]


def cut_tiles(image: np.ndarray, size: int, rows: int, cols: int, overlap: float) -> np.ndarray:
    """The image's tiles, each resized to (size, size), stacked vertically: (rows*cols*size, size, 3)."""
    height, width = image.shape[:2]
    boxes = tile_boxes(height, width, rows, cols, overlap)
    side = boxes[0][2]
    pad_y, pad_x = max(0, side - height), max(0, side - width)
    if pad_y or pad_x:  # a tile longer than a side: centred on a black canvas (starts are negative there)
        image = cv2.copyMakeBorder(image, pad_y // 2, pad_y - pad_y // 2, pad_x // 2, pad_x - pad_x // 2,
                                   cv2.BORDER_CONSTANT, value=(0, 0, 0))
    tiles = [resize_square(np.ascontiguousarray(image[top + pad_y // 2 : top + pad_y // 2 + side,
                                                      left + pad_x // 2 : left + pad_x // 2 + side]), size)
             for top, left, _ in boxes]
    return np.ascontiguousarray(np.concatenate(tiles, axis=0))


def auto_grid(height: float, width: float, image_size: int, overlap: float) -> tuple[int, int]:
    """A tile grid for images of about (height, width): tiles at most 2x image_size at native scale.

    Small, nearly square images get one tile (no tiling); long or large images get as many
    tiles as keep each tile's native side near its short side, capped at 2 * image_size, with at
    most MAX_AUTO_TILES tiles (larger tiles beyond that).
    """
    side = min(height, width, 2 * image_size)
    while True:
        step = side * (1 - overlap)
        rows = 1 if height <= side else 1 + math.ceil((height - side) / step)
        cols = 1 if width <= side else 1 + math.ceil((width - side) / step)
        if rows * cols <= MAX_AUTO_TILES:
            return rows, cols
        side *= 1.25


@dataclass(frozen=True)
class InputSpec:
    """What the model takes: image_size, resize rule, (rows, cols, overlap) tiles or none, views, and the JPEG decode.

    `reduced_decode`: decode large JPEGs at reduced size inside libjpeg (untiled squash only; see
    config `model.reduced_decode`: faster, but it moves probabilities, so it is off unless asked for).
    """

    image_size: int
    resize: str = "squash"
    tiles: tuple[int, int] | None = None
    overlap: float = 0.25
    reduced_decode: bool = False
    views: int = 1

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.views not in VIEW_SETS:
            raise ValueError(f"views must be one of {', '.join(map(str, VIEW_SETS))}, got {self.views!r}")
        if self.tiles is not None and tuple(self.tiles) == (1, 1):
            object.__setattr__(self, "tiles", None)
        elif self.tiles is not None:
            object.__setattr__(self, "tiles", (int(self.tiles[0]), int(self.tiles[1])))
        if self.tiles is not None and self.views > 1:
            raise ValueError("tiles and views cannot be combined")

    @property
    def n_tiles(self) -> int:
        return 1 if self.tiles is None else self.tiles[0] * self.tiles[1]

    def image_only(self) -> "InputSpec":
        """This spec without model.views' mirrors and turns: the image itself, the first square of a views stack
        (what head.anomaly_feature's patch graph sees, in training and in model/anomaly_feature.first_square)."""
        return replace(self, views=1)

    @property
    def passes(self) -> int:
        """Backbone passes per image: one per tile or view."""
        return self.n_tiles * self.views

    def passes_note(self) -> str:
        """What each image costs beyond one backbone pass, for progress lines ('' when it is one pass)."""
        if self.tiles is not None:
            return f"{self.tiles[0]}x{self.tiles[1]} = {self.n_tiles} tiles each: {self.n_tiles}x the backbone passes"
        return f"{self.views} views each: {self.views}x the backbone passes" if self.views > 1 else ""

    @property
    def shape(self) -> tuple[int, int, int]:
        """The model input shape of one image (tiles or views stacked vertically)."""
        return (self.n_tiles * self.views * self.image_size, self.image_size, 3)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """A decoded RGB image of any size -> model input; an array already of `shape` is taken as prepared."""
        image = np.asarray(image, dtype=np.uint8)
        if image.shape == self.shape:
            return image
        if self.tiles is None and self.views > 1:
            square = fit_square(image, self.image_size, self.resize)[None]
            return np.concatenate([dihedral(square, view)[0] for view in VIEW_SETS[self.views]])
        if self.tiles is None:
            return fit_square(image, self.image_size, self.resize)
        return cut_tiles(image, self.image_size, self.tiles[0], self.tiles[1], self.overlap)

    def lay_over_image(self, maps: np.ndarray, height: int, width: int) -> np.ndarray:
        """Maps computed on the squares of one input stack (squares, h, w) -> one (height, width) map over the image.

        The inverse of `prepare` for heat maps: each tile's map goes back to its place at native
        scale (the larger value where tiles overlap), the views' maps are turned back and averaged,
        and a single square is stretched back (squash), cut to the image inside the letterbox (pad)
        or put on the centre square (crop).
        """
        maps = np.asarray(maps, np.float32)
        if self.tiles is not None:
            canvas = np.zeros((height, width), np.float32)
            for (top, left, side), square in zip(tile_boxes(height, width, *self.tiles, self.overlap), maps):
                stretched = cv2.resize(square, (side, side), interpolation=cv2.INTER_CUBIC)
                y0, x0 = max(top, 0), max(left, 0)
                y1, x1 = min(top + side, height), min(left + side, width)
                np.maximum(canvas[y0:y1, x0:x1], stretched[y0 - top : y1 - top, x0 - left : x1 - left], out=canvas[y0:y1, x0:x1])
            return canvas
        if self.views > 1:
            maps = np.mean([undo_dihedral(square[None], view)[0] for square, view in zip(maps, VIEW_SETS[self.views])], axis=0)[None]
        square = maps[0]
        if self.resize == "squash" or height == width:
            return cv2.resize(square, (width, height), interpolation=cv2.INTER_CUBIC)
        if self.resize == "pad":  # the image sits in the middle of the letterboxed square
            side = max(height, width)
            stretched = cv2.resize(square, (side, side), interpolation=cv2.INTER_CUBIC)
            top, left = (side - height) // 2, (side - width) // 2
            return np.ascontiguousarray(stretched[top : top + height, left : left + width])
        side = min(height, width)  # crop: the model saw the centre square only
        canvas = np.zeros((height, width), np.float32)
        top, left = (height - side) // 2, (width - side) // 2
        canvas[top : top + side, left : left + side] = cv2.resize(square, (side, side), interpolation=cv2.INTER_CUBIC)
        return canvas

    def _decode_size(self) -> int | None:
        # With reduced_decode, untiled squash decodes JPEGs at reduced size (both sides stay >= image_size);
        # pad and crop need the long / short side at full scale, tiles the native scale: decode whole.
        return self.image_size if self.reduced_decode and self.tiles is None and self.resize == "squash" else None

    def from_bytes(self, data: bytes) -> np.ndarray:
        """Encoded image -> model input (DecodeError with a reason if it cannot be decoded)."""
        return self.prepare(decode_image_bytes(data, self._decode_size()))

    def load(self, path: str | os.PathLike[str]) -> np.ndarray:
        """Image file -> model input (DecodeError with a reason if it cannot be read or decoded)."""
        return self.prepare(load_image(path, self._decode_size()))

    def empty_batch(self) -> np.ndarray:
        return np.empty((0, *self.shape), np.uint8)

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "resize": self.resize,
                "tiles": None if self.tiles is None else {"rows": self.tiles[0], "cols": self.tiles[1], "overlap": self.overlap},
                "reduced_decode": self.reduced_decode, "views": self.views}

    @classmethod
    def from_dict(cls, data: dict) -> "InputSpec":
        """From a bundle's metadata "input" (bundles written before tiles/resize existed: squash, no tiles).

        Bundles written before `reduced_decode` was recorded were trained with it (the default then):
        they keep it, so their predictions do not change. Bundles from before model.views: one view.
        """
        tiles = data.get("tiles")
        return cls(int(data["image_size"]), data.get("resize", "squash"),
                   None if not tiles else (int(tiles["rows"]), int(tiles["cols"])),
                   float(tiles["overlap"]) if tiles else 0.25, bool(data.get("reduced_decode", True)), int(data.get("views", 1)))


def median_size(paths: Iterable[str | os.PathLike[str]], limit: int = 200) -> tuple[float, float] | None:
    """Median (height, width) from the headers of up to `limit` files (nothing decoded)."""
    sizes = []
    for path in list(paths)[:limit]:
        try:
            with open(path, "rb") as handle:
                _, declared, _ = probe(handle.read(1 << 16))
        except OSError:
            continue
        if declared and declared[0] and declared[1]:
            sizes.append((declared[1], declared[0]))
    if not sizes:
        return None
    heights, widths = zip(*sizes)
    return float(np.median(heights)), float(np.median(widths))
