"""shapes:robust, the adversarially trained classifier of DVCE's cone, and its L2 PGD attack."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from digin_cli.models import load_classifier
from digin_cli.models.builtin import shapes_classifier_meta
from digin_cli.world import train_classifiers
from digin_cli.world.scenes import SHAPES
from digin_cli.world.train_classifiers import (
    RECIPES,
    labels_of,
    make_scenes,
    pgd_l2,
    render_batch,
    robust_accuracy,
)


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 4))


def _loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(images), labels, reduction="none")


@pytest.mark.parametrize("random_start", [False, True])
@pytest.mark.parametrize("eps", [0.05, 0.5, 3.0])
def test_pgd_l2_stays_in_the_ball_and_in_the_image_range_and_raises_the_loss(eps, random_start):
    model = _tiny_model()
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    images[0] = 0.0  # saturated images: clamping to [0, 1] must bite
    images[1] = 1.0
    labels = torch.arange(6) % 4
    generator = torch.Generator().manual_seed(2) if random_start else None
    adversarial = pgd_l2(model, images, labels, eps, steps=5, generator=generator)

    assert adversarial.shape == images.shape and not adversarial.requires_grad
    assert float(adversarial.min()) >= 0.0 and float(adversarial.max()) <= 1.0
    norms = (adversarial - images).flatten(1).norm(dim=1)
    assert float(norms.max()) <= eps * (1 + 1e-5)
    assert float(norms.max()) > 0.5 * eps  # it moves (the ball is not left unused)
    assert float(_loss(model, adversarial, labels).sum()) > float(_loss(model, images, labels).sum())
    assert all(p.grad is None for p in model.parameters())  # gradients reach the perturbation alone


def test_pgd_l2_is_deterministic_and_draws_its_random_start_from_the_generator():
    model = _tiny_model()
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    plain = [pgd_l2(model, images, labels, 0.5, steps=3) for _ in range(2)]
    assert torch.equal(plain[0], plain[1])
    seeded = [pgd_l2(model, images, labels, 0.5, steps=3, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], plain[0])
    assert torch.equal(pgd_l2(model, images, labels, 0.0, steps=3), images)  # eps 0: the clean images


def test_a_steepest_ascent_step_on_a_linear_model_goes_along_the_weight_difference():
    # Cross-entropy of a 2-class linear model: the gradient w.r.t. the input is
    # (p - onehot) @ W, parallel to w_other - w_true. One unclamped step of size eps
    # lands exactly at x + eps * that unit direction.
    model = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0, 0, 0]]))
    images, labels = torch.full((1, 8), 0.5), torch.tensor([0])
    adversarial = pgd_l2(model, images, labels, 0.2, steps=1, step_size=0.2)
    expected = images + 0.2 * torch.tensor([[-1.0, 1.0, 0, 0, 0, 0, 0, 0]]) / 2**0.5
    torch.testing.assert_close(adversarial, expected)


def test_adversarial_training_is_reproducible_and_reaches_the_model():
    recipe = replace(next(r for r in RECIPES if r.name == "robust"), steps=2, train_scenes=32, batch_size=8)
    assert recipe.adversarial_eps > 0
    torch.set_num_threads(1)
    first = train_classifiers.train(recipe, log=lambda line: None).state_dict()
    second = train_classifiers.train(recipe, log=lambda line: None).state_dict()
    plain = train_classifiers.train(replace(recipe, adversarial_eps=0.0), log=lambda line: None).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], plain[k]) for k in first if first[k].is_floating_point())


def test_train_classifiers_adversarial_eps_overrides_the_recipes(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(train_classifiers, "EvalSets", lambda: None)
    monkeypatch.setattr(train_classifiers, "train_and_save", lambda recipe, out, eval_sets, log: (
        trained.append(recipe), (out / recipe.name).mkdir(), (out / recipe.name / "model.safetensors").write_bytes(b"x"),
        {"train_seconds": 0, "accuracy": {}})[-1])  # fmt: skip
    train_classifiers.main(["--out", str(tmp_path), "--only", "robust", "--adversarial-eps", "0.5"])
    assert [(r.name, r.adversarial_eps) for r in trained] == [("robust", 0.5)]
    assert next(r for r in RECIPES if r.name == "robust").adversarial_eps == train_classifiers.ROBUST_EPS
    with pytest.raises(SystemExit):
        train_classifiers.main(["--out", str(tmp_path), "--adversarial-eps", "-1"])


def test_shapes_robust_loads_and_states_its_clean_and_robust_accuracy():
    classifier = load_classifier("shapes:robust")
    assert classifier.class_names == list(SHAPES) and classifier.num_classes == 4
    meta = shapes_classifier_meta("robust")
    recipe = next(r for r in RECIPES if r.name == "robust")
    assert meta["adversarial"]["norm"] == "l2" and meta["adversarial"]["eps"] == recipe.adversarial_eps
    assert meta["accuracy"]["balanced"] >= 0.9
    assert 0.5 <= meta["accuracy"]["robust_l2"] <= meta["accuracy"]["balanced"]


def test_shapes_robust_is_more_robust_than_the_oracle():
    # 40 held-out scenes (not the meta's): under the same attack at the training radius
    # the robust classifier keeps most of its answers and the oracle loses most of its.
    eps = shapes_classifier_meta("robust")["adversarial"]["eps"]
    scenes = make_scenes(40, None, seed=train_classifiers.EVAL_SEED + 11)
    images, labels = render_batch(scenes), labels_of(scenes)
    robust = robust_accuracy(load_classifier("shapes:robust"), images, labels, eps)
    oracle = robust_accuracy(load_classifier("shapes:oracle"), images, labels, eps)
    assert robust >= oracle + 0.3, (robust, oracle)


def test_robust_accuracy_takes_a_bare_timm_model_as_well_as_a_classifier():
    classifier = load_classifier("shapes:oracle")
    scenes = make_scenes(8, None, seed=train_classifiers.EVAL_SEED + 12)
    images, labels = render_batch(scenes), labels_of(scenes)
    assert robust_accuracy(classifier.model, images, labels, 0.3, steps=2) == robust_accuracy(
        classifier, images, labels, 0.3, steps=2)  # fmt: skip
