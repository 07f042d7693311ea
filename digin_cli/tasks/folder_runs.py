"""Folder runs (uvce, neuron-cf): the work items of a run (one file, a folder, a folder with a
CSV), this process's shard of them, and the resumable loop that batches them and keeps
summary.jsonl current."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digin_cli.errors import DiginError
from digin_cli.io import ImageReadError, list_images, merge_summary_parts, write_jsonl
from digin_cli.tasks.runtime import slug


@dataclass
class WorkItem:
    path: Path
    source: str | None
    targets: list[str]
    caption: str | None = None  # from the CSV's caption column; overrides --caption for this image


CSV_COLUMNS = ("file", "class", "target", "caption")


def read_csv(path: Path, folder: Path, default_targets: list[str], need_target: bool = True) -> list[WorkItem]:
    """Rows `file,class[,target]`. A first row with a cell 'file' is a header and may name the
    columns in any order: file, class, target, caption (the caption for that image's inversion)."""
    if not path.is_file():
        raise DiginError(f"--csv {path} does not exist; give a file with rows file,class[,target]")
    columns = ["file", "class", "target"]
    items = []
    with open(path, newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            row = [cell.strip() for cell in row]
            if not row or not row[0] or row[0].startswith("#"):
                continue
            if number == 1 and "file" in (cell.lower() for cell in row):
                columns = [cell.lower() for cell in row]
                unknown = sorted(set(columns) - set(CSV_COLUMNS))
                if unknown or "class" not in columns:
                    problem = f"unknown column(s) {', '.join(unknown)}" if unknown else "no class column"
                    raise DiginError(f"--csv {path} header: {problem}; columns are {', '.join(CSV_COLUMNS)} (file and class needed)")
                continue
            cells = dict(zip(columns, row))
            if not cells.get("class"):
                raise DiginError(f"--csv {path} line {number}: expected {','.join(columns)}, got {','.join(row)}")
            targets = [cells["target"]] if cells.get("target") else default_targets
            if need_target and not targets:
                raise DiginError(f"--csv {path} line {number}: no target; add a target column or give --target")
            items.append(WorkItem(folder / cells["file"], cells["class"], targets, cells.get("caption") or None))
    return items


def work_items(
    inputs: Path, csv_file: Path | None, source_class: str | None, targets: list[str], need_target: bool = True
) -> list[WorkItem]:
    """The images of a run: one file, a folder, or a folder with a CSV of classes."""
    if not inputs.exists():
        raise DiginError(f"{inputs} does not exist; give an image file or a folder of images")
    if inputs.is_dir():
        if csv_file is not None:
            return read_csv(csv_file, inputs, targets, need_target)
        images = list_images(inputs)
        if not images:
            raise DiginError(f"no image files in {inputs}; supported: png, jpg, webp, bmp, tif, gif")
        return [WorkItem(p, source_class, targets) for p in images]
    return [WorkItem(inputs, source_class, targets)]


@dataclass
class Task:
    """One unit of engine work: a label of an item (a target class for uvce, the neuron for
    neuron-cf) on its prepared image. Tasks of several images share an engine batch."""

    item: WorkItem
    prepared: Any  # the task's PreparedImage (see real_images)
    label: str
    stem: str  # file name stem of the outputs


@dataclass(frozen=True)
class Shard:
    """This process's share of a folder run: items index, index + count, index + 2 count, ...

    `accelerate launch` (like torchrun) starts one process per GPU and tells each its RANK
    and the WORLD_SIZE; a plain run is the only shard. Shards write into the same output
    folder; summary.jsonl is merged from every shard's part (see merge_summary_parts)."""

    index: int = 0
    count: int = 1

    @classmethod
    def from_environment(cls) -> Shard:
        try:
            count, index = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        except ValueError:
            raise DiginError("RANK and WORLD_SIZE must be integers (they are set by accelerate launch / torchrun)") from None
        if count < 1 or not 0 <= index < count:
            raise DiginError(f"RANK {index} is not between 0 and WORLD_SIZE - 1 ({count - 1})")
        return cls(index, count)

    def take(self, items: list[WorkItem]) -> list[WorkItem]:
        return items[self.index :: self.count]


SUMMARY_PARTS = ".summary-parts"  # per-shard summaries of a multi-process run, merged into summary.jsonl


def run_items(
    items: list[WorkItem],
    out: Path,
    outputs: Callable[[WorkItem], dict[str, str]],
    prepare: Callable[[WorkItem], Any],
    run_batch: Callable[[list[Task]], list[dict[str, Any]]],
    batch_size: int = 1,
    shard: Shard | None = None,
) -> list[dict[str, Any]]:
    """The resumable loop of a real-image run, over this process's shard of `items`.

    outputs(item) -> {label: json file name}: an item's label is finished when its JSON
    exists (JSONs are written last, atomically), and is then skipped. prepare(item) loads,
    inverts and masks one image; the pending labels of prepared images queue up as Tasks,
    and run_batch(tasks) runs up to `batch_size` of them in one engine batch, writes their
    files and returns one summary entry per task. A bad file fails alone, in prepare; the
    run goes on. summary.jsonl is rewritten after every image and batch (with several
    shards: this shard's part, then the merge of all parts), in folder order.
    Raises DiginError at the end when any item of this shard failed."""
    return FolderRun(items, out, outputs, prepare, run_batch, batch_size, shard or Shard.from_environment()).run()


class FolderRun:
    """The state of one run_items call: the summary so far, the failures, the queued tasks."""

    def __init__(self, items, out: Path, outputs, prepare, run_batch, batch_size: int, shard: Shard) -> None:
        self.items, self.out, self.outputs = items, out, outputs
        self.prepare, self.run_batch, self.batch_size, self.shard = prepare, run_batch, batch_size, shard
        self.mine = shard.take(items)
        self.position = {str(item.path): k for k, item in enumerate(items)}
        self.summary: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.queue: list[Task] = []

    def run(self) -> list[dict[str, Any]]:
        self.out.mkdir(parents=True, exist_ok=True)
        # 1. Every image of this shard: skip its finished labels, prepare it for the rest,
        #    and run full batches as they fill up.
        for item in self.mine:
            self._queue(item)
            while len(self.queue) >= self.batch_size:
                self._flush()
            self._write_summary()
        # 2. The last, partial batch.
        while self.queue:
            self._flush()
        if not self.mine:
            self._write_summary()  # a shard with nothing to do still leaves its (empty) part
        # 3. Failures are reported once, at the end.
        if self.failures:
            if len(self.mine) == 1:
                raise DiginError(self.failures[0])
            raise DiginError(
                f"{len(self.failures)} of {len(self.mine)} images failed ({self.failures[0]}); the others are in {self.out}, "
                "see summary.jsonl; rerun the same command to retry only the missing ones"
            )
        return self.summary

    def _queue(self, item: WorkItem) -> None:
        names = self.outputs(item)
        pending = [label for label, name in names.items() if not (self.out / name).is_file()]
        for label, name in names.items():
            if label not in pending:
                self.summary.append({"file": str(item.path), "label": label, "json": name, "status": "done earlier"})
        if not pending:
            return
        try:
            prepared = self.prepare(item)
        except (ImageReadError, DiginError) as error:
            self._fail(item.path, error)
        else:
            self.queue.extend(Task(item, prepared, label, slug(item.path.stem)) for label in pending)

    def _flush(self) -> None:
        batch = self.queue[: self.batch_size]
        del self.queue[: self.batch_size]
        try:
            entries = self.run_batch(batch)
        except DiginError as error:
            for path in dict.fromkeys(task.item.path for task in batch):
                self._fail(path, error)
        else:
            self.summary.extend({"file": str(task.item.path), **entry} for task, entry in zip(batch, entries))
        self._write_summary()

    def _fail(self, path: Path, error: Exception) -> None:
        self.failures.append(f"{path.name}: {error}")
        self.summary.append({"file": str(path), "status": "failed", "error": str(error)})

    def _in_order(self, entry: dict[str, Any]) -> int:
        return self.position.get(entry["file"], len(self.items))

    def _write_summary(self) -> None:
        self.summary.sort(key=self._in_order)  # stable: an image's labels keep their order
        if self.shard.count == 1:
            write_jsonl(self.summary, self.out / "summary.jsonl")
            return
        parts = self.out / SUMMARY_PARTS
        write_jsonl(self.summary, parts / f"{self.shard.index}-of-{self.shard.count}.jsonl")
        merge_summary_parts(parts, self.out / "summary.jsonl", order=self._in_order)
