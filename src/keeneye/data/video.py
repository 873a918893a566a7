"""Video files and frame sequences as data: frames sampled in time, grouped by their video.

Two ways a sequence reaches keeneye:

* **video files** (``.mp4 .avi .mov .mkv .webm .m4v``) in class folders or in a segment manifest
  (``path,start,end,label`` in seconds). Frames are decoded with PyAV (FFmpeg), sampled at
  ``video.fps`` and written once, losslessly, to a frame cache keyed by the video's content hash
  and the rate; from there on a frame is an image like any other (audited, embedded, cached by
  its own content hash). Every frame's group is its video, so no split separates one video.
* **frame folders**: images named ``<video>_<frame>.jpg`` (MonReader's ``0001_000000012.jpg``)
  get their video (group) and their order from the name; ``data.group_pattern`` and
  ``data.frame_pattern`` override.

Why PyAV rather than ``cv2.VideoCapture``: both stop early on a truncated file without raising,
but PyAV gives each frame's presentation time and the container's declared frame count and
raises FFmpeg's own error text, so "which frame, why" can be reported; OpenCV is used only for
camera indexes, which PyAV cannot open portably.

A video that cannot be opened, or that ends before the frames its container declares, becomes a
row of ``ScanResult.dropped`` (path = the video, reason naming the frame and the cause): the
readable frames before the damage are still used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import pandas as pd

from keeneye.data.files import file_digest
from keeneye.errors import DataError

__all__ = [
    "VIDEO_EXTENSIONS", "SEQUENCE_COLUMNS", "Frame", "VideoError", "is_video", "iter_frames",
    "extract_frames", "expand_videos", "assign_frame_numbers", "is_segment_manifest", "read_segment_manifest",
]

#: File extensions (lowercase, with the dot) that are read as videos.
VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".m4v", ".avi", ".mov", ".mkv", ".webm"})
#: Extra manifest columns of sequence rows: the video (or frame folder id), frame number, time in seconds.
SEQUENCE_COLUMNS = ["video", "frame", "time"]
#: MonReader-style frame names: digits, underscore, digits (video 0001, frame 12 in 0001_000000012.jpg).
DEFAULT_FRAME_NAME = re.compile(r"^(\d+)_(\d+)\.[A-Za-z0-9]+$")
FRAME_CACHE_VERSION = 1


class VideoError(Exception):
    """A video that cannot be (fully) decoded; `frame` is the first frame that could not be read."""

    def __init__(self, reason: str, frame: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.frame = frame

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its number in the video (0-based, before sampling), time in seconds, RGB pixels."""

    index: int
    time: float
    image: np.ndarray


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def camera_index(source: str | int) -> int | None:
    """The camera number when `source` names a camera (an int or a string of digits), else None."""
    if isinstance(source, int):
        return source
    return int(source) if str(source).isdigit() else None


class _Sampler:
    """Keeps the first frame at or after each multiple of 1/fps (every frame when fps is None)."""

    def __init__(self, fps: float | None) -> None:
        self.step = None if not fps else 1.0 / fps
        self.next = 0.0

    def take(self, time: float) -> bool:
        if self.step is None:
            return True
        if time + 1e-6 < self.next:
            return False
        while self.next <= time + 1e-6:
            self.next += self.step
        return True


def iter_frames(source: str | os.PathLike | int, fps: float | None = None, stop: threading.Event | None = None) -> Iterator[Frame]:
    """Decode `source` (file, URL or camera index) frame by frame, sampled at `fps`.

    Raises VideoError when the source cannot be opened, when decoding fails part way, or when a
    file ends before the frame count its container declares (truncated); the frames before the
    damage have been yielded by then. `stop` ends the stream early and cleanly.
    """
    camera = camera_index(source)
    if camera is not None:
        yield from _iter_camera(camera, fps, stop)
        return
    import av

    text = str(source)
    try:
        container = av.open(text, timeout=10.0)
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError(f"cannot open video: {_ffmpeg_reason(exc)}", frame=0) from None
    with container:
        if not container.streams.video:
            raise VideoError("no video stream in the file", frame=0)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        declared = _declared_frames(stream, container, rate)
        sampler = _Sampler(fps)
        index = -1
        try:
            for frame in container.decode(stream):
                if stop is not None and stop.is_set():
                    return
                index += 1
                time = frame.time if frame.time is not None else (index / rate if rate else float(index))
                if sampler.take(time):
                    yield Frame(index, float(time), frame.to_ndarray(format="rgb24"))
        except av.error.FFmpegError as exc:
            raise VideoError(f"decoding failed at frame {index + 1}: {_ffmpeg_reason(exc)}", frame=index + 1) from None
    decoded = index + 1
    if decoded == 0:
        raise VideoError("no frame could be decoded (empty or corrupt video stream)", frame=0)
    if declared and decoded < declared - 1 and _is_file(text):
        at = f" ({decoded / rate:.2f} s)" if rate else ""
        raise VideoError(
            f"truncated video: decoding stopped at frame {decoded}{at}, the container declares {declared} frames",
            frame=decoded,
        )


def _iter_camera(camera: int, fps: float | None, stop: threading.Event | None) -> Iterator[Frame]:
    """Frames from a camera through OpenCV; time is seconds since the first frame."""
    import time as clock

    capture = cv2.VideoCapture(camera)
    if not capture.isOpened():
        raise VideoError(f"cannot open camera {camera}", frame=0)
    sampler = _Sampler(fps)
    start = clock.monotonic()
    index = -1
    try:
        while stop is None or not stop.is_set():
            ok, image = capture.read()
            if not ok:
                return
            index += 1
            now = clock.monotonic() - start
            if sampler.take(now):
                yield Frame(index, now, cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()


def _is_file(text: str) -> bool:
    return "://" not in text and Path(text).is_file()


def _declared_frames(stream, container, rate: float | None) -> int:
    """Frames the container says it holds: the stream's count, else duration x rate (0 = unknown)."""
    if stream.frames:
        return int(stream.frames)
    if stream.duration and stream.time_base and rate:
        return int(round(float(stream.duration * stream.time_base) * rate))
    return 0


def _ffmpeg_reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text).rstrip(".")


def file_hash(path: str | os.PathLike) -> str:
    """sha1 of a video file (keys its cached frames)."""
    return file_digest(path, "sha1")


def pixel_hash(image: np.ndarray) -> str:
    """Content hash of decoded pixels: equal frames, from any video, share cached embeddings."""
    digest = hashlib.sha1(f"{image.shape}".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


@dataclass
class ExtractedVideo:
    """The sampled frames of one video, written as PNG files, and why the rest is missing (if so)."""

    frames: pd.DataFrame  # frame, time, path, sha1
    problem: str | None


def extract_frames(video: str | os.PathLike, fps: float | None, cache_root: str | os.PathLike, video_sha1: str | None = None) -> ExtractedVideo:
    """Sample `video` at `fps` into lossless PNG files under `cache_root/frames/`, once per content and rate.

    The cache folder is keyed by the video's content hash, so a renamed or moved file is not decoded again.
    """
    video_sha1 = video_sha1 or file_hash(video)
    folder = Path(cache_root) / "frames" / f"{video_sha1[:20]}-fps{fps or 'all'}-v{FRAME_CACHE_VERSION}"
    index_file = folder / "index.json"
    if index_file.is_file():
        saved = json.loads(index_file.read_text())
        frames = pd.DataFrame(saved["frames"], columns=["frame", "time", "name", "sha1"])
        frames["path"] = [str(folder / name) for name in frames.pop("name")]
        if all(os.path.isfile(p) for p in frames["path"]):  # a partly cleaned cache is decoded again
            return ExtractedVideo(frames, saved["problem"])
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    problem = None
    try:
        for frame in iter_frames(video, fps):
            name = f"frame_{frame.index:07d}.png"
            ok, encoded = cv2.imencode(".png", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
            if not ok:
                raise VideoError(f"frame {frame.index} could not be stored as PNG", frame=frame.index)
            (folder / name).write_bytes(encoded.tobytes())
            rows.append({"frame": frame.index, "time": round(frame.time, 6), "name": name, "sha1": pixel_hash(frame.image)})
    except VideoError as exc:
        problem = exc.reason
    temporary = folder / ".index.json.tmp"
    temporary.write_text(json.dumps({"video_sha1": video_sha1, "fps": fps, "frames": rows, "problem": problem}))
    os.replace(temporary, index_file)
    frames = pd.DataFrame(rows, columns=["frame", "time", "name", "sha1"])
    frames["path"] = [str(folder / name) for name in frames.pop("name")]
    return ExtractedVideo(frames, problem)


def expand_videos(
    manifest: pd.DataFrame, fps: float | None, cache_root: str | os.PathLike,
    segments: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Replace each video row by one row per sampled frame; return (manifest, dropped videos).

    Frame rows keep the video's label and split, take the video's group (its path unless the
    manifest gave one) and gain `video`, `frame`, `time`. With `segments` (columns video, start,
    end, label, split, group), frames are labelled by the segment holding their time; frames outside
    every segment are not used. Image rows get empty sequence columns.
    """
    manifest = _with_sequence_columns(manifest)
    is_vid = manifest["path"].map(is_video).to_numpy(dtype=bool)
    if not is_vid.any() and segments is None:
        return manifest, pd.DataFrame([], columns=["path", "split", "label", "reason"])
    parts = [manifest[~is_vid]]
    dropped: list[dict] = []
    sources = manifest[is_vid] if segments is None else segments
    for video, rows in sources.groupby("path" if segments is None else "video", sort=False):
        first = rows.iloc[0]
        extracted = extract_frames(video, fps, cache_root, first.get("sha1") if segments is None else None)
        if extracted.problem:
            dropped.append({"path": str(video), "split": first["split"], "label": first["label"], "reason": extracted.problem})
        frames = extracted.frames
        group = first["group"] if isinstance(first["group"], str) and first["group"] else str(video)
        if segments is None:
            labelled = frames.assign(label=first["label"], split=first["split"])
        else:
            labelled = _label_by_segments(frames, rows)
        parts.append(pd.DataFrame({
            "path": labelled["path"], "label": labelled["label"], "split": labelled["split"], "group": group,
            "sha1": labelled["sha1"], "video": str(video), "frame": labelled["frame"], "time": labelled["time"],
        }))
    out = pd.concat(parts, ignore_index=True)
    out["group"] = out["group"].astype(object)
    return out, pd.DataFrame(dropped, columns=["path", "split", "label", "reason"])


def _with_sequence_columns(manifest: pd.DataFrame) -> pd.DataFrame:
    manifest = manifest.copy()
    for column in SEQUENCE_COLUMNS:
        if column not in manifest.columns:
            manifest[column] = pd.Series([None] * len(manifest), index=manifest.index, dtype=object if column == "video" else float)
    return manifest


def _label_by_segments(frames: pd.DataFrame, segments: pd.DataFrame) -> pd.DataFrame:
    """Frames inside [start, end) of a segment get its label and split; the others are left out."""
    labels = np.full(len(frames), None, dtype=object)
    splits = np.full(len(frames), None, dtype=object)
    times = frames["time"].to_numpy(dtype=float)
    for segment in segments.itertuples():
        inside = (times >= segment.start) & (times < segment.end)
        labels[inside] = segment.label
        splits[inside] = segment.split
    kept = labels != None  # noqa: E711 - elementwise on an object array
    return frames[kept].assign(label=labels[kept], split=splits[kept])


def assign_frame_numbers(manifest: pd.DataFrame, frame_pattern: str | None = None, group_pattern_given: bool = False) -> pd.DataFrame:
    """Give image rows named like frames of a sequence their video (group) and frame number.

    Without `frame_pattern`, names such as 0001_000000012.jpg mean video 0001, frame 12. With it,
    the pattern's first capture group is the frame number and the video is the row's group (from
    the manifest or data.group_pattern), else the name's text before the number. Rows whose name
    does not match are left alone; groups set by the manifest or group_pattern are never replaced.
    """
    manifest = _with_sequence_columns(manifest)
    regex = re.compile(frame_pattern) if frame_pattern else DEFAULT_FRAME_NAME
    candidates = manifest.index[manifest["video"].isna()]
    for i in candidates:
        name = Path(manifest.at[i, "path"]).name
        found = regex.search(name)
        if found is None:
            continue
        number = found.group(1) if frame_pattern else found.group(2)
        prefix = name[: found.start()].rstrip("_-. ") if frame_pattern else found.group(1)
        group = manifest.at[i, "group"]
        if not (isinstance(group, str) and group):
            if group_pattern_given and frame_pattern is None:
                continue  # data.group_pattern decided this name is its own unit
            group = prefix or None
            manifest.at[i, "group"] = group
        if group is None:
            continue
        manifest.at[i, "video"] = str(group)
        manifest.at[i, "frame"] = float(int(number))
    manifest["group"] = manifest["group"].astype(object)
    return manifest


# --- segment manifests ------------------------------------------------------------------------

SEGMENT_COLUMNS = ("path", "start", "end", "label")


def is_segment_manifest(csv_path: str | os.PathLike) -> bool:
    """True when the CSV's header has start and end columns (a list of labelled video segments)."""
    try:
        with open(csv_path, encoding="utf-8-sig") as handle:
            header = next((line for line in handle if line.strip()), "")
    except OSError:
        return False
    names = {cell.strip().lower() for cell in re.split(r"[,;\t]", header)}
    return {"start", "end"} <= names


def read_segment_manifest(csv_path: str | os.PathLike) -> pd.DataFrame:
    """`path,start,end,label[,split,group]` -> one row per segment (video, start, end, label, split, group).

    Every bad row is reported with its line number in one DataError: missing or non-video file,
    start/end not numbers, end not after start, an unknown split.
    """
    from keeneye.data.manifest import SPLIT_VALUES

    path = Path(csv_path).expanduser().resolve()
    table = pd.read_csv(path, sep=None, engine="python", dtype=str, keep_default_na=False)
    table.columns = [c.strip().lower() for c in table.columns]
    missing = [c for c in SEGMENT_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: a segment manifest needs columns path,start,end,label; missing: {', '.join(missing)}.")
    problems: list[str] = []
    rows: list[dict] = []
    for number, row in enumerate(table.to_dict(orient="records"), start=2):
        video = Path(os.path.expanduser(row["path"].strip()))
        video = video if video.is_absolute() else path.parent / video
        try:
            start, end = float(row["start"]), float(row["end"])
        except ValueError:
            problems.append(f"  line {number}: start and end must be seconds (numbers), got {row['start']!r}, {row['end']!r}")
            continue
        split = SPLIT_VALUES.get(str(row.get("split", "")).strip().lower())
        if not video.is_file():
            problems.append(f"  line {number}: file not found: {row['path']} (resolved to {video})")
        elif not is_video(video):
            problems.append(f"  line {number}: {row['path']} is not a video file ({', '.join(sorted(VIDEO_EXTENSIONS))})")
        elif not end > start >= 0:
            problems.append(f"  line {number}: end ({end}) must be after start ({start}), both >= 0")
        elif not row["label"].strip():
            problems.append(f"  line {number}: empty label")
        elif split is None:
            problems.append(f"  line {number}: unknown split {row.get('split')!r}")
        else:
            rows.append({"video": str(Path(os.path.abspath(video))), "start": start, "end": end, "label": row["label"].strip(),
                         "split": split, "group": (row.get("group") or "").strip() or None})
    if problems:
        raise DataError(f"{path}: {len(problems)} bad rows (line numbers of the file; the header is line 1):\n" + "\n".join(problems))
    if not rows:
        raise DataError(f"{path}: no segments listed (only a header).")
    return pd.DataFrame(rows)


def with_sequences(scan, fps: float | None, cache_root: str | os.PathLike, frame_pattern: str | None = None,
                   group_pattern: str | None = None, segments: pd.DataFrame | None = None):
    """A ScanResult with videos expanded into frames, frame-folder names read, and damaged videos in `dropped`.

    `group_pattern` (data.group_pattern) is applied after the videos are expanded (their frames
    already have a group) and before frame names are read, so it decides the frame folders' groups.
    """
    from dataclasses import replace

    from keeneye.data.split import assign_groups

    manifest, dropped = expand_videos(scan.manifest, fps, cache_root, segments)
    if group_pattern:
        manifest = assign_groups(manifest, group_pattern)
    manifest = assign_frame_numbers(manifest, frame_pattern, group_pattern_given=bool(group_pattern))
    if manifest["video"].isna().all():  # no sequences: the manifest keeps its five columns
        manifest = manifest.drop(columns=SEQUENCE_COLUMNS)
    if scan.dropped is not None and len(scan.dropped):
        dropped = pd.concat([scan.dropped, dropped], ignore_index=True)
    return replace(scan, manifest=manifest.reset_index(drop=True), dropped=dropped)


def segment_scan(csv_path: str | os.PathLike, positive_class: str | None, fps: float | None, cache_root: str | os.PathLike):
    """A segment manifest read into a ScanResult whose rows are the segments' sampled frames."""
    from keeneye.data.scan import MANIFEST_COLUMNS, SKIPPED_COLUMNS, ScanResult, resolve_class_names

    segments = read_segment_manifest(csv_path)
    try:
        class_names = resolve_class_names(segments["label"].tolist(), positive_class)
    except DataError as exc:
        raise DataError(f"{csv_path}: {exc}") from None
    empty = pd.DataFrame([], columns=MANIFEST_COLUMNS).astype({"group": object})
    scan = ScanResult(empty, pd.DataFrame([], columns=SKIPPED_COLUMNS), class_names)
    return scan, segments
