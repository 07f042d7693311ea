"""The progress display of the command line and of notebooks: a rich progress bar over the
optimization steps (rich draws it in a terminal and in Jupyter alike). Tasks only call the
Progress protocol (tasks/runtime.py); this is one implementation of it."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RichProgress:
    """A rich progress bar over optimization steps, showing the live loss and metrics."""

    def __init__(self, console: Console) -> None:
        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = None

    def start(self, label: str, total_steps: int) -> None:
        if self.task is None:
            self.bar.start()
        else:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(label, total=total_steps, status="")

    def step(self, report) -> None:
        parts = [f"loss {report.loss.mean():+.3f}"] if report.loss.numel() else []  # none: a count of tasks done
        parts += [f"{name} {values.mean():.3f}" for name, values in report.metrics.items()]
        self.bar.update(self.task, completed=report.step, status="  ".join(parts))

    def finish(self) -> None:
        pass

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()
