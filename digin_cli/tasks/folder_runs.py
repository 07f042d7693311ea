"""Folder runs (uvce, neuron-cf): the work items of a run (one file, a folder, a folder with a
CSV), this process's shard of them, and the resumable loop that batches them and keeps
summary.jsonl current."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digin_cli.errors import DiginError, NoSpaceError
from digin_cli.io import ImageReadError, list_images
from digin_cli.tasks.records import RunFolder
from digin_cli.tasks.runtime import MEMORY_ERRORS, Shard, counted, out_of_memory, release_memory, slug


@dataclass
class WorkItem:
    path: Path
    source: str | None
    targets: list[str]
    caption: str | None = None  # from the CSV's caption column; overrides --caption for this image


CSV_COLUMNS = ("file", "class", "target", "caption")

# What makes one image unusable: it cannot be read, or its options do not fit it (no class
# word in the caption, no mask for it). It fails alone; the others of its batch go on.
ImageError = (ImageReadError, DiginError)


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


def item_names(items: list[WorkItem]) -> list[str]:
    """A name for each image, unique in the run, for its files and records: the slug of its
    file name stem; where two images share it (a.jpg and a.png, 'IMG 1' and 'img-1'), the
    slug of the whole file name, and where that is shared too, a hash of the path as well."""
    stems = [slug(item.path.stem) for item in items]
    names = [stem if stems.count(stem) == 1 else slug(item.path.name) for stem, item in zip(stems, items)]
    return [
        name if names.count(name) == 1 else f"{name}-{hashlib.sha1(str(item.path).encode()).hexdigest()[:6]}"
        for name, item in zip(names, items)
    ]


@dataclass
class Task:
    """One unit of engine work: a label of an item (a target class for uvce, the neuron for
    neuron-cf) on its prepared image. Tasks of several images share an engine batch."""

    item: WorkItem
    prepared: Any  # the task's PreparedImage (see real_images)
    label: str
    name: str  # the item's record name, also the stem of its output files


def run_items(
    items: list[WorkItem],
    folder: RunFolder,
    labels: Callable[[WorkItem], list[str]],
    prepare: Callable[[list[WorkItem]], list[Any]],
    run_batch: Callable[[list[Task]], list[dict[str, Any]]],
    batch_size: int = 1,
    shard: Shard | None = None,
) -> list[dict[str, Any]]:
    """The resumable loop of a real-image run, over this process's shard of `items`.

    An item's label is one record, `<image name>_<label slug>`; it is skipped when its
    record is finished with this run's settings. prepare(items) loads, inverts and masks
    images (their inversions in one batch) and returns per item its prepared image or the
    error that makes it unusable; the pending labels of prepared images queue up as Tasks, and
    run_batch(tasks) runs up to `batch_size` of them in one engine batch, writes their
    files and returns one record per task, which is written last. A bad image (unreadable,
    missing, no mask) fails alone: its labels get failure records and the run goes on;
    the next run retries them. summary.jsonl is rebuilt from the records on disk after
    every batch and every failure. A batch that runs out of memory fails its items alike.
    Returns every label's record in input order; raises DiginError at the end when any item
    failed. With several processes each finishes its shard and returns; the main one waits
    for all of them and raises for a failed item of any shard, so that no process's failure
    makes the launcher stop the others mid-batch."""
    return FolderRun(items, folder, labels, prepare, run_batch, batch_size, shard or Shard.current()).run()


class FolderRun:
    """The state of one run_items call: the record names, the failures, the queued tasks."""

    def __init__(self, items, folder: RunFolder, labels, prepare, run_batch, batch_size: int, shard: Shard) -> None:
        self.folder, self.labels, self.prepare, self.run_batch = folder, labels, prepare, run_batch
        self.batch_size, self.shard = batch_size, shard
        self.image_names = dict(zip((str(item.path) for item in items), item_names(items)))
        self.records = [self.record_name(item, label) for item in items for label in labels(item)]
        self.mine = shard.take(items)
        self.total = len(items)
        self.queue: list[Task] = []

    def record_name(self, item: WorkItem, label: str) -> str:
        return f"{self.image_names[str(item.path)]}_{slug(label)}"

    def run(self) -> list[dict[str, Any]]:
        self._work()
        records = self.folder.rebuild_summary(self.records)
        if self.shard.count > 1:
            # Every process finishes its shard; the main one then reports the whole run.
            self.folder.mark_shard_done(self.shard)
            if self.shard.index != 0:
                return records
            self.folder.wait_for_shards(self.shard.count)
            records = self.folder.rebuild_summary(self.records)
        self._raise_failures(records)
        return records

    def _work(self) -> None:
        """Every image of this shard: skip its finished labels; prepare the rest in groups whose
        tasks fill the next batch (their inversions run together), and run full batches as they
        fill up; then the last images and the last, partial batch."""
        group: list[tuple[WorkItem, list[str]]] = []
        for item in self.mine:
            pending = [label for label in self.labels(item) if self.folder.finished(self.record_name(item, label)) is None]
            if not pending:
                continue
            group.append((item, pending))
            if len(self.queue) + sum(len(labels) for _, labels in group) >= self.batch_size:
                self._prepare(group)
                group = []
            while len(self.queue) >= self.batch_size:
                self._flush()
        if group:
            self._prepare(group)
        while self.queue:
            self._flush()

    def _raise_failures(self, records: list[dict[str, Any]]) -> None:
        """The failed images among `records` (the run's records on disk), reported once, at the end."""
        failures = {}  # file -> its first error
        for record in records:
            if record.get("status") == "failed":
                failures.setdefault(record["input"]["file"], f"{Path(record['input']['file']).name}: {record['error']}")
        if not failures:
            return
        failed = list(failures.values())
        if self.total == 1:
            raise DiginError(failed[0])
        listed = "; ".join(failed[:3]) + ("; ..." if len(failed) > 3 else "")
        raise DiginError(
            f"{len(failed)} of {self.total} images failed ({listed}); the others are in "
            f"{self.folder.out}, see summary.jsonl; rerun the same command to retry only the failed ones"
        )

    def _prepare(self, group: list[tuple[WorkItem, list[str]]]) -> None:
        """Prepare a group of images together; one that cannot be used fails alone, all of
        them when their inversions together run out of memory."""
        try:
            prepared = self.prepare([item for item, _ in group])
        except MEMORY_ERRORS:
            prepared = None
        if prepared is None:
            release_memory()  # outside the `except`: the inversions' tensors are freed by now
            error = DiginError(out_of_memory(self.batch_size, f"{counted(len(group), 'image')} inverted together"))
            prepared = [error] * len(group)
        failed = False
        for (item, pending), image in zip(group, prepared):
            if isinstance(image, ImageError):
                self._fail(item, pending, str(image))
                failed = True
            else:
                self.queue.extend(Task(item, image, label, self.record_name(item, label)) for label in pending)
        if failed:
            self.folder.rebuild_summary(self.records)  # their failure records; a prepared image changes nothing on disk

    def _flush(self) -> None:
        batch = self.queue[: self.batch_size]
        del self.queue[: self.batch_size]
        error: str | None = None
        try:
            records = self.run_batch(batch)
        except NoSpaceError:
            raise  # no fault of the batch's items: the run stops, a rerun redoes them
        except DiginError as raised:
            error = str(raised)
        except MEMORY_ERRORS:
            error = out_of_memory(self.batch_size, f"{counted(len(batch), 'counterfactual')} in one batch")
        if error is None:
            for record in records:  # last: a record marks its item finished
                self.folder.write_item(record)
        else:
            release_memory()  # outside the `except`: the batch's tensors are freed by now
            for path in dict.fromkeys(task.item.path for task in batch):
                tasks = [task for task in batch if task.item.path == path]
                self._fail(tasks[0].item, [task.label for task in tasks], error)
        self.folder.rebuild_summary(self.records)

    def _fail(self, item: WorkItem, labels: list[str], error: str) -> None:
        for label in labels:
            self.folder.write_failure(self.record_name(item, label), {"file": str(item.path)}, error)
