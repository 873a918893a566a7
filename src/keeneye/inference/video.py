"""Predict on video: frames stream in, probabilities and events come out, memory stays flat.

* **Streaming**: a producer thread decodes and resizes frames (PyAV/OpenCV release the GIL) into
  a bounded queue while the engine runs on the previous batch; the consumer takes what is ready
  (one frame when live, a full batch when a file decodes faster than the model), so a long video
  never holds more than `queue_size` frames.
* **Events**: per-frame probabilities are smoothed by a centred moving average of
  `video.smoothing_frames`, then an event starts when the smoothed value reaches the enter
  threshold and ends when it falls below the exit threshold (enter minus `video.hysteresis`);
  events shorter than `video.min_event_frames` are dropped. :class:`EventDetector` does this
  online, half a window late, so `predict` (whole file) and `watch` (live) find the same events.
* **Sequence evaluation**: labelled events are runs of positive frames; an event counts when it
  overlaps one (see :mod:`keeneye.evaluation.sequence`).
"""

from __future__ import annotations

import json
import queue
import threading
import time as clock
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from keeneye.bundle import CONFIG_FILE
from keeneye.config import VideoConfig
from keeneye.data.decode import resize_square
from keeneye.data.video import VideoError, iter_frames
from keeneye.evaluation.sequence import Event, sequence_metrics

__all__ = [
    "EventSettings", "EventDetector", "FrameResult", "VideoPrediction", "stream_video", "detect_events",
    "predict_video", "evaluate_sequences", "FRAME_COLUMNS",
]

FRAME_COLUMNS = ["path", "frame", "time", "probability", "label", "error"]
_END = object()


@dataclass(frozen=True)
class EventSettings:
    """How probabilities over time become events (the `video` config section, thresholds resolved)."""

    enter: float
    exit: float
    smoothing_frames: int = 5
    min_event_frames: int = 3

    @classmethod
    def from_config(cls, video, threshold: float, smoothing_frames: int | None = None) -> "EventSettings":
        """enter = video.enter_threshold or the bundle's threshold; exit = enter - video.hysteresis (>= 0)."""
        enter = video.enter_threshold if video.enter_threshold is not None else threshold
        window = video.smoothing_frames if smoothing_frames is None else smoothing_frames
        return cls(enter, max(0.0, enter - video.hysteresis), int(window), video.min_event_frames)


@dataclass
class FrameResult:
    """One predicted frame; `latency` is seconds from the frame leaving the decoder to its probability."""

    frame: int
    time: float
    probability: float
    latency: float
    read_at: float = 0.0  # time.perf_counter() when the decoder handed the frame over


class EventDetector:
    """Online smoothing + hysteresis: push frames in order, get finished events back.

    The smoothed value of frame i is the mean of frames i-h..i+h (h = window // 2, fewer at the
    ends), so it is known h frames after frame i arrives.
    """

    def __init__(self, settings: EventSettings) -> None:
        self.settings = settings
        self.half = max(0, settings.smoothing_frames // 2)
        self.buffer: deque[tuple[int, float, float]] = deque()  # (frame, time, probability) not yet smoothed
        self.history: deque[float] = deque(maxlen=self.half)  # probabilities of frames already smoothed
        self.open: dict | None = None
        self.smoothed: list[tuple[int, float, float]] = []  # (frame, time, smoothed) when record=True
        self.record = False

    def push(self, frame: int, time: float, probability: float) -> list[Event]:
        self.buffer.append((frame, time, probability))
        if len(self.buffer) <= self.half:
            return []
        return self._emit_one()

    def finish(self) -> list[Event]:
        """Smooth the frames still waiting (the window shrinks at the end) and close an open event."""
        events: list[Event] = []
        while self.buffer:
            events += self._emit_one()
        if self.open is not None:
            events += self._close()
        return events

    def _emit_one(self) -> list[Event]:
        frame, time, _ = self.buffer[0]
        window = list(self.history) + [p for _, _, p in list(self.buffer)[: self.half + 1]]
        value = float(np.mean(window))
        self.history.append(self.buffer.popleft()[2])
        if self.record:
            self.smoothed.append((frame, time, value))
        return self._step(frame, time, value)

    def _step(self, frame: int, time: float, value: float) -> list[Event]:
        if self.open is None:
            if value >= self.settings.enter:
                self.open = {"start_frame": frame, "start": time, "end_frame": frame, "end": time, "peak": value, "n": 1}
            return []
        if value < self.settings.exit:
            return self._close()
        self.open.update(end_frame=frame, end=time, n=self.open["n"] + 1)
        self.open["peak"] = max(self.open["peak"], value)
        return []

    def _close(self) -> list[Event]:
        event, self.open = self.open, None
        if event["n"] < self.settings.min_event_frames:
            return []
        return [Event(event["start"], event["end"], event["start_frame"], event["end_frame"], round(event["peak"], 6))]


def detect_events(frames: Iterable[int], times: Iterable[float], probabilities: Iterable[float], settings: EventSettings) -> list[Event]:
    """Events of one sequence, frames in order (the offline form of :class:`EventDetector`)."""
    detector = EventDetector(settings)
    events: list[Event] = []
    for frame, time, probability in zip(frames, times, probabilities):
        events += detector.push(int(frame), float(time), float(probability))
    return events + detector.finish()


def smooth(probabilities: np.ndarray, window: int) -> np.ndarray:
    """The centred moving average the detector uses (the window shrinks at both ends)."""
    return pd.Series(np.asarray(probabilities, float)).rolling(max(1, window // 2 * 2 + 1), center=True, min_periods=1).mean().to_numpy()


# --- streaming ----------------------------------------------------------------------------------


class _Either:
    """Set when either event is: the decoder stops for a clean stop (watch's Ctrl-C) or a closed consumer."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def is_set(self) -> bool:
        return any(event.is_set() for event in self.events)


def _produce(source, fps: float | None, size: int, frames: queue.Queue, stop: _Either, closed: threading.Event) -> None:
    """Decoder thread: frames resized to the model's input, then _END or the exception that ended them."""
    try:
        for frame in iter_frames(source, fps, stop):
            if not _put(frames, (frame.index, frame.time, resize_square(frame.image, size), clock.perf_counter()), closed):
                return
        _put(frames, _END, closed)
    except Exception as exc:  # noqa: BLE001 - VideoError or a bug: handed to the consumer, which raises it
        _put(frames, exc, closed)


def _put(frames: queue.Queue, item, closed: threading.Event) -> bool:
    """Put, waiting while the queue is full, unless the consumer has gone (then False)."""
    while not closed.is_set():
        try:
            frames.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def stream_video(
    engine: Callable[[np.ndarray], np.ndarray], source, image_size: int, fps: float | None = None,
    batch_size: int = 32, queue_size: int = 64, stop: threading.Event | None = None,
) -> Iterator[FrameResult]:
    """Probabilities frame by frame while a producer thread decodes ahead (at most `queue_size` frames).

    Raises VideoError at the point the source fails (after the frames before it). Closing the
    iterator stops the producer; setting `stop` ends the stream cleanly (the frames already decoded
    are still predicted), which is how `watch` handles Ctrl-C.
    """
    frames: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
    closed = threading.Event()
    decoder_stop = _Either(closed, *([stop] if stop is not None else []))
    producer = threading.Thread(target=_produce, args=(source, fps, image_size, frames, decoder_stop, closed),
                                name="keeneye-video-decode", daemon=True)
    producer.start()
    try:
        finished = None
        while finished is None:
            batch = [frames.get()]
            while len(batch) < batch_size and batch[-1] is not _END and not isinstance(batch[-1], BaseException):
                try:
                    batch.append(frames.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is _END or isinstance(batch[-1], BaseException):
                finished = batch.pop()
            if batch:
                yield from _run_batch(engine, batch)
        if isinstance(finished, BaseException):
            raise finished
    finally:
        closed.set()
        producer.join(timeout=5)


def _run_batch(engine, batch: list[tuple]) -> Iterator[FrameResult]:
    probabilities = np.asarray(engine(np.stack([item[2] for item in batch]))).reshape(-1)
    done = clock.perf_counter()
    for (index, time, _, read_at), probability in zip(batch, probabilities):
        yield FrameResult(index, time, float(probability), done - read_at, read_at)


@dataclass
class VideoPrediction:
    """One video's per-frame rows, its events and verdict, and why it ended early (if it did)."""

    path: str
    frames: pd.DataFrame
    events: list[Event]
    error: str | None = None
    settings: EventSettings | None = None

    def summary(self, positive: str) -> dict:
        """The verdict record written to the events file."""
        contains = bool(self.events)
        return {
            "video": self.path, "frames": int(len(self.frames)), f"contains_{positive}": contains,
            "verdict": f"contains {positive}" if contains else f"no {positive}",
            "events": [asdict(e) for e in self.events], "error": self.error,
        }


def predict_video(predictor, path: str, fps: float | None, settings: EventSettings, progress: Callable[[int], None] | None = None,
                  queue_size: int = 64) -> VideoPrediction:
    """Stream one video through `predictor` (a keeneye Predictor): per-frame rows, events, verdict."""
    rows: list[tuple] = []
    detector = EventDetector(settings)
    events: list[Event] = []
    error = None
    try:
        for result in stream_video(predictor.engine, path, predictor.bundle.image_size, fps, predictor.batch_size, queue_size):
            rows.append((result.frame, result.time, result.probability))
            events += detector.push(result.frame, result.time, result.probability)
            if progress:
                progress(1)
    except VideoError as exc:
        error = exc.reason
    events += detector.finish()
    table = pd.DataFrame(rows, columns=["frame", "time", "probability"])
    frames = pd.DataFrame({
        "path": path, "frame": table["frame"].astype(float), "time": table["time"], "probability": table["probability"],
        "label": predictor.label_for(table["probability"].to_numpy()) if len(table) else [], "error": None,
    }, columns=FRAME_COLUMNS)
    return VideoPrediction(path, frames, events, error, settings)


def evaluate_sequences(rows: pd.DataFrame, probabilities: np.ndarray, positive: str, threshold: float,
                       settings: EventSettings) -> tuple[dict | None, list[dict]]:
    """(sequence metrics, per-video series for the plot) of the test rows that belong to a video or frame
    folder; (None, []) when there are none.

    `rows` has columns label, video, frame (and time when known); per video, frames are ordered by
    number, events are found with `settings`, and compared with the labelled runs of `positive`.
    """
    if "video" not in rows.columns or rows["video"].isna().all():
        return None, []
    table = rows.assign(probability=np.asarray(probabilities, float))
    table = table[table["video"].notna()]
    sequences = []
    for video, part in table.groupby("video", sort=True):
        part = part.sort_values("frame")
        time = part["time"] if "time" in part and part["time"].notna().all() else part["frame"]
        events = detect_events(part["frame"], time, part["probability"], settings)
        sequences.append({"video": str(video), "frame": part["frame"].to_numpy(), "time": time.to_numpy(dtype=float),
                          "truth": (part["label"] == positive).to_numpy(), "probability": part["probability"].to_numpy(),
                          "smoothed": smooth(part["probability"].to_numpy(), settings.smoothing_frames), "events": events})
    return sequence_metrics(sequences, threshold, asdict(settings)), sequences


def bundle_video_config(bundle_path) -> tuple[VideoConfig, dict]:
    """The `video` section of a bundle's saved config (defaults for bundles from before it existed) and its
    `data` section as a plain dict (for group_pattern and frame_pattern)."""
    path = Path(bundle_path) / CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    return VideoConfig.model_validate(saved.get("video") or {}), dict(saved.get("data") or {})


def watch_records(predictor, source, fps: float | None, settings: EventSettings, frames: bool = False,
                  stop: threading.Event | None = None) -> Iterator[dict]:
    """Live records for `keeneye watch`: one per event (and per frame with `frames`), then one 'end' record.

    latency_ms is the time from the frame leaving the decoder to the record (for an event: the frame
    that closed it, which comes smoothing_frames // 2 frames after the event's last frame).
    """
    detector = EventDetector(settings)
    positive = predictor.bundle.positive_class
    n = n_events = 0
    error = None
    last_read = clock.perf_counter()

    def event_record(event: Event) -> dict:
        return {"type": "event", "label": positive, **asdict(event), "latency_ms": round(1000 * (clock.perf_counter() - last_read), 2)}

    try:
        for result in stream_video(predictor.engine, source, predictor.bundle.image_size, fps, predictor.batch_size, 8, stop):
            n += 1
            last_read = result.read_at
            if frames:
                yield {"type": "frame", "frame": result.frame, "time": round(result.time, 4), "probability": round(result.probability, 6),
                       "label": str(predictor.label_for(np.asarray([result.probability]))[0]), "latency_ms": round(1000 * result.latency, 2)}
            for event in detector.push(result.frame, result.time, result.probability):
                n_events += 1
                yield event_record(event)
    except VideoError as exc:
        error = exc.reason
    for event in detector.finish():
        n_events += 1
        yield event_record(event)
    yield {"type": "end", "frames": n, "events": n_events, "stopped": bool(stop is not None and stop.is_set()), "error": error}
