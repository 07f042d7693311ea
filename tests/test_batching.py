"""Several real images in one engine batch (`--batch-size` of uvce and neuron-cf).

A batch must change the speed, not the results: every item keeps its own inversion,
mask, prompt-to-prompt attention, class, loss, cutouts and best iterate.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from digin_cli.attention import AttentionControl
from digin_cli.cli import app
from run_records import read_run
from digin_cli.tasks.folder_runs import read_csv
from digin_cli.engine import make_cutouts
from digin_cli.errors import DiginError
from digin_cli.objectives import Counterfactual, NeuronCounterfactual, NeuronObjective, FeatureMap, ObjectiveInput, RegionDistance

runner = CliRunner()
FAST = ["--ddim-steps", "4", "--steps", "2", "--loss-steps", "2", "--cutouts", "2", "--device", "cpu", "--quiet"]


def scene(path, seed: int, shape: str = "bar"):
    from digin_cli.world.scenes import caption, render, sample_scene

    picked = sample_scene(np.random.default_rng(seed), shape=shape)
    array, mask = render(picked)
    Image.fromarray(array).save(path)
    return caption(picked), mask


def test_cutouts_with_one_generator_per_item_ignore_the_rest_of_the_batch():
    images = torch.rand(3, 3, 32, 32)
    alone = make_cutouts(images[1:2], 4, 16, 0.5, 0.01, [torch.Generator().manual_seed(5)])
    batched = make_cutouts(images, 4, 16, 0.5, 0.01, [torch.Generator().manual_seed(5) for _ in range(3)])
    assert batched.shape == (3, 4, 3, 16, 16)
    assert torch.allclose(batched[1], alone[0])
    assert not torch.allclose(batched[0], batched[1])  # different images, same crops


def test_objectives_take_one_class_per_item(tiny_classifiers):
    classifier = tiny_classifiers[0]
    torch.manual_seed(0)
    views = torch.rand(2, 3, 3, *classifier.input_size)  # (B, V, 3, S, S)
    images, latents = torch.rand(2, 3, 64, 64), torch.rand(2, 4, 16, 16)
    inputs = ObjectiveInput(images, latents, views)
    distance = RegionDistance(torch.rand(2, 3, 64, 64), torch.rand(2, 4, 16, 16), torch.rand(2, 1, 64, 64), torch.rand(2, 1, 16, 16))
    both = Counterfactual(classifier, [1, 3], [0, 2], distance)(inputs)
    neuron = NeuronObjective(FeatureMap(classifier), neuron=2)
    judged = NeuronCounterfactual(neuron, [3, 1], distance)(inputs)
    for b, (target, source) in enumerate([(1, 0), (3, 2)]):
        one = Counterfactual(classifier, target, source, distance)(inputs)
        assert torch.allclose(both.loss[b], one.loss[b])
        assert torch.allclose(both.metrics["p_target"][b], one.metrics["p_target"][b])
        assert torch.allclose(both.metrics["p_source"][b], one.metrics["p_source"][b])
        single = NeuronCounterfactual(neuron, [3, 1][b], distance)(inputs)
        assert torch.allclose(judged.metrics["p_class"][b], single.metrics["p_class"][b])


def test_batched_attention_control_injects_each_item_its_own_recording():
    heads, queries, length = 2, 4, 6
    recordings, mappings = [], []
    for seed in range(2):
        control = AttentionControl()
        generator = torch.Generator().manual_seed(seed)
        control.stored[(0, "layer")] = torch.rand(heads, queries, length, generator=generator).softmax(-1)
        recordings.append(control)
        mappings.append(torch.eye(length).roll(seed, dims=0))
    batched = AttentionControl.for_batch(recordings, mappings, inject_steps=1)
    probs = torch.rand(2 * 2 * heads, queries, length)  # [uncond; cond] halves of a batch of 2
    out = batched(probs, "layer", heads)
    assert torch.equal(out[: 2 * heads], probs[: 2 * heads])  # the unconditional half is untouched
    for b, (control, mapping) in enumerate(zip(recordings, mappings)):
        control.inject(1, mapping)
        cond = slice(2 * heads + b * heads, 2 * heads + (b + 1) * heads)  # item b's conditional rows
        alone = torch.cat([probs[b * heads : (b + 1) * heads], probs[cond]])  # item b as a batch of 1
        assert torch.allclose(out[cond], control(alone, "layer", heads)[heads:])


def test_csv_header_names_the_columns_and_may_add_captions(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text('caption,file,class\n"a photo of a red bar, on sand",a.png,bar\n')
    [item] = read_csv(path, tmp_path, ["circle"])
    assert (item.path, item.source, item.targets, item.caption) == (tmp_path / "a.png", "bar", ["circle"], "a photo of a red bar, on sand")
    path.write_text("file,class,label\na.png,bar\n")
    with pytest.raises(DiginError, match="unknown column"):
        read_csv(path, tmp_path, ["circle"])


def uvce(folder, csv, batch: int, out):
    # The prompt-delta lr pinned to 0.05 (the tiny models' default is 0.2): Adam's first
    # steps move every element by about lr whatever the gradient, so float noise between a
    # batched and a single forward grows with it (at 0.2: 1.4 8-bit levels on average
    # after two steps), and the image tolerance of the test below is meant for batching, not for lr.
    return ["uvce", str(folder), "--csv", str(csv), "--target", "circle", "--batch-size", str(batch), "--model", "tiny",
            "--classifier", "tiny:f", "--lr-prompt", "0.05", "--out", str(out), *FAST]  # fmt: skip


def test_uvce_batch_gives_the_results_of_one_by_one(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rows = ["file,class,caption"]
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        text, _ = scene(folder / f"{name}.png", seed)
        rows.append(f"{name}.png,bar,{text}")
    csv = tmp_path / "items.csv"
    csv.write_text("\n".join(rows) + "\n")
    single = runner.invoke(app, uvce(folder, csv, 1, tmp_path / "one"))
    assert single.exit_code == 0, single.output
    batched = runner.invoke(app, uvce(folder, csv, 2, tmp_path / "two"))  # a + b together, then c
    assert batched.exit_code == 0, batched.output
    for name in "abc":
        one = json.loads((tmp_path / "one" / f"{name}_circle.json").read_text())
        two = json.loads((tmp_path / "two" / f"{name}_circle.json").read_text())
        assert one["caption"].startswith("a photograph of a") and two["caption"] == one["caption"]
        assert (one["batch_size"], two["batch_size"]) == (1, 1 if name == "c" else 2)
        # The start is the same computation; after Adam steps, float noise in near-zero
        # gradients is amplified a little (Adam normalizes every element), so looser there.
        for key in ("p_target", "p_source", "distance_pixel", "distance_latent"):
            assert two["start"][key] == pytest.approx(one["start"][key], rel=1e-4, abs=1e-5)
            for after_one, after_two in zip(one["history"], two["history"]):
                assert after_two[key] == pytest.approx(after_one[key], rel=0.02, abs=0.01)
        image_one = np.asarray(Image.open(tmp_path / "one" / one["files"]["counterfactual"]), dtype=float)
        image_two = np.asarray(Image.open(tmp_path / "two" / two["files"]["counterfactual"]), dtype=float)
        assert np.abs(image_one - image_two).mean() < 1  # 8-bit levels
    _, lines = read_run(tmp_path / "two")
    assert [line["input"]["file"].rsplit("/", 1)[-1] for line in lines] == ["a.png", "b.png", "c.png"]


def test_neuron_cf_batch_with_a_mask_folder_survives_a_missing_mask_and_resumes(tmp_path):
    folder, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    folder.mkdir()
    masks.mkdir()
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        _, mask = scene(folder / f"{name}.png", seed, shape="triangle")
        if name != "c":
            Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f"{name}.png")
    args = ["neuron-cf", str(folder), "--neuron", "3", "--class", "triangle", "--direction-mode", "min", "--mask", str(masks),
            "--batch-size", "4", "--model", "tiny", "--classifier", "tiny:f", "--out", str(out), *FAST]  # fmt: skip
    first = runner.invoke(app, args)
    assert first.exit_code == 1
    assert first.output.count("Error:") == 1 and "no mask for c.png" in first.output and "Traceback" not in first.output
    _, lines = read_run(out)
    assert [line["status"] for line in lines] == ["ok", "ok", "failed"] and "no mask for c.png" in lines[2]["error"]
    for name in "ab":
        record = json.loads((out / f"{name}_n3.json").read_text())
        assert record["mask_source"] == "file" and record["batch_size"] == 2
        assert record["verdict"] is not None
    Image.fromarray(np.zeros((64, 64), np.uint8) + 255).save(masks / "c.png")
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    _, lines = read_run(out)
    assert [line["status"] for line in lines] == ["ok", "ok", "ok"]  # c retried; a and b kept with their figures
    assert all(line["verdict"] is not None for line in lines)


def test_crops_are_torchvision_roi_align_values_and_gradients():
    from torchvision.ops import roi_align

    from digin_cli.engine.inputs import crop_and_resize

    generator = torch.Generator().manual_seed(0)
    for (height, width), size in (((64, 64), 64), ((48, 80), 24), ((32, 32), 96)):  # square, wide and down, up
        images = torch.rand(2, 3, height, width, generator=generator, requires_grad=True)
        side = (0.4 + 0.6 * torch.rand(6, generator=generator)) * min(height, width)  # 3 crops per image
        left = torch.rand(6, generator=generator) * (width - side)
        top = torch.rand(6, generator=generator) * (height - side)
        boxes = torch.stack([torch.arange(2).repeat_interleave(3).float(), left, top, left + side, top + side], dim=1)
        reference = roi_align(images, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        crops = crop_and_resize(images, left, top, side, 3, size)
        assert crops.shape == reference.shape
        assert (crops - reference).abs().max() < 1e-4
        weights = torch.rand(reference.shape, generator=generator)
        (expected,) = torch.autograd.grad((reference * weights).sum(), images)
        (got,) = torch.autograd.grad((crops * weights).sum(), images)
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
