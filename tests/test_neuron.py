"""`digin neuron`: neuron and direction objectives, prompt selection, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from digin_cli.cli import app
from run_records import read_run
from digin_cli.engine import GuidedDDIM, OptimConfig, SamplerConfig, initial_latents
from digin_cli.objectives import FeatureMap, NeuronObjective, redirected_relus
from digin_cli.tasks.neuron import select_prompt

runner = CliRunner()
FAST = ["--ddim-steps", "4", "--steps", "2", "--loss-steps", "2", "--cutouts", "2", "--device", "cpu", "--quiet"]


def neuron_cli(*extra: str, out) -> list[str]:
    return ["neuron", "--model", "tiny", "--classifier", "tiny:f", "--out", str(out), *FAST, *extra]


@pytest.mark.parametrize("maximize", [True, False])
def test_neuron_objective_moves_the_activation(tiny_components, tiny_classifiers, maximize):
    f, _ = tiny_classifiers
    engine = GuidedDDIM(tiny_components)
    z_T = initial_latents(tiny_components, [0, 1])
    prompt = engine.encode_text(["a photograph of a star"] * 2)
    null = engine.encode_text([""] * 2)
    # A live neuron (ReLU features can be 0 everywhere): the most active one on these samples.
    images = engine.sample(z_T, prompt, null, SamplerConfig(num_steps=5))
    neuron = int(f.features(images).min(dim=0).values.argmax())
    objective = NeuronObjective(FeatureMap(f), neuron=neuron, maximize=maximize)
    config = OptimConfig(steps=6, lr_latent=5e-2, loss_steps=2, num_cutouts=4)
    result = engine.optimize(objective, z_T, prompt, null, SamplerConfig(num_steps=5), config)
    for item in range(2):
        start, end = result.history[0]["activation"][item], result.history[-1]["activation"][item]
        assert (end > start) if maximize else (end < start), (start, end)


def test_redirected_relu_lets_a_dead_unit_climb():
    # One unit that is off for this input: a plain ReLU passes no gradient to raise it.
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0]]))
        layer.bias.fill_(-3.0)
    model = torch.nn.Sequential(layer, torch.nn.ReLU())
    x = torch.tensor([[1.0, 1.0]], requires_grad=True)
    model(x).sum().backward()
    assert x.grad.abs().sum() == 0
    x.grad = None
    with redirected_relus(model):
        out = model(x)
        (-out).sum().backward()  # minimizing -activation: maximize it
    assert out.item() == 0.0  # forward values are untouched
    assert torch.allclose(x.grad, torch.tensor([[-1.0, 1.0]]))  # a descent step raises the pre-activation
    assert type(model[1]).forward is torch.nn.ReLU.forward and "forward" not in vars(model[1])  # restored


def test_neuron_objective_redirects_only_while_maximizing_with_gradients(tiny_classifiers):
    f, _ = tiny_classifiers
    feature_map = FeatureMap(f)
    views = torch.rand(2, 2, 3, 64, 64)
    plain, _ = NeuronObjective(feature_map, neuron=0, redirect_relu=False).activation(views)
    with torch.no_grad():
        redirected, _ = NeuronObjective(feature_map, neuron=0).activation(views)
    assert torch.allclose(plain, redirected)
    views.requires_grad_(True)
    features = NeuronObjective(feature_map, neuron=0).activation(views)[0]
    assert features.grad_fn is not None and all("forward" not in vars(m) for m in f.modules())


def test_direction_objective_is_the_projection(tiny_classifiers):
    f, _ = tiny_classifiers
    feature_map = FeatureMap(f)
    images = torch.rand(3, 3, 64, 64)
    direction = torch.randn(feature_map.width())
    value, probs = NeuronObjective(feature_map, direction=direction).activation(images.unsqueeze(1))
    features = f.features(images)
    assert torch.allclose(value, features @ direction, atol=1e-5)
    assert torch.allclose(probs, f(images).softmax(-1), atol=1e-5)


def test_layer_feature_map_is_channel_mean(tiny_classifiers):
    f, _ = tiny_classifiers
    images = torch.rand(2, 3, 64, 64)
    activations, logits = FeatureMap(f, "layer1")(images)
    expected = f.model.layer1(f.model.maxpool(f.model.act1(f.model.bn1(f.model.conv1(f.preprocess(images))))))
    assert activations.shape == (2, expected.shape[1])
    assert torch.allclose(activations, expected.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(logits, f(images), atol=1e-6)


def test_prompt_selection_picks_the_highest_mean_activation(tiny_components, tiny_classifiers):
    f, _ = tiny_classifiers
    engine = GuidedDDIM(tiny_components)
    objective = NeuronObjective(FeatureMap(f), neuron=3)
    prompts = ["a photograph of a circle", "a photograph of a star", "snow"]
    chosen, scores = select_prompt(engine, objective, prompts, [0, 1], SamplerConfig(num_steps=3))
    assert set(scores) == set(prompts)
    assert chosen == max(scores, key=scores.get)
    # The scores are the real mean activations of those samples.
    z_T = initial_latents(tiny_components, [0, 1])
    images = engine.sample(z_T, engine.encode_text([chosen] * 2), engine.encode_text([""] * 2), SamplerConfig(3))
    assert scores[chosen] == pytest.approx(float(f.features(images)[:, 3].mean()), abs=1e-5)


def test_neuron_cli_writes_files_and_json(tmp_path):
    out = tmp_path / "n"
    result = runner.invoke(app, neuron_cli("--neuron", "7", "--select-samples", "2", out=out))
    assert result.exit_code == 0, result.output
    header, items = read_run(out)
    config = header["config"]
    assert config["neuron"] == 7 and config["mode"] == "maximize" and config["layer"] == "pre-logits"
    assert len(config["candidate_prompts"]) == 3 and set(config["selection_scores"]) == set(config["candidate_prompts"])
    assert config["prompt"] == max(config["selection_scores"], key=config["selection_scores"].get)
    item = items[0]
    assert {"activation", "top_class", "top_p", "top_class_name"} <= set(item["after"])
    for name in item["files"].values():
        assert (out / name).is_file()


def test_neuron_cli_direction_and_minimize(tmp_path):
    direction = tmp_path / "d.npy"
    np.save(direction, np.random.default_rng(0).normal(size=96).astype(np.float32))
    out = tmp_path / "d"
    result = runner.invoke(app, neuron_cli("--direction", str(direction), "--minimize", "-p", "snow", out=out))
    assert result.exit_code == 0, result.output
    config = read_run(out)[0]["config"]
    assert config["mode"] == "minimize" and config["prompt"] == "snow"
    assert config["selection_scores"] == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--neuron", "96"], "neuron 96 is out of range: the last layer's input of tiny:f has 96 neurons (0-95)"),
        (["--neuron", "1000", "--layer", "layer1"], "layer 'layer1' of tiny:f has 32 neurons"),
        (["--direction", "/nonexistent/d.npy"], "direction file /nonexistent/d.npy does not exist"),
        ([], "give exactly one of --neuron N and --direction FILE"),
        (["--neuron", "1", "--layer", "nosuchlayer"], "has no layer 'nosuchlayer'"),
        (["--neuron", "1", "--candidates", "0"], "--candidates must be at least 1"),
        (["--neuron", "1", "--guidance", "inf"], "--guidance must be at least 0, got inf"),
    ],
)
def test_neuron_bad_input_is_one_clean_error_line(tmp_path, args, message):
    out = tmp_path / "bad"
    result = runner.invoke(app, neuron_cli(*args, out=out))
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert not out.exists()


def test_wrong_length_direction_is_an_error(tmp_path):
    direction = tmp_path / "short.npy"
    np.save(direction, np.zeros(5, np.float32))
    result = runner.invoke(app, neuron_cli("--direction", str(direction), out=tmp_path / "x"))
    assert result.exit_code != 0 and "must be a vector of length 96" in result.stderr


def test_neurons_lists_contributions(tmp_path):
    out = tmp_path / "list.json"
    args = ["neurons", "--model", "tiny", "--classifier", "tiny:f", "--class", "star", "--samples", "2",
            "--top", "4", "--ddim-steps", "3", "--device", "cpu", "--json", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    listed = json.loads(out.read_text())["neurons"]
    assert len(listed) == 4
    contributions = [n["contribution"] for n in listed]
    assert contributions == sorted(contributions, reverse=True)
    for n in listed:
        assert n["contribution"] == pytest.approx(n["weight"] * n["mean_activation"], abs=1e-4)
    assert "digin neuron --classifier tiny:f --neuron" in result.output
