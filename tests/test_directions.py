"""`digin directions`: neural PCA of a class's last-layer contributions (Neuhaus et al.)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from digin_cli.cli import app
from digin_cli.io import load_vector_file
from digin_cli.models import load_classifier
from digin_cli.models.builtin import shape_planted_with, shapes_classifier_meta
from digin_cli.tasks.directions import neural_pca
from digin_cli.tasks.neuron_target import load_direction
from digin_cli.world.scenes import BACKGROUNDS, render, sample_scene


def _synthetic(n=40, d=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.rand(n, d, generator=generator).pow(2) * 3  # (N, D), non-negative like ReLU features
    weight = torch.randn(d, generator=generator)  # (D,)
    return features, weight


def test_components_split_the_class_logit_exactly():
    # With every component kept, sum_l alpha_l(x) = logit_k(x) - mean over the images of logit_k.
    features, weight = _synthetic()
    pca = neural_pca(features, weight, class_index=0, count=100)
    assert pca.components.shape == (12, 12)  # min(N - 1, D) components
    logits = features @ weight  # (N,), the bias cancels
    alphas = pca.activations(features)  # (N, L)
    assert torch.allclose(alphas.sum(1), logits - logits.mean(), atol=1e-4)
    # Components are orthonormal and ordered by variance.
    gram = pca.components @ pca.components.T
    assert torch.allclose(gram, torch.eye(len(gram)), atol=1e-5)
    assert (pca.eigenvalues[:-1] >= pca.eigenvalues[1:] - 1e-6).all()
    assert pca.explained.sum() == pytest.approx(1.0, abs=1e-5)


def test_direction_gives_the_component_activation_and_sign_does_not_matter():
    features, weight = _synthetic(seed=1)
    pca = neural_pca(features, weight, class_index=0, count=5)
    directions = pca.directions()  # (L, D)
    offsets = pca.scales * (pca.components @ pca.mean)  # (L,)
    assert torch.allclose(features @ directions.T - offsets, pca.activations(features), atol=1e-4)
    flipped = type(pca)(pca.class_index, pca.mean, -pca.components, pca.eigenvalues, pca.explained, pca.weight)
    assert torch.allclose(flipped.activations(features), pca.activations(features), atol=1e-6)
    assert torch.allclose(flipped.directions(), directions, atol=1e-6)


def test_a_planted_factor_is_the_first_component():
    # Features driven by one hidden factor in 4 of 12 dimensions plus small noise.
    generator = torch.Generator().manual_seed(2)
    factor = (torch.rand(60, generator=generator) > 0.5).float()  # (N,)
    features = 0.05 * torch.rand(60, 12, generator=generator)
    features[:, 3:7] += factor[:, None] * torch.tensor([1.0, 0.8, 1.2, 0.9])
    weight = torch.ones(12)
    pca = neural_pca(features, weight, class_index=0, count=3)
    alpha = pca.activations(features)[:, 0]
    assert pca.explained[0] > 0.8
    assert alpha[factor == 1].min() > alpha[factor == 0].max()  # it separates the factor
    assert alpha[factor == 1].mean() > 0  # and its activation is the factor's share of the logit (positive weights)


def _write_scenes(folder, per_background=8, shape="triangle"):
    rng = np.random.default_rng(4)
    folder.mkdir(parents=True, exist_ok=True)
    for where in BACKGROUNDS:
        for i in range(per_background):
            Image.fromarray(render(sample_scene(rng, shape=shape, background=where))[0]).save(folder / f"{where}-{i}.png")


def test_directions_command_finds_the_planted_background_feature(tmp_path):
    # The documented background neuron's background, and the shape planted on it.
    meta = shapes_classifier_meta("background-biased")
    background = meta["background_neuron"]["background"]
    planted = shape_planted_with(meta, background)
    folder, out = tmp_path / "images", tmp_path / "out"
    _write_scenes(folder, shape=planted)
    (folder / "broken.png").write_bytes(b"not a png")  # one bad file is skipped, not fatal
    result = CliRunner().invoke(app, ["directions", str(folder), "--classifier", "shapes:background-biased", "--class", planted,
                                      "--out", str(out), "--components", "4", "--top-images", "6", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((out / "directions.json").read_text())
    assert record["images"] == 32 and [s["file"] for s in record["skipped"]] == ["broken.png"]
    assert len(record["components"]) == 4 and "Next: digin neuron" in result.output
    # The planted feature: a top-3 component whose six most activating images are all on its background.
    found = [c for c in record["components"][:3] if all(t["file"].startswith(background) for t in c["top_images"])]
    assert found, [[t["file"] for t in c["top_images"]] for c in record["components"]]
    entry = found[0]
    assert (out / entry["sheet"]).is_file() and Image.open(out / entry["sheet"]).width > 6 * 64
    # The file is what --direction loads, and it reproduces the recorded activations.
    classifier = load_classifier("shapes:background-biased")
    direction = load_direction(out / entry["direction_file"], classifier.features(torch.zeros(1, 3, 64, 64)).shape[1])
    image = torch.from_numpy(np.asarray(Image.open(folder / entry["top_images"][0]["file"]).convert("RGB")).copy())
    with torch.no_grad():
        phi = classifier.features(image.permute(2, 0, 1)[None].float() / 255)[0]
    assert float(phi @ direction) - entry["direction_offset"] == pytest.approx(entry["top_images"][0]["alpha"], abs=1e-3)
    assert torch.equal(load_vector_file(out / entry["direction_file"]).float(), direction)


def test_directions_errors_are_one_line(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["directions", str(tmp_path / "nope"), "--classifier", "shapes:oracle", "--class", "circle",
                                  "--out", str(tmp_path / "o")])  # fmt: skip
    assert missing.exit_code == 1 and "is not a folder" in missing.stderr and "Traceback" not in missing.output
    few = tmp_path / "few"
    _write_scenes(few, per_background=1)
    for path in list(few.iterdir())[1:]:
        path.unlink()
    result = runner.invoke(app, ["directions", str(few), "--classifier", "shapes:oracle", "--class", "circle", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "PCA needs at least 2 images" in result.stderr
    _write_scenes(few, per_background=1)
    result = runner.invoke(app, ["directions", str(few), "--classifier", "shapes:oracle", "--class", "hexagon", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "hexagon" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_api_directions_is_the_commands_task(tmp_path):
    import digin_cli as digin

    folder = tmp_path / "triangles"
    _write_scenes(folder, per_background=3)
    record = digin.directions(folder, "shapes:background-biased", "triangle", components=3, device="cpu", out=tmp_path / "o")
    assert record["images"] == 12 and len(record["components"]) == 3
    assert json.loads((tmp_path / "o" / "directions.json").read_text())["components"] == record["components"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(digin.DiginError, match="PCA needs at least 2"):
        digin.directions(tmp_path / "empty", "shapes:oracle", "circle", out=tmp_path / "p")
