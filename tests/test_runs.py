"""Runs a user can trust: resuming, settings fingerprints, unique item names, per-item
failures, file permissions, non-finite losses, the inversion cache key, and kill -9."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from digin_cli.cli import app
from digin_cli.engine import GuidedDDIM, NonFiniteLoss, OptimConfig, SamplerConfig, initial_latents
from digin_cli.errors import DiginError
from digin_cli.inversion import InversionConfig
from digin_cli.io import FILE_MODE
from digin_cli.objectives import ObjectiveOutput
from digin_cli.tasks.folder_runs import WorkItem, item_names
from digin_cli.tasks.real_images import inversion_key
from digin_cli.tasks.runtime import finite_losses
from run_records import read_run

runner = CliRunner()
FAST = ["--ddim-steps", "4", "--steps", "2", "--loss-steps", "2", "--cutouts", "2", "--device", "cpu", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def disagree(out: Path, *extra: str) -> list[str]:
    return ["disagree", "--model", "tiny", "-f", "tiny:f", "-g", "tiny:g", "--class", "circle", "--out", str(out), *FAST, *extra]


def uvce(inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["uvce", str(inputs), "--target", "circle", "--source-class", "bar", "--model", "tiny", "--classifier",
            "tiny:f", "--out", str(out), *FAST, *extra]  # fmt: skip


def scenes(folder: Path, names: list[str]) -> None:
    from digin_cli.world.scenes import render, sample_scene

    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        array, _ = render(sample_scene(np.random.default_rng(k), shape="bar"))
        Image.fromarray(array).save(folder / name)


def mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}


# -- resuming and fingerprints -----------------------------------------------------------


def test_disagree_resumes_and_adds_seeds(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, disagree(out, "-n", "2")).exit_code == 0
    before = mtimes(out)
    result = runner.invoke(app, disagree(out, "-n", "3"))
    assert result.exit_code == 0, result.output
    after = mtimes(out)
    assert {name: after[name] for name in before} == before, "the finished seeds are not redone"
    new = ["circle_seed2_init.png", "circle_seed2_optimized.png", "circle_seed2_plot.png", "circle_seed2_sheet.png"]
    assert sorted(set(after) - set(before)) == new
    header, items = read_run(out)
    assert [item["input"]["seed"] for item in items] == [0, 1, 2] and {k: header["items"][k] for k in ("done", "failed")} == {"done": 3, "failed": 0}


def test_a_rerun_with_other_settings_stops_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, disagree(out, "-n", "2")).exit_code == 0
    record = (out / "circle_seed0.json").read_bytes()
    changed = runner.invoke(app, disagree(out, "-n", "2", "--steps", "3", "--guidance", "2"))
    assert changed.exit_code == 1
    assert changed.stderr.strip().splitlines() == [
        f"Error: --out {out} holds a run with other settings (optim.steps: 2 -> 3; sampler.guidance_scale: 3.0 -> 2.0); "
        "give another --out, or --overwrite to start again"
    ]
    assert (out / "circle_seed0.json").read_bytes() == record, "nothing is touched"
    again = runner.invoke(app, disagree(out, "-n", "1", "--steps", "3", "--overwrite"))
    assert again.exit_code == 0, again.output
    header, items = read_run(out)
    assert header["config"]["optim"]["steps"] == 3 and [item["item"] for item in items] == ["circle_seed0"]
    assert not (out / "circle_seed1.json").exists() and not (out / "circle_seed1_sheet.png").exists(), "the old run is gone"
    assert len(json.loads((out / "circle_seed0.json").read_text())["history"]) == 4  # 3 steps + the start


def test_outputs_get_the_users_permissions(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, disagree(out)).exit_code == 0
    assert FILE_MODE == 0o666 & ~_umask()
    for path in [*out.glob("*.png"), *out.glob("*.json"), out / "summary.jsonl"]:
        assert path.stat().st_mode & 0o777 == FILE_MODE, path.name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- folder runs ----------------------------------------------------------------------------


def test_item_names_are_unique_for_any_two_inputs(tmp_path):
    names = ["a.png", "a.jpg", "IMG 1.png", "img-1.png", "b.png", "sub/b.png"]
    items = [WorkItem(tmp_path / name, None, []) for name in names]
    got = item_names(items)
    assert len(set(got)) == len(got) == 6
    assert got[0] == "a-png" and got[1] == "a-jpg" and got[4].startswith("b-png-") and got[5].startswith("b-png-")
    assert item_names([WorkItem(tmp_path / "x.png", None, [])]) == ["x"]


def test_images_with_one_stem_both_get_done(tmp_path):
    folder, out = tmp_path / "images", tmp_path / "out"
    scenes(folder, ["a.png"])
    Image.open(folder / "a.png").convert("RGB").save(folder / "a.jpg")
    result = runner.invoke(app, uvce(folder, out))
    assert result.exit_code == 0, result.output
    _, items = read_run(out)
    assert [item["item"] for item in items] == ["a-jpg_circle", "a-png_circle"]
    assert [Path(item["input"]["file"]).name for item in items] == ["a.jpg", "a.png"]


def test_a_csv_row_naming_a_missing_file_fails_alone_and_is_retried(tmp_path):
    folder, out = tmp_path / "images", tmp_path / "out"
    scenes(folder, ["a.png"])
    csv = tmp_path / "items.csv"
    csv.write_text("a.png,bar\nmissing.png,bar\n")
    args = uvce(folder, out, "--csv", str(csv))
    first = runner.invoke(app, args)
    assert first.exit_code == 1
    lines = first.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: 1 of 2 images failed (missing.png:") and "unexpected" not in lines[0]
    _, items = read_run(out)
    assert [item["status"] for item in items] == ["ok", "failed"] and "does not exist" in items[1]["error"]
    scenes(folder, ["missing.png"])
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    _, items = read_run(out)
    assert [item["status"] for item in items] == ["ok", "ok"]


@pytest.mark.parametrize("command", ["disagree", "uvce"])
def test_a_full_disk_is_one_line_naming_the_file_and_a_rerun_finishes(tiny_folder, tmp_path, monkeypatch, command):
    folder, out = tmp_path / "images", tmp_path / "out"
    if command == "uvce":
        scenes(folder, ["a.png", "b.png"])
        args, done, stopped = uvce(folder, out), "a_circle", "b_circle"
    else:
        args, done, stopped = disagree(out, "-n", "2"), "circle_seed0", "circle_seed1"
    faulted: list[Path] = []
    replace = os.replace

    def full_disk(src, dst, *rest, **options):
        """The disk fills up at the second item's first image."""
        if not faulted and Path(dst).name.startswith(stopped) and Path(dst).suffix == ".png":
            faulted.append(Path(dst))
            raise OSError(errno.ENOSPC, "No space left on device")
        return replace(src, dst, *rest, **options)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", full_disk)
        result = runner.invoke(app, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and faulted, result.output
    assert lines[0] == (f"Error: no space left on device writing {faulted[0]}; free some space and rerun the same "
                        "command: the finished items are kept and the run goes on with the others")  # fmt: skip
    assert "Traceback" not in result.output
    # The finished item stays; the stopped one has neither its image nor a record (not even a failure).
    assert (out / f"{done}.json").is_file() and not (out / f"{stopped}.json").exists()
    assert not faulted[0].exists() and not list(out.glob(".*.part"))
    kept = (out / f"{done}.json").stat().st_mtime_ns
    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    header, _ = read_run(out)
    assert {k: header["items"][k] for k in ("done", "failed")} == {"done": 2, "failed": 0} and faulted[0].is_file()
    assert (out / f"{done}.json").stat().st_mtime_ns == kept, "the finished item is not redone"


# -- values and failures ---------------------------------------------------------------------


def test_a_non_finite_loss_stops_the_run_in_one_line(tiny_components):
    engine = GuidedDDIM(tiny_components)
    reports = []

    def objective(inputs):
        loss = inputs.views.mean(dim=(1, 2, 3, 4))  # (B,)
        if not torch.is_grad_enabled():  # a plain report: finite at the start, then NaN for item 1
            reports.append(len(reports))
            if len(reports) > 1:
                loss = torch.stack([loss[0], torch.tensor(float("nan"))])
        return ObjectiveOutput(loss=loss)

    z_T = initial_latents(tiny_components, [0, 1])
    prompt, null = engine.encode_text(["a circle"] * 2), engine.encode_text([""] * 2)
    with pytest.raises(NonFiniteLoss) as raised:
        engine.optimize(objective, z_T, prompt, null, SamplerConfig(num_steps=3), OptimConfig(steps=3, loss_steps=1, num_cutouts=1))
    assert raised.value.step == 1 and raised.value.items == [1]
    with pytest.raises(DiginError, match=r"the loss is not finite at optimization step 1 .*use --dtype bf16 or fp32"):
        with finite_losses():
            raise raised.value


def test_the_inversion_cache_key_follows_the_weights_and_the_dtype(tiny_folder, tmp_path):
    from digin_cli.models import load_diffusion

    copy = tmp_path / "sd"
    shutil.copytree(tiny_folder, copy)
    same = load_diffusion(str(copy)).identity
    assert same == load_diffusion(str(copy)).identity
    assert same != load_diffusion(str(tiny_folder)).identity, "two folders are two models, however they were typed"
    weights = next((copy / "unet").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # re-saved weights
    assert load_diffusion(str(copy)).identity != same
    image, sampler, config = torch.rand(1, 3, 64, 64), SamplerConfig(4), InversionConfig()
    keys = {inversion_key(image, same, dtype, "a bar", sampler, config) for dtype in ("torch.float32", "torch.bfloat16")}
    assert len(keys) == 2


# -- kill -9 ------------------------------------------------------------------------------------


def _start(args: list[str], cache: Path, torchrun: int = 0) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "digin_cli"] if not torchrun else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(torchrun), "--module", "digin_cli"]  # fmt: skip
    return subprocess.Popen([*launcher, *args], env={**ENV, "DIGIN_CACHE": str(cache)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip


def _kill_when(process: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL the process (and its children) as soon as `ready()` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended before the kill point: {process.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "the kill point was never reached"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _check_complete(out: Path, count: int) -> None:
    header, items = read_run(out)
    assert [item["status"] for item in items] == ["ok"] * count and header["items"]["done"] == count
    for item in items:
        for name in item["files"].values():
            with Image.open(out / name) as png:
                png.load()  # every file an ok record names is whole


@pytest.mark.parametrize("point", ["inversion", "optimization", "writing"])
def test_kill_9_leaves_a_folder_that_a_rerun_completes(tmp_path, point):
    folder, out, cache = tmp_path / "images", tmp_path / "out", tmp_path / "cache"
    scenes(folder, ["a.png", "b.png", "c.png"])
    args = uvce(folder, out, "--batch-size", "2")
    inversions = cache / "inversions"
    ready = {
        # The first image's inversion is under way: the model is loaded, nothing is cached yet.
        "inversion": lambda: (out / "run.json").is_file(),
        # Two images are inverted and their batch is being optimized.
        "optimization": lambda: inversions.is_dir() and len(list(inversions.glob("*.pt"))) >= 2,
        # The first batch's files are being written.
        "writing": lambda: any(out.glob("*_circle_original.png")),
    }[point]
    _kill_when(_start(args, cache), ready)
    assert not any(p.suffix == ".json" and p.stem.endswith("_circle") and json.loads(p.read_text())["status"] == "ok"
                   and not all((out / f).is_file() for f in json.loads(p.read_text())["files"].values())
                   for p in out.glob("*.json")), "no record names a file that is missing"  # fmt: skip
    rerun = subprocess.run([sys.executable, "-m", "digin_cli", *args], env={**ENV, "DIGIN_CACHE": str(cache)},
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    _check_complete(out, 3)


def test_kill_9_of_a_two_process_run_and_its_rerun(tmp_path):
    folder, out, cache = tmp_path / "images", tmp_path / "out", tmp_path / "cache"
    scenes(folder, ["a.png", "b.png", "c.png", "d.png"])
    args = uvce(folder, out)
    _kill_when(_start(args, cache, torchrun=2), lambda: any(out.glob("*_circle.json")))
    rerun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--module", "digin_cli",
                            *args], env={**ENV, "DIGIN_CACHE": str(cache)}, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    _check_complete(out, 4)


def test_seed_runs_spread_over_two_processes(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--module", "digin_cli",
                           *disagree(out, "-n", "3")], env=ENV, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    header, items = read_run(out)
    assert [item["input"]["seed"] for item in items] == [0, 1, 2] and header["items"]["done"] == 3
    # Each seed was optimized once, by one process, alone in its batch (process 0: seeds 0 and 2).
    assert [item["batch_size"] for item in items] == [1, 1, 1]


# -- model families digin does not sample ----------------------------------------------------


@pytest.mark.parametrize(
    ("class_name", "what"),
    [
        ("StableDiffusionXLImg2ImgPipeline", "is an SDXL image-to-image / refiner pipeline"),
        ("StableDiffusion3Pipeline", "is a Stable Diffusion 3 pipeline (an MMDiT transformer, no UNet)"),
        ("FluxPipeline", "is a FLUX pipeline"),
        ("StableDiffusionInpaintPipeline", "is an inpainting pipeline"),
        ("DDPMPipeline", "is an unconditional pipeline"),
    ],
)
def test_unsupported_families_are_one_line(tiny_folder, tmp_path, class_name, what):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": class_name}))
    result = runner.invoke(app, ["disagree", "--model", str(folder), "-f", "tiny:f", "-g", "tiny:g", "--class", "circle",
                                 "--out", str(tmp_path / "out"), *FAST])  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith(f"Error: --model {folder} {what}") and "digin supports SD 1.x, SD 2.x, SDXL, SD-Turbo and SDXL-Turbo" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_unet_with_other_input_channels_is_refused(tiny_folder, tmp_path):
    folder = tmp_path / "inpaint"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_config({**config, "in_channels": 9}).save_pretrained(folder / "unet")
    result = runner.invoke(app, disagree(tmp_path / "out", "--model", str(folder)))
    assert result.exit_code == 1 and "with a 9-channel UNet for 4-channel latents (an inpainting" in result.stderr
