"""What keeneye prints: version, help, no TensorFlow C++ log lines, warnings, progress in log files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import warnings
from io import StringIO

from rich.console import Console
from typer.testing import CliRunner

import keeneye
from keeneye.cli import app
from keeneye.terminal import PlainProgress, native_logs_filtered, plural, progress_bar, quiet_runtime

NATIVE_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:|absl", re.MULTILINE)


def test_version_and_help_read_well():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"keeneye {keeneye.__version__}"
    help_text = CliRunner().invoke(app, ["--help"]).output
    assert "<bool>" not in help_text and "--verbose" in help_text and "--version" in help_text
    for command in ("train", "predict", "serve", "explain"):
        line = next(line for line in help_text.splitlines() if line.strip().startswith(command + " "))
        assert not line.rstrip().endswith("..."), line  # one-line summaries are not cut off
    serve_help = CliRunner().invoke(app, ["serve", "--help"]).output
    assert "<bool>" not in serve_help and "--batching / --no-batching" in serve_help


def test_plural():
    assert plural(1, "cross-split pair") == "1 cross-split pair"
    assert plural(0, "cross-split pair") == "0 cross-split pairs"
    assert plural(2, "image") == "2 images"


def test_plain_progress_prints_while_a_phase_is_silent():
    out = StringIO()
    console = Console(file=out, width=200)
    assert not console.is_terminal and isinstance(progress_bar(console), PlainProgress)
    with PlainProgress(console, interval=0.2) as progress:
        task = progress.add_task("embedding images", total=10)
        progress.advance(task, 4)
        time.sleep(0.75)  # nothing advances: lines must still come
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("embedding images: 0/10 (0%)")
    assert len([line for line in lines if "4/10 (40%)" in line]) >= 3  # ticks during the silence, plus the final line


def test_a_task_step_restarts_its_line_and_says_so_at_once():
    """Task.step (a pre-pass inside a phase, e.g. cached_top's activations) is printed when it starts, counted from 0."""
    from keeneye.terminal import Reporter

    out = StringIO()
    with Reporter(Console(file=out, width=200)).task("fine-tuning", 10) as task:
        task.step("fine-tuning: frozen bottom over 6 images", 6)
        task.advance(6)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("fine-tuning: 0/10 (0%)")
    assert lines[1].startswith("fine-tuning: frozen bottom over 6 images: 0/6 (0%)")
    assert lines[-1].startswith("fine-tuning: frozen bottom over 6 images: 6/6 (100%)")


def test_native_log_lines_are_filtered_and_the_rest_kept(capfd):
    with native_logs_filtered():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, b"I0000 00:00:1796120697.734069    8968 port.cc:153] oneDNN custom operations are on.\n")
        os.write(2, b"a real problem\n")
    assert capfd.readouterr().err == "a real problem\n"


def test_warnings_in_keeneye_format_and_library_warnings_hidden(monkeypatch):
    out = StringIO()
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    saved = warnings.showwarning
    try:
        quiet_runtime(verbose=False, console=Console(file=out, width=200))
        ours = type("EngineFallbackWarning", (UserWarning,), {"__module__": "keeneye.inference.engines"})
        warnings.showwarning("ONNX Runtime cannot be used", ours, "/elsewhere/x.py", 1)
        warnings.showwarning("some library deprecation", DeprecationWarning, "/site-packages/lib.py", 7)
        assert out.getvalue().splitlines() == ["warning: ONNX Runtime cannot be used"]
        quiet_runtime(verbose=True, console=Console(file=out, width=200))
        warnings.showwarning("some library deprecation", DeprecationWarning, "/site-packages/lib.py", 7)
        assert "warning: some library deprecation (DeprecationWarning from lib.py:7)" in out.getvalue()
    finally:
        warnings.showwarning = saved


def test_cli_output_to_a_file_has_no_tensorflow_log_lines(tiny_bundle, demo_data, tmp_path):
    """A fresh process (TensorFlow not yet loaded), stdout and stderr to one file, as in `keeneye ... > log 2>&1`."""
    image = sorted((demo_data / "testing" / "defect").glob("*.png"))[0]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    log = tmp_path / "predict.log"
    with open(log, "wb") as handle:
        code = subprocess.call([sys.executable, "-m", "keeneye", "predict", str(tiny_bundle.run_dir), str(image)],
                               stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=300)
    text = log.read_text()
    assert code == 0, text
    assert "predicting 1 image with tiny" in text and image.name in text
    assert NATIVE_LINE.search(text) is None, text


def test_reporter_wraps_one_console_and_names_each_event() -> None:
    import io

    import pandas as pd

    from keeneye.terminal import Reporter

    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    reporter = Reporter.of(console)
    assert Reporter.of(reporter) is reporter and reporter.console is console
    reporter.classes("good", "defect")
    reporter.threshold(0.4375, "best F1 on validation", 0.9, out_of_fold=True, warning="few positives [sic]")
    reporter.dropped_files([("/data/a[1].jpg", "truncated JPEG")], when="while fine-tuning")
    reporter.data_counts(pd.DataFrame([["training", "good", 3, 1, 0, 2]], columns=["split", "label", "found", "skipped", "dropped", "used"]))
    text = out.getvalue()
    assert "classes: defect = positive (1), good = negative (0)" in text
    assert "warning: few positives [sic]" in text  # markup-looking text printed as it is
    assert "threshold: 0.4375 (best F1 on validation)" in text
    assert "validation F1 after head training: 0.9000 (out-of-fold, over training + validation)" in text
    assert "1 image failed to decode while fine-tuning" in text and "/data/a[1].jpg: truncated JPEG" in text
    assert "total" in text and "Data" in text
