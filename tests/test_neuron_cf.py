"""`digin neuron-cf`: neuron counterfactuals on real images and the spurious-feature verdict."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from digin_cli.cli import app
from run_records import read_record, read_run
from digin_cli.tasks.neuron_cf import spurious_verdict
from digin_cli.masks import object_core

runner = CliRunner()
FAST = ["--ddim-steps", "4", "--steps", "2", "--loss-steps", "2", "--cutouts", "2", "--device", "cpu", "--quiet"]


def scene(path, seed=0, shape="triangle", background="grass"):
    from digin_cli.world.scenes import render, sample_scene

    array, _ = render(sample_scene(np.random.default_rng(seed), shape=shape, background=background))
    Image.fromarray(array).save(path)
    return path


def neuron_cf(*extra, out):
    return ["neuron-cf", *extra, "--model", "tiny", "--classifier", "tiny:f", "--out", str(out), *FAST]


def test_verdict_flags_a_sharp_drop_with_the_object_kept():
    def verdict(p0, p1, object_psnr):  # reconstruction 30 dB in the object core; 2x error = 27 dB
        return spurious_verdict(p0, p1, object_psnr, reconstruction_psnr_db=30.0, drop_threshold=0.3, object_error_ratio=2.0)

    flagged = verdict(0.9, 0.2, 28.0)
    assert flagged["flagged"] and flagged["confidence_drop"] == 0.7 and "spurious" in flagged["text"]
    small = verdict(0.9, 0.75, 28.0)
    assert not small["flagged"] and small["object_kept"] and "not flagged" in small["text"]
    object_changed = verdict(0.9, 0.1, 26.0)  # 10^0.4 = 2.5x the reconstruction's error
    assert not object_changed["flagged"] and not object_changed["object_kept"] and "inconclusive" in object_changed["text"]
    at_the_limit = verdict(0.9, 0.1, 30.0 - 10 * math.log10(2.0))
    assert at_the_limit["flagged"]
    rise = verdict(0.4, 0.6, 30.0)
    assert not rise["flagged"] and rise["confidence_drop"] < 0


def test_object_core_ignores_the_soft_rim():
    mask = torch.zeros(1, 8, 8)
    mask[0, 2:6, 2:6] = 1.0
    mask[0, 1, 2:6] = 0.6  # blurred rim
    core = object_core(mask)
    assert core.sum() == 16 and core[0, 1].sum() == 0
    assert object_core(torch.full((1, 4, 4), 0.6)).sum() == 16  # no full-strength pixel: the >= 0.5 part


def test_object_cells_cover_every_latent_cell_the_core_touches():
    from digin_cli.masks import latent_cells

    mask = torch.zeros(1, 64, 64)
    mask[0, 10:20, 30:33] = 1.0  # rows 10-19 -> cells 2-4; columns 30-32 -> cells 7-8
    cells = latent_cells(object_core(mask)[None], 16)  # (1, 1, 16, 16)
    assert cells.shape == (1, 1, 16, 16)
    assert torch.nonzero(cells[0, 0].sum(dim=1)).flatten().tolist() == [2, 3, 4]
    assert torch.nonzero(cells[0, 0].sum(dim=0)).flatten().tolist() == [7, 8]
    assert cells.sum() == 6


def test_neuron_cf_cli_writes_both_directions(tmp_path):
    out = tmp_path / "out"
    image = scene(tmp_path / "tri.png")
    result = runner.invoke(app, neuron_cf(str(image), "--neuron", "3", "--class", "triangle", out=out))
    assert result.exit_code == 0, result.output
    header, items = read_run(out)
    record = read_record(out, "tri_n3")
    assert record["command"] == "neuron-cf" and record["classes"] == {"class": "triangle"}
    for mode in ("maximized", "minimized"):
        assert {"activation", "p_class", "object_psnr_db", "background_psnr_db"} <= set(record["after"][mode])
        assert record["after"][mode]["activation"] == record["after"][mode]["activation"]  # not NaN
        assert 0 <= record["best_step"][mode] <= 2
    for mode in ("maximized", "minimized"):  # the kept iterate never has a worse loss than the start
        assert record["after"][mode]["loss"] <= record["start"][mode]["loss"] + 1e-6
    verdict = record["verdict"]
    assert verdict["flagged"] == (verdict["confidence_drop"] >= 0.3 and verdict["object_kept"])
    assert verdict["object_kept"] == (verdict["object_psnr_db"] >= verdict["reconstruction_object_psnr_db"] - 10 * math.log10(2))
    assert record["verdict"]["confidence_drop"] == round(record["before"]["p_class"] - record["after"]["minimized"]["p_class"], 6)
    for name in record["files"].values():
        with Image.open(out / name) as png:
            assert png.mode == "RGB"
    assert set(record["files"]) == {"original", "reconstruction", "mask", "object_mask", "sheet", "maximized", "minimized", "plot"}
    assert header["config"]["hold_object"] is True


def test_neuron_cf_from_other_class_only_maximizes(tmp_path):
    out = tmp_path / "out"
    image = scene(tmp_path / "circle.png", shape="circle", background="sand")
    args = neuron_cf(str(image), "--neuron", "3", "--class", "triangle", "--from-other-class", "--source-class", "circle",
                     "--no-hold-object", out=out)  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    header, _ = read_run(out)
    record = read_record(out, "circle_n3")
    assert set(record["after"]) == {"maximized"} and record["verdict"] is None
    assert record["caption"] == "an image of a circle" and record["classes"] == {"class": "triangle"}
    triggers = record["from_other_class"]
    assert triggers["triggers_class"] == (triggers["p_class_after"] >= 0.5 > triggers["p_class_before"])
    assert triggers["p_class_after"] == record["after"]["maximized"]["p_class"]
    assert header["config"]["hold_object"] is False


def test_neuron_cf_resumes_a_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    scene(folder / "a.png", seed=1)
    scene(folder / "b.png", seed=2)
    out = tmp_path / "out"
    args = neuron_cf(str(folder), "--neuron", "3", "--class", "triangle", "--direction-mode", "min", out=out)
    assert runner.invoke(app, args).exit_code == 0
    (out / "b_n3.json").unlink()  # b was interrupted before its record was written
    a_mtime = os.stat(out / "a_n3_minimized.png").st_mtime_ns
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert os.stat(out / "a_n3_minimized.png").st_mtime_ns == a_mtime
    assert (out / "b_n3.json").is_file()
    _, lines = read_run(out)
    # The summary keeps every item's figures, those done in the earlier run too.
    assert [line["status"] for line in lines] == ["ok", "ok"]
    assert [line["item"] for line in lines] == ["a_n3", "b_n3"]
    assert all("p_class" in line["after"]["minimized"] for line in lines)


def test_neuron_cf_bad_input_is_one_line(tmp_path):
    image = scene(tmp_path / "tri.png")
    cases = [
        (neuron_cf(str(image), out=tmp_path / "o1"), "exactly one of --neuron"),
        (neuron_cf(str(image), "--neuron", "999", out=tmp_path / "o2"), "out of range"),
        (neuron_cf(str(image), "--neuron", "1", "--direction-mode", "up", out=tmp_path / "o3"), "--direction-mode"),
        (neuron_cf(str(image), "--neuron", "1", "--from-other-class", out=tmp_path / "o4"), "needs --class"),
        (neuron_cf(str(image), "--neuron", "1", "--object-error-ratio", "0.5", out=tmp_path / "o5"), "--object-error-ratio"),
        (neuron_cf(str(image), "--neuron", "1", "--mask", str(image), "--sam-checkpoint", str(image), out=tmp_path / "o6"),
         "either --mask or --sam-checkpoint"),
        (neuron_cf(str(image), "--neuron", "1", "--lr-prompt", "-1", out=tmp_path / "o7"), "--lr-prompt must be a positive"),
        (neuron_cf(str(image), "--neuron", "1", "--guidance", "nan", out=tmp_path / "o8"), "--guidance must be at least 0, got nan"),
        (neuron_cf(str(image), "--neuron", "1", "--drop-threshold", "inf", out=tmp_path / "o9"), "--drop-threshold must be"),
        # After the FAST options, which set --ddim-steps too: the last one given counts.
        (neuron_cf(str(image), "--neuron", "1", out=tmp_path / "o10") + ["--ddim-steps", "101"], "--ddim-steps must be at most 100"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert result.output.count("Error:") == 1 and expected in result.output and "Traceback" not in result.output
