"""Scale-out: runs spread over several processes (accelerate launch / torchrun).

The processes are started by torchrun, which ships with torch and sets RANK, WORLD_SIZE
and LOCAL_RANK exactly as `accelerate launch` does; digin reads the layout from
accelerate's PartialState.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from digin_cli.errors import DiginError
from digin_cli.io import ImageReadError
from digin_cli.tasks.folder_runs import WorkItem, run_items
from digin_cli.tasks.records import RunFolder, item_record
from digin_cli.tasks.runtime import Shard
from run_records import read_run

FAST = ["--ddim-steps", "4", "--steps", "1", "--loss-steps", "1", "--cutouts", "2", "--device", "cpu", "--quiet"]


def scenes(folder, count: int) -> None:
    from digin_cli.world.scenes import render, sample_scene

    folder.mkdir()
    for k in range(count):
        array, _ = render(sample_scene(np.random.default_rng(k), shape="circle"))
        Image.fromarray(array).save(folder / f"scene{k}.png")


def test_shards_split_items_without_overlap(tmp_path):
    items = [WorkItem(tmp_path / f"{k}.png", None, []) for k in range(7)]
    taken = [Shard(index, 3).take(items) for index in range(3)]
    assert sorted(str(i.path) for part in taken for i in part) == sorted(str(i.path) for i in items)
    assert [len(part) for part in taken] == [3, 2, 2]


def test_a_plain_process_is_the_only_shard():
    assert Shard.current() == Shard(0, 1)


def shard_run(out, shard: Shard) -> list[dict]:
    """One process's share of a folder run of 4 images, 1.png unreadable (no model: the
    records as the engine would write them)."""
    items = [WorkItem(out.parent / f"{k}.png", "bar", ["circle"]) for k in range(4)]
    folder = RunFolder.open(out, "uvce", {"setting": 1}, "cpu", "fp32", is_main_process=shard.index == 0)

    def prepare(batch):
        return [ImageReadError(f"{i.path.name} is broken") if i.path.name == "1.png" else i.path.name for i in batch]

    def run_batch(tasks):
        return [item_record("uvce", task.name, {"file": str(task.item.path)}) for task in tasks]

    return run_items(items, folder, lambda item: item.targets, prepare, run_batch, 1, shard)


def test_the_main_process_waits_for_every_shard_and_reports_all_failures(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".digin-shard-1-of-2.done").write_bytes(b"")  # an earlier launch's: it must not count
    raised = []
    main = threading.Thread(target=lambda: raised.append(pytest.raises(DiginError, shard_run, out, Shard(0, 2))), daemon=True)
    main.start()
    time.sleep(1.5)
    assert main.is_alive(), "the main process waits for process 1"
    records = shard_run(out, Shard(1, 2))  # its own failure does not end it
    assert [r["status"] for r in records] == ["ok", "failed", "ok", "ok"]
    main.join(timeout=60)
    assert not main.is_alive() and len(raised) == 1
    assert str(raised[0].value).startswith("1 of 4 images failed (1.png: 1.png is broken); the others are in")


def two_process_uvce(images, out) -> subprocess.CompletedProcess:
    """`digin uvce` over a folder, in two CPU processes started by torchrun."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--module", "digin_cli",
        "uvce", str(images), "--target", "bar", "--model", "tiny", "--classifier", "tiny:f", "--out", str(out), *FAST,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_two_processes_share_one_folder_run(tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    scenes(images, 3)
    done = two_process_uvce(images, out)
    assert done.returncode == 0, done.stdout + done.stderr
    records = sorted(p.name for p in out.glob("scene*_bar.json"))
    assert records == ["scene0_bar.json", "scene1_bar.json", "scene2_bar.json"]
    _, summary = read_run(out)
    # One entry per item, in the folder's order, every item done once by one of the two processes.
    assert [entry["input"]["file"].rsplit("/", 1)[-1] for entry in summary] == ["scene0.png", "scene1.png", "scene2.png"]
    assert all(entry["status"] == "ok" for entry in summary)


def test_a_failed_item_of_one_process_stops_no_other(tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    scenes(images, 6)
    # Process 1's shard (scenes 1, 3, 5) has the corrupt image, so it is done a whole item
    # before process 0: it must not end the launch while process 0 works on scene4.
    (images / "scene1.png").write_bytes(b"not a png")
    done = two_process_uvce(images, out)
    assert done.returncode == 1, done.stdout + done.stderr
    _, summary = read_run(out)
    statuses = {entry["input"]["file"].rsplit("/", 1)[-1]: entry["status"] for entry in summary}
    assert statuses == {f"scene{k}.png": "failed" if k == 1 else "ok" for k in range(6)}, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    # Reported once, by the main process, for the whole run.
    assert len(errors) == 1 and errors[0].startswith("Error: 1 of 6 images failed (scene1.png: "), done.stderr
    assert not list(out.glob(".digin-shard-*")), "the main process removes the markers once all are there"
