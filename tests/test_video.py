"""Video as data and as input, on generated clips: a textured page turned in the middle of a still shot.

Cheap tests (no model) pin down sampling, groups, truncation reports, frame-folder names, segment
manifests, the event logic and flat memory while streaming; one small flip model (real MobileNetV2
weights at 96 px, trained once per session on generated clips) checks events end to end.
"""

from __future__ import annotations

import json
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from keeneye.config import config_from_dict
from keeneye.data.manifest import load_data
from keeneye.data.split import assign_splits
from keeneye.data.video import VideoError, assign_frame_numbers, expand_videos, iter_frames
from keeneye.demo_video import write_page_video
from keeneye.evaluation.sequence import Event, labelled_events, match_events
from keeneye.inference.video import EventDetector, EventSettings, detect_events, smooth, stream_video

from conftest import tiny_config


def _truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# --- reading and sampling ------------------------------------------------------------------------


def test_frames_are_sampled_at_the_requested_rate(tmp_path):
    clip = write_page_video(tmp_path / "clip.mp4", seconds=2.0, fps=30, flips=())
    sampled = list(iter_frames(clip, fps=5))
    assert [f.index for f in sampled] == list(range(0, 60, 6))
    assert np.allclose([f.time for f in sampled], np.arange(10) * 0.2, atol=1e-3)
    assert sampled[0].image.shape == (120, 160, 3) and sampled[0].image.dtype == np.uint8
    assert len(list(iter_frames(clip))) == 60  # fps None: every frame
    assert len(list(iter_frames(clip, fps=12))) == 24  # not a divisor of 30: first frame at or after each 1/12 s


def test_truncated_video_is_reported_with_frame_and_reason(tmp_path):
    avi = _truncate(write_page_video(tmp_path / "cut.avi", seconds=3.0, fps=30, flips=()))
    frames = []
    with pytest.raises(VideoError) as caught:
        for frame in iter_frames(avi):
            frames.append(frame.index)
    assert "truncated video" in caught.value.reason and "declares 90 frames" in caught.value.reason
    assert 0 < caught.value.frame == len(frames) < 90  # the readable frames came first
    mp4 = _truncate(write_page_video(tmp_path / "cut.mp4", seconds=1.0, fps=30, flips=()))  # index (moov) at the end: lost
    with pytest.raises(VideoError, match="cannot open video"):
        list(iter_frames(mp4))


def test_videos_in_class_folders_become_frames_grouped_by_video(tmp_path, monkeypatch):
    monkeypatch.setenv("KEENEYE_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data"
    for split, n in (("training", 4), ("testing", 1)):
        for label, flips in (("flip", ((0.0, 1.0),)), ("notflip", ())):
            (data / split / label).mkdir(parents=True)
            for i in range(n):
                write_page_video(data / split / label / f"{label}{i}.mp4", seconds=1.0, fps=30, flips=flips, seed=i)
    _truncate(write_page_video(data / "training" / "notflip" / "broken.avi", seconds=1.0, fps=30, flips=()))
    cfg = config_from_dict(tiny_config(tmp_path, data, positive_class="flip", video={"fps": 10.0}), base_dir=tmp_path)
    scan = load_data(cfg)
    manifest = scan.manifest
    videos = manifest.groupby("video")
    assert videos.ngroups == 11  # the broken video still gave its readable frames
    assert (videos.size().drop(str(data / "training" / "notflip" / "broken.avi")) == 10).all()  # 1 s at 10 fps
    assert (manifest["group"] == manifest["video"]).all()
    assert list(scan.dropped["path"]) == [str(data / "training" / "notflip" / "broken.avi")]
    assert scan.dropped["reason"].iat[0].startswith("truncated video: decoding stopped at frame")
    splits = assign_splits(manifest, 0.25, 0.2, seed=0).manifest
    assert (splits.groupby("video")["split"].nunique() == 1).all()  # no video is split apart
    assert set(splits["split"]) == {"training", "validation", "testing"}
    assert load_data(cfg).manifest["sha1"].tolist() == manifest["sha1"].tolist()  # second scan: frames from the cache


def test_frame_folder_names_give_video_and_order(tmp_path):
    paths = ["0001_000000012.jpg", "0001_000000003.jpg", "0002_000000001.jpg", "cast_def_0_12.jpeg"]
    manifest = pd.DataFrame({"path": [str(tmp_path / p) for p in paths], "label": "flip", "split": "training",
                             "group": [None] * 4, "sha1": None})
    named = assign_frame_numbers(manifest)
    assert named["group"].tolist() == ["0001", "0001", "0002", None]
    assert named["frame"].tolist()[:3] == [12.0, 3.0, 1.0] and np.isnan(named["frame"].iat[3])
    custom = assign_frame_numbers(manifest.assign(path=[str(tmp_path / f"vid{i % 2}-f{i}.png") for i in range(4)]),
                                  frame_pattern=r"-f(\d+)\.")
    assert custom["group"].tolist() == ["vid0", "vid1", "vid0", "vid1"]
    assert custom["frame"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_frame_folders_are_grouped_by_video_in_a_scan(tmp_path, monkeypatch):
    import cv2

    monkeypatch.setenv("KEENEYE_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "frames"
    rng = np.random.default_rng(0)
    for split, videos in (("training", ("0001", "0002", "0003", "0004")), ("testing", ("0005",))):
        for label in ("flip", "notflip"):
            (data / split / label).mkdir(parents=True)
            for video in videos:
                for number in range(3):
                    frame = number + (10 if label == "flip" else 0)
                    image = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
                    cv2.imwrite(str(data / split / label / f"{video}_{frame:09d}.jpg"), image)
    cfg = config_from_dict(tiny_config(tmp_path, data, positive_class="flip"), base_dir=tmp_path)
    manifest = load_data(cfg).manifest
    assert sorted(manifest["video"].unique()) == ["0001", "0002", "0003", "0004", "0005"]
    assert (manifest["group"] == manifest["video"]).all()
    one = manifest[manifest["video"] == "0001"].sort_values("frame")
    assert one["frame"].tolist() == [0, 1, 2, 10, 11, 12] and one["label"].tolist() == ["notflip"] * 3 + ["flip"] * 3
    splits = assign_splits(manifest, 0.25, 0.2, seed=0).manifest
    assert (splits.groupby("video")["split"].nunique() == 1).all()
    by_pattern = load_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"group_pattern": r"^(\d{3})"})})).manifest
    assert sorted(by_pattern["group"].unique()) == ["000"]  # data.group_pattern decides the group


def test_segment_manifest_labels_frames_by_time(tmp_path, monkeypatch):
    monkeypatch.setenv("KEENEYE_CACHE_DIR", str(tmp_path / "cache"))
    write_page_video(tmp_path / "a.mp4", seconds=2.0, fps=30, flips=((1.0, 1.6),))
    (tmp_path / "segments.csv").write_text("path,start,end,label\na.mp4,0,1.0,notflip\na.mp4,1.0,1.6,flip\n")
    cfg = config_from_dict({"output_dir": "runs", "data": {"manifest_path": "segments.csv"}, "video": {"fps": 5.0}}, base_dir=tmp_path)
    manifest = load_data(cfg).manifest
    assert manifest["time"].round(3).tolist() == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4]  # 1.6 s on: in no segment
    assert manifest["label"].tolist() == ["notflip"] * 5 + ["flip"] * 3
    (tmp_path / "bad.csv").write_text("path,start,end,label\na.mp4,1,0.5,flip\nmissing.mp4,0,1,flip\n")
    bad = config_from_dict({"output_dir": "runs", "data": {"manifest_path": "bad.csv"}}, base_dir=tmp_path)
    with pytest.raises(Exception, match=r"line 2: end \(0.5\) must be after start[\s\S]*line 3: file not found"):
        load_data(bad)


# --- events --------------------------------------------------------------------------------------


def test_smoothing_and_hysteresis_make_events():
    p = np.zeros(40)
    p[10:20] = 0.9
    p[14] = 0.45  # a dip inside the event: hysteresis keeps it whole
    p[30] = 1.0  # a one-frame spike: smoothing and the minimum length drop it
    frames, times = np.arange(40), np.arange(40) * 0.1
    settings = EventSettings(enter=0.5, exit=0.35, smoothing_frames=3, min_event_frames=3)
    events = detect_events(frames, times, p, settings)
    assert [(e.start_frame, e.end_frame) for e in events] == [(10, 19)]
    assert events[0].start == pytest.approx(1.0) and events[0].peak_probability == pytest.approx(0.9)
    raw = detect_events(frames, times, p, EventSettings(0.5, 0.5, smoothing_frames=1, min_event_frames=1))
    assert len(raw) == 3  # without smoothing or hysteresis: split by the dip, plus the spike
    detector = EventDetector(settings)  # online: the same events, at most smoothing_frames // 2 frames late
    online = [e for i in range(40) for e in detector.push(i, times[i], p[i])] + detector.finish()
    assert online == events
    assert np.allclose(smooth(p, 3)[1:-1], np.convolve(p, np.ones(3) / 3, mode="valid"))


def test_event_overlap_counts():
    truth = np.zeros(30, bool)
    truth[5:10] = truth[20:25] = True
    labelled = labelled_events(np.arange(30), np.arange(30) * 0.5, truth)
    assert [(e.start_frame, e.end_frame, e.start) for e in labelled] == [(5, 9, 2.5), (20, 24, 10.0)]
    predicted = [Event(0, 0, 8, 12), Event(0, 0, 14, 16), Event(0, 0, 26, 28)]
    assert match_events(predicted, labelled) == (1, 1)  # one of three correct; one of two found
    fragments = [Event(0, 0, 5, 6), Event(0, 0, 8, 9), Event(0, 0, 19, 30)]
    assert match_events(fragments, labelled) == (2, 2)  # the second fragment of the first event is a false event


# --- streaming -----------------------------------------------------------------------------------


def _mean_engine(batch: np.ndarray) -> np.ndarray:
    """Brightness as a 'probability': streaming and memory do not depend on the model."""
    return batch.mean(axis=(1, 2, 3)) / 255.0


def _slow_engine(batch: np.ndarray) -> np.ndarray:
    """Slower than decoding, as a real model is: an unbounded queue would fill with decoded frames."""
    time.sleep(0.008)
    return _mean_engine(batch)


def test_streaming_a_long_clip_keeps_memory_flat(tmp_path):
    clip = write_page_video(tmp_path / "long.mp4", seconds=40.0, fps=30, flips=((20.0, 21.0),), size=(160, 120))
    frame_bytes = 120 * 160 * 3
    tracemalloc.start()
    try:
        n = 0
        for result in stream_video(_slow_engine, clip, image_size=96, fps=None, batch_size=4, queue_size=16):
            n += 1
            if n == 100:
                tracemalloc.reset_peak()  # steady state: after imports and the first allocations
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 1200
    assert peak < 40 * frame_bytes, f"peak {peak / 1e6:.1f} MB while streaming {n * frame_bytes / 1e6:.0f} MB of frames"


def test_stream_stops_cleanly_and_reports_damage(tmp_path):
    clip = write_page_video(tmp_path / "clip.mp4", seconds=3.0, fps=30, flips=())
    stop = threading.Event()
    seen = []
    for result in stream_video(_mean_engine, clip, 32, batch_size=4, queue_size=4, stop=stop):
        seen.append(result.frame)
        if len(seen) == 10:
            stop.set()
    assert 10 <= len(seen) < 90 and seen == sorted(seen)
    cut = _truncate(write_page_video(tmp_path / "cut.avi", seconds=3.0, fps=30, flips=()))
    got = []
    with pytest.raises(VideoError, match="truncated"):
        for result in stream_video(_mean_engine, cut, 32):
            got.append(result.frame)
    assert got == list(range(len(got))) and len(got) > 10


# --- end to end with a small flip model ------------------------------------------------------------


@pytest.fixture(scope="module")
def flip_run(tmp_path_factory, imagenet_weights):
    """A flip model trained on a segment manifest of generated clips (one of them truncated)."""
    from rich.console import Console

    from keeneye import api

    root = tmp_path_factory.mktemp("flip")
    rows = ["path,start,end,label"]
    for i in range(8):
        start = 0.6 + 0.25 * (i % 4)
        flips = () if i % 4 == 3 else ((start, start + 1.0),)
        clip = write_page_video(root / f"clip{i}.mp4", seconds=3.0, fps=15, flips=flips, seed=i)
        edges = [0.0, *[x for f in flips for x in f], 3.0]
        rows += [f"{clip.name},{edges[k]},{edges[k + 1]},{'flip' if k % 2 else 'notflip'}" for k in range(len(edges) - 1)]
    _truncate(write_page_video(root / "cut.avi", seconds=3.0, fps=15, flips=((1.0, 2.0),), seed=9))
    rows += ["cut.avi,0,1,notflip", "cut.avi,1,2,flip", "cut.avi,2,3,notflip"]
    (root / "segments.csv").write_text("\n".join(rows) + "\n")
    config = tiny_config(root, root, positive_class="flip", run_name="flip", video={"fps": 5.0, "smoothing_frames": 3, "min_event_frames": 2},
                         max_dropped_fraction=0.2, training={"cv_folds": 0})  # the folds are tested on tiny_bundle
    config["data"] = {"manifest_path": "segments.csv", "test_fraction": 0.25}
    del config["data_folder_path"]
    return api.train(config_from_dict(config, base_dir=root), console=Console(quiet=True))


def test_training_on_videos_reports_sequences_and_damage(flip_run):
    run = flip_run.run_dir
    dropped = pd.read_csv(run / "dropped_files.csv")
    assert dropped["path"].str.endswith("cut.avi").tolist() == [True]
    assert "truncated video: decoding stopped at frame" in dropped["reason"].iat[0]
    audit = json.loads((run / "audit.json").read_text())
    assert [u["path"] for u in audit["images"]["unreadable"]] == dropped["path"].tolist()
    metrics = json.loads((run / "metrics.json").read_text())
    sequences = metrics["sequences"]
    assert sequences["n_sequences"] >= 2 and sequences["event"]["labelled"] >= 1
    assert sequences["frame"]["f1"] >= 0.8 and sequences["event"]["recall"] >= 0.9 and sequences["video_accuracy"] >= 0.9
    assert (run / "sequences.png").stat().st_size > 5000
    report = (run / "report.html").read_text()
    assert "Probability over time per video" in report and "event recall" in report
    manifest = pd.read_csv(run / "manifest.csv")
    assert (manifest.groupby("video")["split"].nunique() == 1).all()


def test_predict_on_a_video_finds_events_at_the_right_times(flip_run, tmp_path):
    from keeneye.cli import app

    clip = write_page_video(tmp_path / "new.mp4", seconds=6.0, fps=15, flips=((1.0, 2.0), (4.0, 5.0)), seed=42)
    still = write_page_video(tmp_path / "still.mp4", seconds=3.0, fps=15, flips=(), seed=43)
    out = tmp_path / "out" / "frames.csv"
    result = CliRunner().invoke(app, ["predict", str(flip_run.run_dir), str(clip), str(still), "-o", str(out), "--fps", "10"])
    assert result.exit_code == 0, result.output
    frames = pd.read_csv(out)
    assert list(frames.columns) == ["path", "frame", "time", "probability", "label", "error"]
    assert len(frames) == 60 + 30 and frames["error"].isna().all()
    assert frames.loc[frames["path"] == str(clip), "frame"].tolist()[:3] == [0, 2, 3]  # 10 of 15 frames per second
    report = json.loads(out.with_suffix(".events.json").read_text())
    by_video = {v["video"]: v for v in report["videos"]}
    assert by_video[str(still)]["verdict"] == "no flip" and by_video[str(clip)]["verdict"] == "contains flip"
    events = by_video[str(clip)]["events"]
    assert len(events) == 2
    for event, (start, end) in zip(events, ((1.0, 2.0), (4.0, 5.0))):
        assert abs(event["start"] - start) <= 0.35 and abs(event["end"] - end) <= 0.45, events


def test_watch_prints_json_lines_per_event_and_frame(flip_run, tmp_path):
    from keeneye.cli import app

    clip = write_page_video(tmp_path / "live.avi", seconds=4.0, fps=15, flips=((1.5, 2.5),), seed=7)
    result = CliRunner().invoke(app, ["watch", str(flip_run.run_dir), str(clip), "--frames", "--fps", "5"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    kinds = [r["type"] for r in records]
    assert kinds.count("frame") == 20 and kinds.count("event") == 1 and kinds[-1] == "end"
    event = next(r for r in records if r["type"] == "event")
    assert 1.2 <= event["start"] <= 1.9 and event["latency_ms"] >= 0
    assert all(r["latency_ms"] > 0 for r in records if r["type"] == "frame")
    assert records[-1] == {"type": "end", "frames": 20, "events": 1, "stopped": False, "error": None}


def test_watch_stops_cleanly_when_asked(flip_run, tmp_path):
    """What Ctrl-C does in `keeneye watch`: the stop event ends the stream and an 'end' record follows."""
    from keeneye import api

    clip = write_page_video(tmp_path / "long.mp4", seconds=8.0, fps=15, flips=(), seed=8)
    stop = threading.Event()
    records = []
    for record in api.watch(flip_run.run_dir, str(clip), frames=True, fps=5.0, stop=stop):
        records.append(record)
        if len(records) == 5:
            stop.set()
    assert records[-1]["type"] == "end" and records[-1]["stopped"] is True
    assert 5 <= records[-1]["frames"] < 40


def test_evaluate_on_a_folder_of_videos(flip_run, tmp_path):
    from rich.console import Console

    from keeneye import api

    data = tmp_path / "more"
    (data / "flip").mkdir(parents=True)
    (data / "notflip").mkdir()
    write_page_video(data / "flip" / "turn.mp4", seconds=1.0, fps=15, flips=((0.0, 1.0),), seed=50)
    write_page_video(data / "notflip" / "still.mp4", seconds=1.0, fps=15, flips=(), seed=51)
    _truncate(write_page_video(data / "notflip" / "cut.avi", seconds=1.6, fps=15, flips=(), seed=52))
    result = api.evaluate(flip_run.run_dir, data=data, console=Console(quiet=True))
    sequences = result.metrics["sequences"]
    assert sequences["n_sequences"] == 3 and sequences["n_frames"] == len(result.predictions)
    assert result.metrics["dropped"] == 1
    dropped = pd.read_csv(result.folder / "dropped_files.csv")
    assert dropped["path"].tolist() == [str(data / "notflip" / "cut.avi")] and "truncated" in dropped["reason"].iat[0]
    assert (result.folder / "sequences.png").is_file()


def test_only_video_aware_callers_get_videos_from_a_folder(tmp_path):
    from keeneye.inference.predictor import expand_inputs

    write_page_video(tmp_path / "clip.mp4", seconds=0.2, fps=10, flips=())
    (tmp_path / "notes.txt").write_text("x")
    paths, problems = expand_inputs([tmp_path], videos=True)
    assert paths == [str(tmp_path / "clip.mp4")] and [p["path"] for p in problems] == [str(tmp_path / "notes.txt")]
    paths, problems = expand_inputs([tmp_path])  # Predictor.predict, explain: images only, the video reported
    assert paths == [] and {p["path"]: p["error"] for p in problems}[str(tmp_path / "clip.mp4")].startswith("skipped: a video file")
