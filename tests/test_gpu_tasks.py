"""What a GPU run needs of the task layer, checked on a CPU: each process on its own GPU,
and a batch that runs out of memory failing alone (a folder run) or in one line (a seed run)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from digin_cli.cli import app
from digin_cli.engine import GuidedDDIM
from digin_cli.errors import DiginError
from digin_cli.io import read_jsonl
from digin_cli.tasks import runtime
from digin_cli.tasks.folder_runs import WorkItem, run_items
from digin_cli.tasks.records import RunFolder, item_record
from digin_cli.tasks.runtime import Shard, resolve_device
from run_records import read_record, read_run

runner = CliRunner()


# -- the device of each process ---------------------------------------------------------------


@pytest.fixture()
def gpus(monkeypatch):
    """A machine with CUDA GPUs (2 unless changed) and the process layout of a launch; the
    devices set as current are listed."""
    machine = SimpleNamespace(count=2, current=[], state=SimpleNamespace(local_process_index=1, process_index=1, num_processes=2))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: machine.count)
    monkeypatch.setattr(torch.cuda, "set_device", machine.current.append)
    monkeypatch.setattr(runtime, "process_state", lambda: machine.state)
    return machine


def test_cuda_and_auto_are_this_processs_gpu(gpus):
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    # The current device follows, so tensors made without a device land next to the models.
    assert gpus.current == [torch.device("cuda", 1)] * 2


def test_one_gpu_for_several_processes_is_refused(gpus):
    with pytest.raises(DiginError, match=r"^--device cuda:0 would put all 2 processes on one GPU; use --device cuda or auto"):
        resolve_device("cuda:0")
    assert gpus.current == []


def test_a_single_process_takes_the_gpu_it_names(gpus):
    gpus.state = SimpleNamespace(local_process_index=0, process_index=0, num_processes=1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert gpus.current == [torch.device("cuda", 0), torch.device("cuda", 1)]


def test_processes_share_the_gpus_there_are(gpus):
    gpus.count = 1
    assert resolve_device("cuda") == torch.device("cuda", 0)


# -- a batch that runs out of memory ----------------------------------------------------------


class FakeRun:
    """prepare and run_batch of a folder run whose batches of `oom` run out of memory (CUDA's
    error) or, with `host`, out of host memory; the tasks each batch got are listed."""

    def __init__(self, oom: set[str] = frozenset(), host: bool = False, prepare_oom: bool = False) -> None:
        self.oom, self.host, self.prepare_oom = oom, host, prepare_oom
        self.batches: list[list[str]] = []

    def prepare(self, items: list[WorkItem]) -> list:
        if self.prepare_oom:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [item.path.name for item in items]

    def run_batch(self, tasks) -> list[dict]:
        self.batches.append([task.prepared for task in tasks])
        if self.oom & set(self.batches[-1]):
            raise MemoryError() if self.host else torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [item_record("uvce", task.name, {"file": str(task.item.path)}) for task in tasks]


def folder_run(tmp_path: Path, fake: FakeRun, count: int = 6, batch_size: int = 2) -> None:
    items = [WorkItem(tmp_path / f"{k}.png", "bar", ["circle"]) for k in range(count)]
    folder = RunFolder.open(tmp_path / "out", "uvce", {"setting": 1}, "cpu", "fp32")
    run_items(items, folder, lambda item: item.targets, fake.prepare, fake.run_batch, batch_size, Shard(0, 1))


@pytest.mark.parametrize("host", [False, True], ids=["cuda", "host"])
def test_a_batch_out_of_memory_fails_alone_and_is_retried(tmp_path, monkeypatch, host):
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    first = FakeRun(oom={"2.png"}, host=host)
    with pytest.raises(DiginError) as raised:
        folder_run(tmp_path, first)
    message = "out of memory with --batch-size 2 (2 counterfactuals in one batch); use a smaller --batch-size or --dtype bf16"
    assert str(raised.value).startswith(f"2 of 6 images failed (2.png: {message}; 3.png: {message}); the others are in")
    assert first.batches == [["0.png", "1.png"], ["2.png", "3.png"], ["4.png", "5.png"]], "the run went on after the OOM"
    assert emptied == [True], "the failed batch's GPU memory went back before the next batch"
    summary = read_jsonl(tmp_path / "out" / "summary.jsonl")
    assert [entry["status"] for entry in summary] == ["ok", "ok", "failed", "failed", "ok", "ok"]
    assert read_record(tmp_path / "out", "2_circle")["error"] == message
    rerun = FakeRun()
    folder_run(tmp_path, rerun)
    assert rerun.batches == [["2.png", "3.png"]], "the rerun does the failed items only"
    summary = read_jsonl(tmp_path / "out" / "summary.jsonl")
    assert [entry["status"] for entry in summary] == ["ok"] * 6


def test_inversions_out_of_memory_fail_their_images(tmp_path):
    with pytest.raises(DiginError) as raised:
        folder_run(tmp_path, FakeRun(prepare_oom=True), count=1, batch_size=1)
    assert str(raised.value) == (
        "0.png: out of memory with --batch-size 1 (1 image inverted together); use a smaller --batch-size or --dtype bf16"
    )
    assert read_record(tmp_path / "out", "0_circle")["status"] == "failed"


def test_a_seed_batch_out_of_memory_stops_in_one_line(tmp_path, monkeypatch, tiny_folder, tiny_classifiers):
    optimize = GuidedDDIM.optimize
    calls = []

    def second_runs_out(self, *args, **kwargs):
        calls.append(len(calls))
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return optimize(self, *args, **kwargs)

    monkeypatch.setattr(GuidedDDIM, "optimize", second_runs_out)
    out = tmp_path / "out"
    result = runner.invoke(app, ["disagree", "--model", "tiny", "-f", "tiny:f", "-g", "tiny:g", "--class", "circle",
                                 "-n", "2", "--batch-size", "1", "--out", str(out), "--ddim-steps", "2", "--steps", "1",
                                 "--loss-steps", "1", "--cutouts", "1", "--device", "cpu", "--quiet"])  # fmt: skip
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "Error: out of memory with --batch-size 1 (1 image in one batch); use a smaller --batch-size or --dtype bf16"
    ), lines
    _, summary = read_run(out)
    assert [(entry["input"]["seed"], entry["status"]) for entry in summary] == [(0, "ok")], "the first batch's record stays"
