"""Command line: a thin layer that parses arguments, calls the Python API and prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

import keeneye
from keeneye.errors import KeeneyeError
from keeneye.terminal import quiet_runtime


class KeeneyeGroup(TyperGroup):
    """The one place where keeneye's errors become exit codes: `error: <message>` on stderr, no traceback,
    and the exit status of the error's class (errors.py)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeeneyeError as exc:
            err_console.print(Text.assemble(("error:", "bold red"), " ", str(exc)), highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None


# Plain help (click's layout): the rich one printed flags as `--help <bool>` and squeezed the
# help texts into a narrow column.
app = typer.Typer(cls=KeeneyeGroup, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Binary image classification for visual inspection: train, evaluate, predict, serve.")
config_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Inspect and validate config files.")
app.add_typer(config_app, name="config")
err_console = Console(stderr=True)
console = Console()
for _console in (console, err_console):  # in a log file, a long line stays one line (rich wraps at 80 columns)
    _console.soft_wrap = not _console.is_terminal

SET_HELP = "Override a config value: section.key=value (repeatable); the value is parsed as JSON when it can be."
BUNDLE_HELP = "Model bundle folder (runs/<name>)."
ENGINE_HELP = "Inference engine: auto (the fastest available), openvino, onnx or keras."


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"keeneye {keeneye.__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show TensorFlow's own log lines and library warnings."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Binary image classification for visual inspection: train, evaluate, predict, serve."""
    quiet_runtime(verbose, err_console)


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of config.json (for editors)."""
    from keeneye.config import config_json_schema

    typer.echo(json.dumps(config_json_schema(), indent=2))


@config_app.command("check")
def config_check(
    config: Path = typer.Argument(..., metavar="CONFIG", help="Path to config.json."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Validate a config file and print it resolved.

    Defaults are filled in and paths made absolute.
    """
    from keeneye.config import load_config

    cfg = load_config(config, set_ or [])
    typer.echo(cfg.model_dump_json(indent=2))


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Path to config.json (required unless --resume)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue an interrupted run from its last finished epoch: runs/<name> (its state is in runs/<name>.partial)."
    ),
) -> None:
    """Train a model and write its bundle to runs/<name>/.

    Trains on <data_folder_path>/training, chooses the threshold on validation images and
    evaluates on testing.
    """
    from keeneye import api
    from keeneye.config import load_config
    from keeneye.errors import ConfigError

    if resume is not None:
        if config is not None or set_:
            raise ConfigError("--resume continues a run with the config saved in it: give no --config and no --set.")
        api.train(resume=resume, console=console)
        return
    if config is None:
        raise ConfigError("train needs --config config.json (or --resume runs/<name> to continue an interrupted run).")
    cfg = load_config(config, set_ or [])
    api.train(cfg, console=console)


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help=BUNDLE_HELP),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder to evaluate on: DIR/testing/<class>/ or DIR/<class>/ (default: the run's testing split)."),
    engine: str = typer.Option("auto", "--engine", help=ENGINE_HELP),
) -> None:
    """Measure a trained bundle: F1, precision, recall, plots.

    On the run's own testing images, or on another folder with --data.
    """
    from keeneye import api

    api.evaluate(run_dir, data=data, engine=engine, console=console)


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help=BUNDLE_HELP),
    inputs: List[str] = typer.Argument(..., metavar="INPUT", help="Image or video files, folders (recursive) or glob patterns."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write results to this .csv or .json (default: CSV on stdout)."),
    engine: str = typer.Option("auto", "--engine", help=ENGINE_HELP),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    events: Optional[Path] = typer.Option(None, "--events", help="Videos: write events and per-video verdicts to this JSON (default: beside --output as <name>.events.json)."),
    fps: Optional[float] = typer.Option(None, "--fps", min=0.001, help="Videos: frames per second to predict (default: the bundle's video.fps)."),
    smoothing: Optional[int] = typer.Option(None, "--smoothing", min=1, help="Videos: moving-average window in frames (default: video.smoothing_frames)."),
    use_ray: bool = typer.Option(False, "--ray", help="Run on a Ray cluster (pip install 'keeneye[ray]'); --output .parquet or .csv resumes."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)."),
    actors: int = typer.Option(2, "--actors", min=1, help="Ray actors, each holding the model once (with --ray)."),
    maps: Optional[Path] = typer.Option(None, "--maps", help="One-class bundles: also write an anomaly-map overlay PNG per image into this folder."),
) -> None:
    """Predict images and videos: probability and label for each.

    Videos give one row per sampled frame, plus events and a verdict per video.
    Inputs that cannot be used are listed with their reason. Exit status 1 only when nothing could
    be predicted.
    """
    from keeneye import api

    if use_ray:
        frame = api.predict_ray(run_dir, inputs, output=output, actors=actors, address=address, engine=engine, batch_size=batch_size, console=err_console)
    else:
        frame = api.predict(run_dir, inputs, output=output, engine=engine, batch_size=batch_size, console=err_console,
                            events=events, fps=fps, smoothing_frames=smoothing, maps=maps)
    if output is None:
        typer.echo(frame.to_csv(index=False), nl=False)
    if frame["error"].notna().all():
        err_console.print("[bold red]error:[/] no image could be predicted.")
        raise typer.Exit(1)


@app.command()
def watch(
    run_dir: Path = typer.Argument(..., help="Model bundle folder (runs/<name>)."),
    source: str = typer.Argument(..., help="Camera index (0, 1, ...), video file or stream URL (rtsp://, http://...)."),
    frames: bool = typer.Option(False, "--frames", help="Also print one line per frame."),
    fps: Optional[float] = typer.Option(None, "--fps", min=0.001, help="Frames per second to predict (default: the bundle's video.fps)."),
    smoothing: Optional[int] = typer.Option(None, "--smoothing", min=1, help="Moving-average window in frames (default: video.smoothing_frames)."),
    engine: str = typer.Option("auto", "--engine", help="Inference engine."),
) -> None:
    """Watch a camera, file or stream: one JSON line per event.

    With --frames, also one line per frame; each line carries its latency. Stops at the end of the
    stream or on Ctrl-C (the open event is closed and reported first).
    """
    import signal
    import threading

    from keeneye import api

    stop = threading.Event()

    def interrupted(*_) -> None:  # first Ctrl-C: finish cleanly; a second one (a stalled stream): leave now
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, interrupted)
    end = {}
    try:
        for record in api.watch(run_dir, source, frames=frames, fps=fps, engine=engine, smoothing_frames=smoothing, stop=stop):
            typer.echo(json.dumps(record))
            end = record
    except KeyboardInterrupt:
        raise typer.Exit(130)
    finally:
        signal.signal(signal.SIGINT, previous)
    if end.get("error") and not end.get("frames"):
        err_console.print(f"[bold red]error:[/] {end['error']}", highlight=False)
        raise typer.Exit(1)


@app.command()
def demo(
    folder: Path = typer.Option(Path("demo_run"), "--folder", help="Where to write the demo data, config and runs."),
    seed: int = typer.Option(0, "--seed"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Try keeneye on generated images: train and evaluate.

    Writes a small seeded inspection dataset and a config, then trains and evaluates on it.
    """
    from keeneye import api
    from keeneye.demo import make_demo_dataset, write_demo_config

    folder = folder.resolve()
    data = make_demo_dataset(folder / "data", seed=seed)
    config_path = write_demo_config(folder, data, folder / "runs")
    console.print(f"demo data in {data}, config {config_path}")
    result = api.train(config_path, overrides=set_ or [], console=console)
    evaluation = api.evaluate(result.run_dir, console=console)
    f1 = evaluation.metrics["at_threshold"]["f1"]
    console.print(f"[bold green]demo done:[/] test F1 {f1:.4f}; model bundle {result.run_dir}")


@app.command()
def serve(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help=BUNDLE_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    workers: int = typer.Option(1, "--workers", min=1, help="Server processes (each loads its own model)."),
    engine: str = typer.Option("auto", "--engine", help=ENGINE_HELP),
    batching: Optional[bool] = typer.Option(
        None, "--batching/--no-batching", show_default=False,
        help="Merge concurrent requests into one forward pass [default: on for keras, off for onnx, as measured by benchmarks/load_test.py].",
    ),
    max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size", help="Most images per forward pass [32]."),
    max_batch_wait_ms: Optional[float] = typer.Option(None, "--max-batch-wait-ms", help="How long a request that finds the model idle waits for others to join its batch [5]."),
    max_body_mb: Optional[float] = typer.Option(None, "--max-body-mb", help="Largest request body in MiB [32]."),
    max_image_mb: Optional[float] = typer.Option(None, "--max-image-mb", help="Largest single image file in MiB [16]."),
    max_buffered_body_mb: Optional[float] = typer.Option(None, "--max-buffered-body-mb", help="Memory for request bodies, all requests together, in MiB; a body counts 1x as an image, 2x as multipart, 3x as JSON [128, or 3 x --max-body-mb]."),
    body_timeout: Optional[float] = typer.Option(None, "--body-timeout", help="Longest time to receive one request body, s; slower clients get 408 [30]."),
    max_json_depth: Optional[int] = typer.Option(None, "--max-json-depth", help="Deepest nesting in a JSON body [16]."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Largest width x height, checked from the header [50000000]."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Most images per request [32]."),
    formats: Optional[str] = typer.Option(None, "--formats", help="Accepted formats, comma-separated [jpeg,png,bmp,tiff,webp,gif]."),
    decode_threads: Optional[int] = typer.Option(None, "--decode-threads", help="Threads decoding uploads [2]."),
    max_pending_images: Optional[int] = typer.Option(None, "--max-pending-images", help="Queued images before 503 [1024]."),
    request_timeout: Optional[float] = typer.Option(None, "--request-timeout", help="Longest wait for the model per request, s [60]."),
    shutdown_timeout: Optional[float] = typer.Option(None, "--shutdown-timeout", help="Grace period for in-flight requests on SIGTERM, s [30]."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Serve a bundle over HTTP: a web page and a JSON API.

    Open http://HOST:PORT/ in a browser to check images; POST /predict for programs; /docs
    documents the API. SIGTERM lets requests in flight finish.
    """
    from keeneye.serving import make_settings

    mib = lambda value: None if value is None else int(value * 1024 * 1024)  # noqa: E731
    settings = make_settings(
        engine=engine, batching=batching, max_batch_size=max_batch_size, max_batch_wait_ms=max_batch_wait_ms,
        max_body_bytes=mib(max_body_mb), max_image_bytes=mib(max_image_mb), max_pixels=max_pixels,
        max_buffered_body_bytes=mib(max_buffered_body_mb), body_timeout_s=body_timeout, max_json_depth=max_json_depth,
        max_images_per_request=max_images, allowed_formats=formats, decode_threads=decode_threads,
        max_pending_images=max_pending_images, request_timeout_s=request_timeout, shutdown_timeout_s=shutdown_timeout,
    )
    from keeneye.serving.server import serve as run_server

    run_server(run_dir, settings, host=host, port=port, workers=workers, log_level=log_level.lower())


@app.command()
def export(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help=BUNDLE_HELP),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx, tflite or savedmodel."),
    quantize: Optional[str] = typer.Option(None, "--quantize", "-q", help="float16 or int8 (onnx, tflite); int8 is calibrated on the bundle's training images."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="File (SavedModel: folder) to write; its folder must exist (default: runs/<name>/exports/)."),
    max_diff: Optional[float] = typer.Option(None, "--max-diff", help="Largest probability difference from model.keras allowed (default 1e-4; float16 0.15; int8 not checked)."),
    min_agreement: Optional[float] = typer.Option(None, "--min-agreement", help="Smallest share of equal decisions at the threshold (default 0.99; float16 0.98; int8 0.95)."),
    max_f1_drop: Optional[float] = typer.Option(None, "--max-f1-drop", help="Largest test F1 drop allowed (default: float16 0.01; int8 0.03)."),
) -> None:
    """Export a bundle to ONNX, TFLite or SavedModel.

    The export is verified against model.keras on held-out images (exit status 3 if it
    disagrees).
    """
    from keeneye.inference.export import export_bundle, tolerance_for

    tolerance = tolerance_for(quantize, max_diff, min_agreement, max_f1_drop)
    export_bundle(run_dir, fmt, quantize=quantize, output=output, tolerance=tolerance, console=console)


@app.command()
def audit(
    config: Path = typer.Option(..., "--config", "-c", help="Path to config.json."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for audit.json and audit.txt [<output_dir>/audits/audit-<time>/]."),
) -> None:
    """Audit the data before training: duplicates, leakage.

    Splits the data as train would, then reports counts, sizes, unreadable files, duplicates,
    near-duplicates and train/test leakage.
    """
    from keeneye.config import load_config
    from keeneye.data.audit import audit_config

    cfg = load_config(config, set_ or [])
    audit_config(cfg, output=out, console=console)


@app.command()
def explain(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help=BUNDLE_HELP),
    images: List[str] = typer.Argument(..., metavar="IMAGE", help="Image files, folders (recursive) or glob patterns."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the overlays (PNG) and explanations.csv."),
) -> None:
    """Heat maps: Grad-CAM, or the anomaly map for one-class bundles.

    For a bundle with the one-class score stacked in (head.anomaly_feature), that part's map is drawn beside Grad-CAM.

    Exit status 1 only when no image could be explained.
    """
    from keeneye.explain import explain as explain_images

    frame = explain_images(run_dir, images, out, console=err_console)
    if frame["overlay"].isna().all():
        err_console.print("[bold red]error:[/] no image could be explained.")
        raise typer.Exit(1)


class _RunsGroup(TyperGroup):
    """`keeneye runs [OUTPUT_DIR] [--sort KEY]` means `keeneye runs list ...`; `keeneye runs compare A B` stays."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] != "--help"):
            args = ["list", *args]
        return super().parse_args(ctx, args)


runs_app = typer.Typer(cls=_RunsGroup, rich_markup_mode=None, help=(
    "List and compare past runs.\n\n`keeneye runs [OUTPUT_DIR] [--sort f1]` lists them; `keeneye runs compare A B` diffs two."))
app.add_typer(runs_app, name="runs")


@runs_app.command("list")
def runs_list(
    output_dir: Path = typer.Argument(Path("runs"), help="Folder holding the run folders (a config's output_dir)."),
    sort: str = typer.Option("date", "--sort", "-s", help="date, name, f1, ap, cv, threshold or time (metrics: best first)."),
    reverse: bool = typer.Option(False, "--reverse", "-r", help="Reverse the order."),
) -> None:
    """A table of the runs in OUTPUT_DIR (default ./runs).

    Read from their bundles (no MLflow needed).
    """
    from keeneye.runs import SORT_KEYS, list_runs, runs_table

    frame = list_runs(output_dir, sort=sort, descending=None if not reverse else not SORT_KEYS.get(sort, ("", False))[1])
    if frame.empty:
        console.print(f"no runs in {output_dir}")
        return
    console.print(runs_table(frame, title=f"Runs in {output_dir} (sorted by {sort})"))


@runs_app.command("compare")
def runs_compare(
    a: str = typer.Argument(..., help="A run folder, or a run name under --output-dir."),
    b: str = typer.Argument(..., help="The run to compare it with (changes are b - a)."),
    output_dir: Path = typer.Option(Path("runs"), "--output-dir", "-d", help="Where run names are looked up."),
) -> None:
    """The config keys and the metrics that differ between two runs."""
    from keeneye.runs import compare_runs

    comparison = compare_runs(a, b, output_dir)
    for table in comparison.tables():
        console.print(table)


def main() -> None:  # pragma: no cover - console entry for `python -m keeneye`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
