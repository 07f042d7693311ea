"""The run folder's records, one format for every subcommand.

A run folder holds:

- ``run.json``, the run header: command, command line, digin and library versions, the
  full resolved config, its fingerprint, device, dtype, start time, seconds, counts;
- one record per item, ``<item>.json``, written last and atomically, so its presence with
  status "ok" marks the item finished: input (file or seed), class names, figures before
  and after, best step, history, output files, status, error, seconds;
- ``summary.jsonl``, one line per item (its record without the history), rebuilt from the
  records on disk after every batch, under a lock, so it is complete after any number of
  resumes and of processes writing into the folder; a class scan (tasks/scan.py) adds one
  line per class after them (format ``digin-class/1``, no ``item`` key), its ranking;
- a class scan with a screen: ``screen.json``, the screening figures of each class, written
  as each class is screened, so a rerun screens nothing twice;
- while several processes share a folder run, ``.digin-shard-<index>-of-<count>.done``,
  one per process that has written its share; the main process removes them once all are
  there (and any left by a launch that was stopped, when it opens the folder).

The fingerprint covers the settings that shape results. A rerun into a folder whose run
had other settings stops with one line naming them, unless it is told to overwrite;
settings that only change which items or how fast (the seeds, the input folder, the batch
size, torch.compile) are left out, so a rerun with more seeds or images adds to the run.
JSON Schemas of both records ship in ``digin_cli/schemas``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from digin_cli.errors import DiginError
from digin_cli.io import read_json, remove_file, write_bytes, write_json, write_jsonl
from digin_cli.tasks.runtime import RuntimeOptions, Shard, process_state, started_at, versions

RUN_FORMAT = "digin-run/1"
ITEM_FORMAT = "digin-item/1"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.jsonl"
SCREEN_FILE = "screen.json"  # a class scan's screening figures (tasks/scan.py)
SCREEN_FORMAT = "digin-screen/1"
CLASS_FORMAT = "digin-class/1"  # a summary line of a class scan's ranking
LOCK_FILE = ".digin.lock"
SHARD_DONE = ".digin-shard-{index}-of-{count}.done"  # a process of a launch has written its shard's records
WAIT_SECONDS = 0.5  # how often the main process looks for the other shards' markers
# Config keys that choose which items run or how fast, not what an item's result is.
# Judges read the results and change none of them (tasks/judges.py).
# A class scan's class list and its screen (tasks/scan.py) choose which (class, seed) items run.
NOT_FINGERPRINTED = ("seeds", "inputs", "batch_size", "compile", "judges", "classes", "scan")


# Optimization settings that choose how much memory a step holds, not its result.
NOT_FINGERPRINTED_OPTIM = ("views_per_pass",)
# Optimization settings added after runs were first recorded, with the value that does what
# those runs did: at that value they are left out, so an earlier run folder still resumes.
LATER_OPTIM_DEFAULTS = {"augment": "cutouts", "keep": "best-loss", "claim_margin": 0.05, "noise_reg": 0.0}


def fingerprint_settings(config: dict[str, Any]) -> dict[str, Any]:
    settings = {key: value for key, value in config.items() if key not in NOT_FINGERPRINTED}
    if isinstance(settings.get("optim"), dict):
        settings["optim"] = {k: v for k, v in settings["optim"].items()
                             if k not in NOT_FINGERPRINTED_OPTIM and LATER_OPTIM_DEFAULTS.get(k, object()) != v}  # fmt: skip
    return settings


def fingerprint(config: dict[str, Any]) -> str:
    text = json.dumps(fingerprint_settings(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys, in their order: {"optim": {"steps": 2}} -> {"optim.steps": 2}."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(flatten(inner, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The fingerprinted settings that differ, as 'key: old -> new'."""
    a, b = flatten(fingerprint_settings(old)), flatten(fingerprint_settings(new))
    return [f"{key}: {a.get(key, '(none)')} -> {b.get(key, '(none)')}" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


class RunFolder:
    """One run's folder: its header, its item records and its summary."""

    def __init__(self, out: Path, header: dict[str, Any]) -> None:
        self.out = out
        self.header = header
        self._started = time.perf_counter()
        # What completes a finished record before it is written (tasks/judges.py: its claim
        # and its judges' views): called as annotator(record, out, config); records judged
        # otherwise (annotator.stale) are annotated again when a rerun finds them finished.
        self.annotator = None
        # What a run adds to its header from its records whenever the summary is rebuilt
        # (tasks/scan.py: a class scan's "scan" and "ranking"): called as summarizer(records).
        self.summarizer = None

    @property
    def fingerprint(self) -> str:
        return self.header["fingerprint"]

    @classmethod
    def open(cls, out: Path, command: str, config: dict[str, Any], device: Any, dtype: str, overwrite: bool = False,
             command_line: list[str] | None = None, is_main_process: bool = True) -> RunFolder:  # fmt: skip
        """Check the folder's earlier run against `config` (stop on a difference unless
        `overwrite`, which removes the earlier run's files first), then write the header.
        With several processes only the main one removes anything."""
        header = {
            "format": RUN_FORMAT,
            "command": command,
            "command_line": command_line,
            "versions": versions(),
            "device": str(device),
            "dtype": dtype,
            "config": config,
            "fingerprint": fingerprint(config),
            "started": started_at(),
            "seconds": 0.0,
            "items": {"done": 0, "failed": 0},
        }
        folder = cls(out, header)
        with folder.lock():
            earlier = read_json(out / RUN_FILE)
            same = earlier is not None and earlier.get("fingerprint") == header["fingerprint"]
            if earlier is not None and not same and not overwrite:
                changed = differences(earlier.get("config", {}), config) or [f"command: {earlier.get('command')} -> {command}"]
                raise DiginError(
                    f"--out {out} holds a run with other settings ({'; '.join(changed[:4])}"
                    f"{'; ...' if len(changed) > 4 else ''}); give another --out, or --overwrite to start again"
                )
            if is_main_process:
                folder.remove_shard_markers()  # an earlier launch's; the other processes open after this one
            if overwrite and earlier is not None and is_main_process:
                folder.clear()  # start again
            elif same:
                header["started"] = earlier.get("started", header["started"])  # a resumed run keeps its start
            write_json(header, out / RUN_FILE)
        return folder

    @contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock on the folder, shared by every process writing into it."""
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / LOCK_FILE, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
            yield

    def clear(self) -> None:
        """Remove what digin wrote here: every record, the files it names, the summary."""
        for record_path in self.out.glob("*.json"):
            record = read_json(record_path)
            if not isinstance(record, dict) or record.get("format") not in (ITEM_FORMAT, RUN_FORMAT, SCREEN_FORMAT):
                continue
            for name in (record.get("files") or {}).values():
                remove_file(self.out / name)
            remove_file(record_path)
        remove_file(self.out / SUMMARY_FILE)
        for stale in self.out.glob(".*.part"):
            remove_file(stale)
        self.remove_shard_markers()

    # -- the processes of one launch ------------------------------------------------

    def shard_marker(self, shard: Shard) -> Path:
        return self.out / SHARD_DONE.format(index=shard.index, count=shard.count)

    def mark_shard_done(self, shard: Shard) -> None:
        """Say that this process has written every record of its shard."""
        write_bytes(b"", self.shard_marker(shard))

    def wait_for_shards(self, count: int) -> None:
        """Wait until every process of this launch has marked its shard done, then remove
        the markers. Files, not a torch.distributed barrier: a process whose items all
        failed early would time out in a barrier while the others work; a process that
        dies makes the launcher stop this one."""
        markers = [self.shard_marker(Shard(index, count)) for index in range(count)]
        while not all(marker.exists() for marker in markers):
            time.sleep(WAIT_SECONDS)
        self.remove_shard_markers()

    def remove_shard_markers(self) -> None:
        for marker in self.out.glob(SHARD_DONE.format(index="*", count="*")):
            remove_file(marker)

    # -- items --------------------------------------------------------------------

    def record_path(self, item: str) -> Path:
        return self.out / f"{item}.json"

    def finished(self, item: str) -> dict[str, Any] | None:
        """The item's record when it finished with this run's settings, else None (to be run)."""
        record = read_json(self.record_path(item))
        if not (isinstance(record, dict) and record.get("status") == "ok" and record.get("fingerprint") == self.fingerprint):
            return None
        if self.annotator is not None and self.annotator.stale(record):
            try:
                record = self.annotator(record, self.out, self.header["config"])
            except FileNotFoundError:
                return None  # its images are gone: make them again
            write_json(record, self.record_path(item))
        return record

    def write_item(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write a finished item's record (last, atomically: it marks the item done), after
        the plot of its optimization, `<item>_plot.png`, next to its other files."""
        from digin_cli.report.plots import has_history, plot_png

        record = {"format": ITEM_FORMAT, "fingerprint": self.fingerprint, **record}
        if record.get("status") == "ok" and has_history(record):
            name = f"{record['item']}_plot.png"
            write_bytes(plot_png(record["history"], record.get("best_step"), title=record["item"]), self.out / name)
            record["files"] = {**record["files"], "plot": name}
        if record.get("status") == "ok" and self.annotator is not None:
            record = self.annotator(record, self.out, self.header["config"])
        write_json(record, self.record_path(record["item"]))
        return record

    def write_failure(self, item: str, input_: dict[str, Any], error: str) -> dict[str, Any]:
        """A failed item's record: listed in the summary, retried by the next run."""
        record = item_record(self.header["command"], item, input_, status="failed", error=error)
        return self.write_item(record)

    # -- a class scan's screening figures ---------------------------------------------------

    def screened(self) -> dict[str, dict[str, Any]]:
        """The screening entries (by class index, as a string) stored for this run's settings."""
        stored = read_json(self.out / SCREEN_FILE)
        if not (isinstance(stored, dict) and stored.get("format") == SCREEN_FORMAT and stored.get("fingerprint") == self.fingerprint):
            return {}
        return dict(stored.get("classes") or {})

    def write_screened(self, key: str, entry: dict[str, Any]) -> None:
        """Add one class's screening entry to screen.json (read, merged and written under the lock)."""
        with self.lock():
            classes = {**self.screened(), key: entry}
            write_json({"format": SCREEN_FORMAT, "fingerprint": self.fingerprint, "classes": classes}, self.out / SCREEN_FILE)

    def rebuild_summary(self, items: list[str]) -> list[dict[str, Any]]:
        """summary.jsonl and the page index.html from the records of `items` (in this
        order) that exist on disk."""
        from digin_cli.report.pages import write_run_page

        with self.lock():
            records = [read_json(self.record_path(item)) for item in items]
            records = [r for r in records if isinstance(r, dict) and r.get("format") == ITEM_FORMAT]
            lines = [{k: v for k, v in r.items() if k != "history"} for r in records]
            header = read_json(self.out / RUN_FILE) or self.header
            if self.summarizer is not None:
                header.update(self.summarizer(records))
                lines += [{"format": CLASS_FORMAT, **entry} for entry in header.get("ranking") or []]
            write_jsonl(lines, self.out / SUMMARY_FILE)
            header["items"] = {
                "done": sum(r.get("status") == "ok" for r in records),
                "failed": sum(r.get("status") == "failed" for r in records),
                # Findings: what the run claims, and of those what every judge confirms.
                "claimed": sum(r.get("status") == "ok" and r.get("claimed") is True for r in records),
                "confirmed": sum(r.get("status") == "ok" and r.get("confirmed") is True for r in records),
            }
            header["complete"] = len(records) == len(items)
            header["seconds"] = round(header.get("seconds", 0.0) + time.perf_counter() - self._started, 3)
            self._started = time.perf_counter()
            write_json(header, self.out / RUN_FILE)
            self.header = header
            write_run_page(self.out, header, records, complete=header["complete"])
        return records


def open_run_folder(out: Path, command: str, config: dict[str, Any], device: Any, runtime: RuntimeOptions) -> RunFolder:
    """The run folder of this process; with several processes the main one opens it first
    (and alone removes an earlier run with --overwrite), the others after it."""
    state = process_state()
    with state.main_process_first():
        return RunFolder.open(out, command, config, device, runtime.dtype, overwrite=runtime.overwrite,
                              command_line=runtime.command_line, is_main_process=state.is_main_process)  # fmt: skip


def run_result(folder: RunFolder, records: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """What a task returns: the run header, every item's record (in input order) and the time."""
    return {
        "command": folder.header["command"],
        "out": str(folder.out),
        "header": folder.header,
        "items": records,
        "failed": [r for r in records if r.get("status") == "failed"],
        "seconds": round(time.perf_counter() - started, 3),
    }


def item_record(
    command: str,
    item: str,
    input_: dict[str, Any],
    classes: dict[str, str] | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    best_step: int | dict[str, int] | None = None,
    history: list | dict | None = None,
    files: dict[str, str] | None = None,
    seconds: float = 0.0,
    status: str = "ok",
    error: str | None = None,
    **details: Any,
) -> dict[str, Any]:
    """One item's record, the same keys for every command (see the module docstring);
    `details` are the command's own fields."""
    return {
        "command": command,
        "item": item,
        "input": input_,
        "status": status,
        "error": error,
        "classes": classes or {},
        "before": before or {},
        "after": after or {},
        "best_step": best_step,
        "files": files or {},
        "seconds": round(seconds, 3),
        **details,
        "history": history or [],
    }


def rounded(figures: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in figures.items()}
