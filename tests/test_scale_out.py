"""Scale-out: runs spread over several processes (accelerate launch / torchrun).

The processes are started by torchrun, which ships with torch and sets RANK, WORLD_SIZE
and LOCAL_RANK exactly as `accelerate launch` does; digin reads the layout from
accelerate's PartialState.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from digin_cli.tasks.folder_runs import WorkItem
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


def test_two_processes_share_one_folder_run(tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    scenes(images, 3)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--module", "digin_cli",
        "uvce", str(images), "--target", "bar", "--model", "tiny", "--classifier", "tiny:f", "--out", str(out), *FAST,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    records = sorted(p.name for p in out.glob("scene*_bar.json"))
    assert records == ["scene0_bar.json", "scene1_bar.json", "scene2_bar.json"]
    _, summary = read_run(out)
    # One entry per item, in the folder's order, every item done once by one of the two processes.
    assert [entry["input"]["file"].rsplit("/", 1)[-1] for entry in summary] == ["scene0.png", "scene1.png", "scene2.png"]
    assert all(entry["status"] == "ok" for entry in summary)
