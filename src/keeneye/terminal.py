"""What keeneye prints while it works: quiet libraries, warnings in keeneye's format, progress.

* `quiet_runtime` (called by the CLI before TensorFlow is imported): TensorFlow's C++ log lines
  (`I0000 ... port.cc`, absl's `WARNING: All log messages before absl::InitializeLog()`), its
  Python loggers and other libraries' Python warnings are hidden unless `--verbose`; keeneye's own
  warnings are printed as `warning: ...` lines.
* `progress_bar`: one bar per long phase on a terminal; when the output is a file or a pipe (CI,
  `nohup`, `> train.log`), a plain line at the start, at least every `PLAIN_INTERVAL_S` seconds,
  and at the end, instead of minutes of silence.
* `keras_progress`: a Keras callback that advances such a bar batch by batch while `fit` runs.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

#: Longest silence, in seconds, between two progress lines when the output is not a terminal.
PLAIN_INTERVAL_S = 10.0
_PACKAGE_DIR = str(Path(__file__).resolve().parent)


#: TensorFlow's and absl's C++ log lines ("I0000 00:00:1796.7  8968 port.cc:153] ...") and absl's
#: notice about them. TF_CPP_MIN_LOG_LEVEL hides TensorFlow's own, but not those that libraries
#: loaded by `import tensorflow` write through absl before TensorFlow's logging is set up.
_NATIVE_LOG_LINE = re.compile(
    r"^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\]|WARNING: All log messages before absl::InitializeLog\(\)"
    r"|To enable the following instructions:)"
)


def plural(count: int, word: str, many: str | None = None) -> str:
    """'1 cross-split pair', '2 cross-split pairs'."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def _is_keeneye_warning(category: type, filename: str) -> bool:
    return category.__module__.startswith("keeneye") or str(Path(filename).resolve()).startswith(_PACKAGE_DIR)


@contextlib.contextmanager
def native_logs_filtered():
    """Capture what native code writes to file descriptor 2, then pass on all but C++ log lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not _NATIVE_LOG_LINE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _FilteredLoader(importlib.abc.Loader):
    """Runs another loader's `exec_module` inside `native_logs_filtered`."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        with native_logs_filtered():
            self.loader.exec_module(module)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """On the first `import tensorflow` (whoever asks: keras, an engine, ...), filter its native log lines."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once; find the real spec with the other finders
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _FilteredLoader(spec.loader)
        return spec


def filter_tensorflow_import_logs() -> None:
    """Drop the native log lines that `import tensorflow` writes (if TensorFlow is not loaded yet)."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


def quiet_runtime(verbose: bool, console: Console) -> None:
    """Silence TensorFlow / absl / library noise unless `verbose`; warnings become `warning: ...` lines.

    Must run before TensorFlow is imported (its C++ logging reads TF_CPP_MIN_LOG_LEVEL once, at load).
    An explicit TF_CPP_MIN_LOG_LEVEL in the environment is respected.
    """
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        filter_tensorflow_import_logs()
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
        try:
            import absl.logging  # small, no TensorFlow: Keras logs through it ("WARNING:absl:...")

            absl.logging.set_verbosity(absl.logging.ERROR)
        except ImportError:  # pragma: no cover - absl comes with TensorFlow
            pass

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if not verbose and not _is_keeneye_warning(category, filename):
            return
        origin = "" if _is_keeneye_warning(category, filename) else f" ({category.__name__} from {Path(filename).name}:{lineno})"
        console.print(f"[yellow]warning:[/] {escape(str(message))}{escape(origin)}", highlight=False, soft_wrap=True)

    warnings.showwarning = show


class PlainProgress:
    """The part of rich's `Progress` that keeneye uses, printed as plain lines (for logs and pipes).

    A line when a task starts, then one at least every `interval` seconds while it runs (from a
    timer thread, so a slow batch still gets its line), and one when it ends.
    """

    def __init__(self, console: Console, interval: float = PLAIN_INTERVAL_S) -> None:
        self.console = console
        self.interval = interval
        self.tasks: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PlainProgress":
        self._thread = threading.Thread(target=self._tick, name="keeneye-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for task_id in list(self.tasks):
            self._finish(task_id)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_: Any) -> int:
        with self._lock:
            task_id = len(self.tasks)
            self.tasks[task_id] = {"description": description, "total": total, "completed": completed,
                                   "started": time.monotonic(), "printed": time.monotonic(), "done": False}
        self._print(task_id)
        return task_id

    def advance(self, task_id: int, advance: float = 1) -> None:
        with self._lock:
            self.tasks[task_id]["completed"] += advance

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **_: Any) -> None:
        with self._lock:
            task = self.tasks[task_id]
            if total is not None:
                task["total"] = total
            if completed is not None:
                task["completed"] = completed
            if advance is not None:
                task["completed"] += advance
            if description is not None:
                task["description"] = description

    def reset(self, task_id: int, *, total: float | None = None, description: str | None = None, **_: Any) -> None:
        """rich's Progress.reset: the task counts again from 0 (under a new description), said at once in the log."""
        with self._lock:
            task = self.tasks[task_id]
            task.update(completed=0, total=total, started=time.monotonic())
            if description is not None:
                task["description"] = description
        self._print(task_id)

    def _line(self, task: dict) -> str:
        done, total = task["completed"], task["total"]
        elapsed = time.monotonic() - task["started"]
        amount = f"{done:.0f}/{total:.0f} ({100 * done / total:.0f}%)" if total else f"{done:.0f}"
        return f"{task['description']}: {amount}, {elapsed:.0f} s"

    def _print(self, task_id: int) -> None:
        with self._lock:
            task = self.tasks[task_id]
            task["printed"] = time.monotonic()
            line = self._line(task)
        self.console.print(escape(line), highlight=False, soft_wrap=True)

    def _finish(self, task_id: int) -> None:
        if not self.tasks[task_id]["done"]:
            self.tasks[task_id]["done"] = True
            self._print(task_id)

    def _tick(self) -> None:
        while not self._stop.wait(min(1.0, self.interval / 4)):
            now = time.monotonic()
            due = [k for k, t in list(self.tasks.items()) if not t["done"] and now - t["printed"] >= self.interval]
            for task_id in due:
                self._print(task_id)


def progress_bar(console: Console) -> Progress | PlainProgress:
    """A transient rich bar on a terminal; plain progress lines (at least every 10 s) otherwise."""
    if console.quiet:
        return Progress(console=console, disable=True)
    if not console.is_terminal:
        return PlainProgress(console)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    )


def keras_progress(progress: Progress | PlainProgress, task_id: int, label: str):
    """A Keras callback: advances `task_id` per training batch; the description names the epoch."""
    import keras

    class KerasProgress(keras.callbacks.Callback):
        def on_train_begin(self, logs=None) -> None:
            self.steps = int(self.params.get("steps") or 0)
            self.epoch = 0
            self.epochs = int(self.params.get("epochs") or 0)
            if self.steps and self.epochs:
                progress.update(task_id, total=self.steps * self.epochs)

        def on_epoch_begin(self, epoch: int, logs=None) -> None:
            self.epoch = epoch
            progress.update(task_id, completed=epoch * self.steps, description=f"{label}, epoch {epoch + 1}/{self.epochs}")

        def on_train_batch_end(self, batch: int, logs=None) -> None:
            # `batch` is the last step done: with steps_per_execution > 1 Keras calls this once per execution
            if self.steps:
                progress.update(task_id, completed=self.epoch * self.steps + batch + 1)
            else:
                progress.advance(task_id, 1)

        def on_train_end(self, logs=None) -> None:  # what follows (scoring the validation images) is part of the phase
            progress.update(task_id, description=f"{label}: epochs done, scoring images")

    return KerasProgress()


class Task:
    """One running progress task: `advance(n)` from any thread, or `keras_callback()` for `fit`."""

    def __init__(self, progress: Progress | PlainProgress, task_id: int, label: str) -> None:
        self.progress = progress
        self.task_id = task_id
        self.label = label

    def advance(self, n: float = 1) -> None:
        self.progress.advance(self.task_id, n)

    def keras_callback(self, label: str | None = None):
        """Progress per training batch; `label` names what trains (default: the task's label)."""
        return keras_progress(self.progress, self.task_id, label or self.label)

    def step(self, description: str, total: float | None) -> None:
        """Show another step of the same phase on this line, counted from 0 (e.g. a pass over the images before the
        epochs), so a long pre-pass never sits at "0/10 epochs"; the Keras callback takes the line back at `fit`."""
        self.progress.reset(self.task_id, total=total, description=description)


class Reporter:
    """Everything keeneye tells the user while it works goes through one of these: a method per event.

    It wraps a rich Console (a terminal, a log file, or `Console(quiet=True)` in tests); phases and
    API functions take one reporter instead of printing themselves. `print` passes rich markup
    through for the few callers that build their own lines (e.g. the export's ONNX line).
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()

    @classmethod
    def of(cls, target: "Reporter | Console | None", stderr: bool = False) -> "Reporter":
        """`target` itself if it is a Reporter; a Reporter around a Console; a new one (stdout or stderr) for None."""
        if isinstance(target, Reporter):
            return target
        return cls(target if target is not None else Console(stderr=stderr))

    @property
    def quiet(self) -> bool:
        return self.console.quiet

    # --- general events ----------------------------------------------------------------------

    def print(self, *objects: Any, **kwargs: Any) -> None:
        """rich's print: markup, tables."""
        self.console.print(*objects, **kwargs)

    def line(self, text: str) -> None:
        """A plain line (no markup, no highlighting; paths and names kept as they are)."""
        self.console.print(escape(text), highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        self.console.print(f"[yellow]note:[/] {escape(text)}", highlight=False, soft_wrap=True)

    def warning(self, text: str) -> None:
        self.console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)

    def table(self, table: Any) -> None:
        self.console.print(table)

    def not_predicted(self, paths_errors: list[tuple[str, str]]) -> None:
        """Inputs that got no prediction, each with its reason."""
        for path, error in paths_errors:
            self.console.print(f"[yellow]not predicted:[/] {escape(str(path))}: {escape(str(error))}", highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def task(self, description: str, total: float | None):
        """A progress bar (terminal) or progress lines (log) for one long step; yields a :class:`Task`."""
        with progress_bar(self.console) as progress:
            yield Task(progress, progress.add_task(description, total=total), description)

    # --- training events -----------------------------------------------------------------------

    def classes(self, negative: str, positive: str) -> None:
        self.console.print(f"classes: [bold]{escape(positive)}[/] = positive (1), [bold]{escape(negative)}[/] = negative (0)")

    def embedding_cache(self, damaged: list, n_cached: int, n_computed: int, seconds: float, folder: Path) -> None:
        """Damaged shards by name (skipped, removed, recomputed), then how much the cache saved."""
        for shard, reason in damaged:
            self.warning(f"embedding cache shard {shard} was damaged ({reason}): skipped and removed; its features were recomputed.")
        verb = "reused" if n_cached else "empty, filled"
        self.console.print(f"embedding cache {verb}: {n_cached} reused, {n_computed} computed in {seconds:.1f} s ({folder})")

    def data_counts(self, counts: Any) -> None:
        """The table found = skipped + dropped + used, per split and class, with a total row."""
        from rich.table import Table

        table = Table(title="Data", show_edge=False)
        for column in counts.columns:
            table.add_column(column, justify="left" if column in ("split", "label") else "right")
        for row in counts.itertuples(index=False):
            table.add_row(*[str(v) for v in row])
        total = counts[["found", "skipped", "dropped", "used"]].sum()
        table.add_row("total", "", *[str(int(total[c])) for c in ("found", "skipped", "dropped", "used")], style="bold")
        self.console.print(table)

    def dropped_files(self, paths_reasons: list[tuple[str, str]], when: str = "") -> None:
        """Files that could not be read: a count (listed in dropped_files.csv); with `when`, each one too."""
        if not paths_reasons:
            return
        if not when:
            self.console.print(f"[yellow]warning:[/] {plural(len(paths_reasons), 'unreadable image')} dropped (listed in dropped_files.csv).")
            return
        self.console.print(f"[yellow]warning:[/] {plural(len(paths_reasons), 'image')} failed to decode {when} (dropped_files.csv):")
        for path, reason in paths_reasons:
            self.console.print(f"  {escape(str(path))}: {escape(str(reason))}", highlight=False, soft_wrap=True)

    def run_state(self, folder: Path, resume_with: Path | None) -> None:
        """Where the resumable state lives (a new run), or that an interrupted run continues."""
        if resume_with is None:
            self.line(f"resuming the interrupted run in {folder}")
        else:
            self.line(f"run state: {folder} (if interrupted: keeneye train --resume {resume_with})")

    def head_candidates(self, results: list[tuple], reason: str) -> None:
        """Cross-validated head candidates (name, AP, chosen[, note]), `->` on the chosen one, and why."""
        for name, ap, chosen, *note in results:
            self.console.print(f"  {'->' if chosen else '  '} {name:28s} out-of-fold AP {ap:.4f}"
                               + (f", {note[0]}" if note else ""), highlight=False)
        chosen_name = next(name for name, _, chosen, *_ in results if chosen)
        self.console.print(f"head chosen: {chosen_name} ({escape(reason)})", highlight=False)

    def head_trained(self, epochs: int, best_epoch: int, monitor: str, resumed: int) -> None:
        self.console.print(f"head trained: {plural(epochs, 'epoch')}, best epoch {best_epoch} ({monitor})"
                           + (f", resumed after epoch {resumed}" if resumed else ""))

    def threshold(self, threshold: float, method: str, validation_f1: float | None, out_of_fold: bool, warning: str | None) -> None:
        if warning:
            self.console.print(f"[yellow]warning:[/] {escape(warning)}")
        self.console.print(f"threshold: {threshold:.4f} ({method})")
        where = " (out-of-fold, over training + validation)" if out_of_fold else ""
        self.console.print(f"validation F1 after head training: {'n/a' if validation_f1 is None else f'{validation_f1:.4f}'}{where}")

    def stale_staging(self, folders: list[Path]) -> None:
        for stale in folders:
            self.line(f"removed {stale}: staging folder of a publish that was killed")

    def trained(self, metrics_table: str, bundle: Path, cv_estimate: str | None) -> None:
        """The end of train: the cross-validated estimate (if any), the test metrics, where the bundle is."""
        if cv_estimate is not None:
            self.line(f"cross-validated estimate (before the test score below): {cv_estimate}")
        self.console.print(metrics_table)
        self.console.print(f"model bundle: [bold]{escape(str(bundle))}[/]")
