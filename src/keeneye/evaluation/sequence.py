"""Scores for sequences (videos, frame folders): frame-level F1, event-level precision and recall.

An *event* is a run of frames: labelled ones are the runs of positive frames of a sequence,
predicted ones come from smoothing and hysteresis (keeneye.inference.video). A predicted event
counts when it overlaps a labelled one (in frame numbers, ends included) that no earlier predicted
event has claimed: matching is one to one, so a flip reported as three fragments is one correct
event and two false ones (fragmenting is what raw per-frame thresholds do, and what smoothing
fixes). Event recall is the share of labelled events matched. Per-video accuracy compares the
verdict "contains the positive class" (at least one predicted event) with the truth (at least
one positive frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from keeneye.evaluation.metrics import binary_metrics

__all__ = ["Event", "labelled_events", "match_events", "sequence_metrics", "plot_sequences"]


@dataclass(frozen=True)
class Event:
    """A run of frames: times in seconds (frame numbers where a sequence has no times), frames inclusive."""

    start: float
    end: float
    start_frame: int
    end_frame: int
    peak_probability: float | None = None


def labelled_events(frames: np.ndarray, times: np.ndarray, truth: np.ndarray) -> list[Event]:
    """The runs of consecutive positive frames (consecutive in the sequence's order)."""
    truth = np.asarray(truth, bool)
    events = []
    i = 0
    while i < len(truth):
        if not truth[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(truth) and truth[j + 1]:
            j += 1
        events.append(Event(float(times[i]), float(times[j]), int(frames[i]), int(frames[j])))
        i = j + 1
    return events


def _overlaps(a: Event, b: Event) -> bool:
    return a.start_frame <= b.end_frame and b.start_frame <= a.end_frame


def match_events(predicted: Sequence[Event], labelled: Sequence[Event]) -> tuple[int, int]:
    """(correct predicted events, labelled events found): one-to-one, in time order, by overlap.

    Both numbers are equal (each match is one of each); both are returned so callers read naturally.
    """
    claimed: set[int] = set()
    for p in sorted(predicted, key=lambda e: e.start_frame):
        k = next((k for k, t in enumerate(labelled) if k not in claimed and _overlaps(p, t)), None)
        if k is not None:
            claimed.add(k)
    return len(claimed), len(claimed)


def _ratio(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else round(numerator / denominator, 6)


def sequence_metrics(sequences: list[dict], threshold: float, settings: dict) -> dict:
    """Metrics over sequences, each a dict with video, frame, time, truth, probability, smoothed, events.

    Returns frame-level metrics (raw probabilities at the bundle threshold), event precision,
    recall and F1, per-video accuracy and a per-video table for metrics.json.
    """
    truth = np.concatenate([s["truth"] for s in sequences]).astype(int)
    probability = np.concatenate([s["probability"] for s in sequences])
    frame_level = binary_metrics(truth, probability, threshold, ("negative", "positive"))["at_threshold"]
    n_predicted = n_labelled = n_correct = n_found = n_videos_right = 0
    videos = []
    for s in sequences:
        labelled = labelled_events(s["frame"], s["time"], s["truth"])
        correct, found = match_events(s["events"], labelled)
        n_predicted, n_labelled = n_predicted + len(s["events"]), n_labelled + len(labelled)
        n_correct, n_found = n_correct + correct, n_found + found
        right = bool(s["events"]) == bool(labelled)
        n_videos_right += right
        videos.append({"video": s["video"], "frames": int(len(s["truth"])), "labelled_events": len(labelled),
                       "predicted_events": len(s["events"]), "correct_events": correct, "verdict_correct": right,
                       "events": [[e.start, e.end] for e in s["events"]], "labelled": [[e.start, e.end] for e in labelled]})
    precision, recall = _ratio(n_correct, n_predicted), _ratio(n_found, n_labelled)
    f1 = None if not precision or not recall else round(2 * precision * recall / (precision + recall), 6)
    return {
        "n_sequences": len(sequences),
        "n_frames": int(len(truth)),
        "frame": {k: frame_level[k] for k in ("f1", "precision", "recall", "accuracy")},
        "event": {"precision": precision, "recall": recall, "f1": f1, "predicted": n_predicted, "labelled": n_labelled,
                  "correct": n_correct, "found": n_found},
        "video_accuracy": _ratio(n_videos_right, len(sequences)),
        "settings": settings,
        "videos": videos,
    }


def plot_sequences(sequences: list[dict], threshold: float, path: Path, max_videos: int = 12) -> Path | None:
    """Probability over time per video (raw and smoothed), labelled runs shaded, predicted events marked."""
    if not sequences:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = sequences[:max_videos]
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 1.6 * len(shown) + 0.6), squeeze=False, sharey=True)
    for ax, s in zip(axes[:, 0], shown):
        x = s["time"]
        for e in labelled_events(s["frame"], s["time"], s["truth"]):
            ax.axvspan(e.start, e.end, color="tab:green", alpha=0.2, lw=0)
        for e in s["events"]:
            ax.axvspan(e.start, e.end, ymin=0.92, ymax=1.0, color="tab:red", alpha=0.8, lw=0)
        ax.plot(x, s["probability"], color="0.6", lw=0.8, label="frame")
        ax.plot(x, s["smoothed"], color="tab:blue", lw=1.4, label="smoothed")
        ax.axhline(threshold, color="tab:red", lw=0.6, ls="--")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(Path(str(s["video"])).name, fontsize=8, loc="left")
    axes[-1, 0].set_xlabel("time (s; frame number where a sequence has no times)")
    axes[0, 0].legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
