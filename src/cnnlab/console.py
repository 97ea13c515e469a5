"""Terminal output: the Keras-style summary table and training progress."""
from __future__ import annotations

import io
import shutil
import sys
import time

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


def _shape(shape) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def render(renderable, width=88) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False, color_system=None,
            legacy_windows=False).print(renderable)
    return "\n".join(line.rstrip() for line in buf.getvalue().strip("\n").splitlines())


def terminal_width() -> int:
    """The terminal's columns ($COLUMNS first); 400 when output goes to a file or pipe, so
    tables there keep one line per row."""
    return shutil.get_terminal_size((400, 24)).columns


def table(columns, rows, title=None, justify=None, width=None) -> str:
    """A plain text table (used by summary, evaluate and datasets), as wide as its content
    up to the terminal's width; longer cells wrap between words inside their column."""
    t = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify=(justify or {}).get(i, "left" if i == 0 else "right"),
                     overflow="fold")
    for row in rows:
        t.add_row(*[str(c) for c in row])
    return render(t, width=width or terminal_width())


def summary_table(summary: dict, width: int = 88) -> str:
    """Keras 3's model.summary() layout, with the same counts."""
    t = Table(title=f'Model: "{summary["name"]}"', box=box.HEAVY_HEAD, title_justify="left")
    t.add_column("Layer (type)", min_width=30)
    t.add_column("Output Shape", min_width=22)
    t.add_column("Param #", justify="right", min_width=11)
    for row in summary["layers"]:
        t.add_row(f'{row["name"]} ({row["type"]})', _shape(row["output_shape"]),
                  f'{row["params"]:,}')
    total, tr, non = (summary["total_params"], summary["trainable_params"],
                      summary["non_trainable_params"])
    lines = [render(t, width),
             f" Total params: {total:,} ({_bytes(total * 4)})",
             f" Trainable params: {tr:,} ({_bytes(tr * 4)})",
             f" Non-trainable params: {non:,} ({_bytes(non * 4)})"]
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n:.2f} B"
        n /= 1024
    return f"{n:.2f} GB"


SHOWN = ("loss", "accuracy", "val_loss", "val_accuracy")


def clock(seconds: float) -> str:
    """12 -> '0:12', 3725 -> '1:02:05'."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def duration(seconds: float) -> str:
    """Roughly, for people: 40 -> '40 s', 440 -> '7 min', 5400 -> '1 h 30 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


def format_metrics(logs: dict) -> str:
    return " - ".join(f"{k}: {v:.4f}" for k, v in logs.items() if v is not None)


class EpochProgress:
    """One progress bar per epoch (steps, ETA, running loss/accuracy), then one line
    per epoch, like Keras' fit(verbose=1). verbose=0 prints nothing, 2 one line per epoch."""

    def __init__(self, epochs: int, steps: int, verbose: int = 1, file=None):
        self.epochs, self.steps, self.verbose = epochs, steps, verbose
        self.file = file or sys.stdout
        self.console = Console(file=self.file, highlight=False)
        self._progress = None
        self.spent, self.timed = 0.0, 0   # epochs timed by this process, for the run ETA

    def start_epoch(self, epoch: int, start_step: int = 0):
        self.t0 = time.perf_counter()
        self.epoch = epoch
        if self.verbose != 1:
            return
        print(f"Epoch {epoch + 1}/{self.epochs}", file=self.file, flush=True)
        if self.verbose == 1 and self.console.is_terminal:
            self._progress = Progress(MofNCompleteColumn(), BarColumn(bar_width=30),
                                      TimeRemainingColumn(), TextColumn("{task.fields[logs]}"),
                                      console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task("", total=self.steps, completed=start_step,
                                                 logs="")

    @property
    def live(self) -> bool:
        """Whether a progress bar is showing (then the loop collects metrics for it)."""
        return self._progress is not None

    def update(self, step: int, logs: dict):
        if self._progress is not None:
            shown = {k: v for k, v in logs.items() if k in SHOWN}
            self._progress.update(self._task, completed=step, logs=format_metrics(shown))

    def end_epoch(self, logs: dict):
        self.close()
        if self.verbose:
            secs = time.perf_counter() - self.t0
            shown = {k: v for k, v in logs.items() if k in SHOWN}
            head = f"{self.steps}/{self.steps}" if self.verbose == 1 else \
                f"Epoch {self.epoch + 1}/{self.epochs}"
            self.spent, self.timed = self.spent + secs, self.timed + 1
            left = self.epochs - self.epoch - 1
            eta = f" - run ETA {clock(self.spent / self.timed * left)}" if left > 0 else ""
            print(f"{head} - {secs:.1f}s - {format_metrics(shown)}{eta}", file=self.file,
                  flush=True)

    def note(self, text: str):
        """A line above the progress bar (or on its own)."""
        if not self.verbose:
            return
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.file, flush=True)

    def close(self):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
