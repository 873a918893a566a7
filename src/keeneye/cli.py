"""Command line: a thin layer that parses arguments, calls the Python API and prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.text import Text

from keeneye.errors import KeeneyeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Binary image classification for visual inspection.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect and validate config files.")
app.add_typer(config_app, name="config")
err_console = Console(stderr=True)
console = Console()

SET_HELP = "Override a config value: section.key=value (repeatable); the value is parsed as JSON when it can be."


def _fail(exc: KeeneyeError) -> None:
    err_console.print(Text.assemble(("error:", "bold red"), " ", str(exc)), highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of config.json (for editors)."""
    from keeneye.config import config_json_schema

    typer.echo(json.dumps(config_json_schema(), indent=2))


@config_app.command("check")
def config_check(
    config: Path = typer.Argument(..., help="Path to config.json."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Validate a config file and print it resolved (defaults filled, paths absolute)."""
    from keeneye.config import load_config

    try:
        cfg = load_config(config, set_ or [])
    except KeeneyeError as exc:
        _fail(exc)
    typer.echo(cfg.model_dump_json(indent=2))


@app.command()
def train(
    config: Path = typer.Option(..., "--config", "-c", help="Path to config.json."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Train on <data_folder_path>/training, evaluate on testing; writes runs/<name>/ (the model bundle)."""
    from keeneye import api
    from keeneye.config import load_config

    try:
        cfg = load_config(config, set_ or [])
        api.train(cfg, console=console)
    except KeeneyeError as exc:
        _fail(exc)


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="Model bundle folder (runs/<name>)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder to evaluate on: DIR/testing/<class>/ or DIR/<class>/ (default: the run's testing split)."),
    engine: str = typer.Option("auto", "--engine", help="Inference engine."),
) -> None:
    """F1, precision, recall, confusion matrix and plots for a trained bundle."""
    from keeneye import api

    try:
        api.evaluate(run_dir, data=data, engine=engine, console=console)
    except KeeneyeError as exc:
        _fail(exc)


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="Model bundle folder (runs/<name>)."),
    inputs: List[str] = typer.Argument(..., help="Image files, folders (recursive) or glob patterns."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write results to this .csv or .json (default: CSV on stdout)."),
    engine: str = typer.Option("auto", "--engine", help="Inference engine."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
) -> None:
    """Predict images; failures are listed with their reason. Exit 1 only when nothing could be predicted."""
    from keeneye import api

    try:
        frame = api.predict(run_dir, inputs, output=output, engine=engine, batch_size=batch_size, console=err_console)
    except KeeneyeError as exc:
        _fail(exc)
    if output is None:
        typer.echo(frame.to_csv(index=False), nl=False)
    if frame["error"].notna().all():
        err_console.print("[bold red]error:[/] no image could be predicted.")
        raise typer.Exit(1)


@app.command()
def demo(
    folder: Path = typer.Option(Path("demo_run"), "--folder", help="Where to write the demo data, config and runs."),
    seed: int = typer.Option(0, "--seed"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Generate a small seeded inspection dataset, then train and evaluate on it."""
    from keeneye import api
    from keeneye.demo import make_demo_dataset, write_demo_config

    folder = folder.resolve()
    data = make_demo_dataset(folder / "data", seed=seed)
    config_path = write_demo_config(folder, data, folder / "runs")
    console.print(f"demo data in {data}, config {config_path}")
    try:
        result = api.train(config_path, overrides=set_ or [], console=console)
        evaluation = api.evaluate(result.run_dir, console=console)
    except KeeneyeError as exc:
        _fail(exc)
    f1 = evaluation.metrics["at_threshold"]["f1"]
    console.print(f"[bold green]demo done:[/] test F1 {f1:.4f}; model bundle {result.run_dir}")


def main() -> None:  # pragma: no cover - console entry for `python -m keeneye`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
