"""Generated page-turning videos, for tests, the video benchmark and trying keeneye's video features.

A textured page lies still on a desk (camera noise, a pixel of hand shake); in a flip, the top page
turns about its spine: its free edge sweeps across, lifted towards the camera (a perspective warp),
showing its back half way through. Written with OpenCV's VideoWriter (mp4v or MJPG), so no
FFmpeg command line is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

__all__ = ["write_page_video"]


def _page(rng: np.random.Generator, height: int, width: int, tint: int) -> np.ndarray:
    """A light page with dark 'text' lines (BGR)."""
    page = np.full((height, width, 3), (235 - tint, 240, 245), np.uint8)
    y = 6
    while y < height - 6:
        x = 5
        while x < width - 8:
            word = int(rng.integers(3, 12))
            cv2.rectangle(page, (x, y), (min(x + word, width - 5), y + 2), (60, 50, 40), -1)
            x += word + int(rng.integers(2, 5))
        y += int(rng.integers(6, 9))
    return page


def _turning(frame: np.ndarray, top: np.ndarray, back: np.ndarray, box: tuple[int, int, int, int], progress: float) -> None:
    """Draw the top page turned by `progress` (0 flat, 1 fully over) about the box's left edge."""
    x0, y0, width, height = box
    angle = np.pi * progress
    reach = width * np.cos(angle)  # signed horizontal extent of the free edge from the spine
    lift = height * 0.18 * np.sin(angle)  # the free edge comes towards the camera: it looks taller
    source = top if reach >= 0 else cv2.flip(back, 1)
    h, w = source.shape[:2]
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    free = x0 + reach
    quad = np.float32([[x0, y0], [free, y0 - lift], [free, y0 + height + lift], [x0, y0 + height]])
    if reach < 0:
        quad = quad[[1, 0, 3, 2]]
    matrix = cv2.getPerspectiveTransform(corners, quad)
    warped = cv2.warpPerspective(source, matrix, (frame.shape[1], frame.shape[0]))
    mask = cv2.warpPerspective(np.full((h, w), 255, np.uint8), matrix, (frame.shape[1], frame.shape[0]))
    shade = 0.75 + 0.25 * abs(np.cos(angle))
    frame[mask > 0] = (warped[mask > 0] * shade).astype(np.uint8)


def write_page_video(
    path: str | os.PathLike, seconds: float = 4.0, fps: float = 30.0, flips: tuple[tuple[float, float], ...] = ((1.5, 2.5),),
    size: tuple[int, int] = (160, 120), seed: int = 0, fourcc: str | None = None, shakes: tuple[tuple[float, float], ...] = (),
) -> Path:
    """Write a clip of a page held still, turned during each (start, end) of `flips` (seconds).

    shakes: (start, end) intervals where a hand fidgets with the page (it lifts a fifth of a turn and falls back)
    and the camera jerks (motion blur, a few pixels of shift), no page turned: single frames of it look like
    a flip, which is what smoothing over time and a minimum event length are for.
    fourcc: 'mp4v' for .mp4/.mov, 'MJPG' for .avi by default.
    """
    path = Path(path)
    width, height = size
    rng = np.random.default_rng(seed)
    fourcc = fourcc or ("MJPG" if path.suffix.lower() == ".avi" else "mp4v")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path} with codec {fourcc}")
    desk = np.clip(rng.normal(90, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    desk = cv2.GaussianBlur(desk, (5, 5), 0)
    box = (width // 2, height // 8, int(width * 0.42), int(height * 0.75))  # the right-hand page of a book
    pages = [_page(rng, box[3], box[2], tint=int(rng.integers(0, 30))) for _ in range(len(flips) + 2)]
    left = _page(rng, box[3], box[2], tint=10)
    noise = [rng.normal(0, 3, (height, width, 3)).astype(np.int16) for _ in range(7)]  # camera noise, cycled (cheap)
    turned = 0
    try:
        for i in range(int(round(seconds * fps))):
            time = i / fps
            frame = desk.copy()
            frame[box[1]:box[1] + box[3], box[0] - box[2]:box[0]] = left
            active = [k for k, (start, end) in enumerate(flips) if start <= time < end]
            turned = sum(1 for _, end in flips if end <= time)
            frame[box[1]:box[1] + box[3], box[0]:box[0] + box[2]] = pages[turned + (1 if active else 0)]
            if active:
                start, end = flips[active[0]]
                _turning(frame, pages[turned], pages[-1], box, (time - start) / (end - start))
                frame = cv2.blur(frame, (5, 1))  # motion blur of the sweep
            shaking = [(start, end) for start, end in shakes if start <= time < end]
            if shaking and not active:  # a hand fidgets: the page lifts a little and falls back, the camera jerks
                start, end = shaking[0]
                lift = 0.2 * np.sin(np.pi * (time - start) / (end - start))
                _turning(frame, pages[turned], pages[-1], box, float(lift))
                frame = cv2.blur(frame, (int(rng.integers(5, 11)), 1))
                frame = np.roll(frame, int(rng.integers(-6, 7)), axis=1)
            shake = rng.integers(-1, 2, size=2)
            frame = np.roll(frame, tuple(int(s) for s in shake), axis=(0, 1))
            writer.write(np.clip(frame + noise[i % len(noise)], 0, 255).astype(np.uint8))
    finally:
        writer.release()
    return path
