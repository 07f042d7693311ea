"""The guards against results that fool only the guide (issue 38), in the engine: the first
claim kept, DVCE's cone projection, DNO-style noise regularization, the EOT views, and the
guarded score of a start. Their maths on small tensors, then short runs on the tiny model."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from digin_cli.engine import (
    Cone,
    GuidedDDIM,
    OptimConfig,
    SamplerConfig,
    cone_projection,
    initial_latents,
    make_cutouts,
    make_views,
    noise_regularization,
)
from digin_cli.engine.guards import noise_statistics
from digin_cli.engine.inputs import blur_views, flip_views, jitter_colours, make_eot_views, rotate_and_zoom, view_generators
from digin_cli.engine.loop import BestIterates
from digin_cli.objectives import (
    ClassLoss,
    Counterfactual,
    Disagreement,
    NeuronObjective,
    ObjectiveInput,
    ObjectiveOutput,
    RegionDistance,
    class_probability,
)


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Degrees between the rows of a and b (B, N) -> (B,)."""
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos))


def _at_angle(r: torch.Tensor, degrees: float, generator: torch.Generator, length: float = 2.0) -> torch.Tensor:
    """A vector at `degrees` from each row of r (B, N), of the given length."""
    r_unit = r / r.norm(dim=1, keepdim=True)
    other = torch.randn(r.shape, generator=generator, dtype=r.dtype)
    other = other - (other * r_unit).sum(1, keepdim=True) * r_unit
    other = other / other.norm(dim=1, keepdim=True)
    t = math.radians(degrees)
    return length * (math.cos(t) * r_unit + math.sin(t) * other)


# -- the cone projection -----------------------------------------------------------------------


@pytest.mark.parametrize("degrees", [1.0, 10.0, 30.0, 60.0, 89.0, 90.0])
def test_projection_lands_in_the_cone_with_the_dvce_length(degrees):
    generator = torch.Generator().manual_seed(0)
    g, r = torch.randn(64, 40, generator=generator), torch.randn(64, 40, generator=generator)
    projected = cone_projection(g, r, degrees)
    theta = _angle(g, r)
    nonzero = projected.norm(dim=1) > 0
    assert (_angle(projected[nonzero], r[nonzero]) <= degrees + 1e-4).all()
    # Inside the cone unchanged; beyond alpha + 90 zero; between: |g| cos(theta - alpha).
    inside, opposite = theta <= degrees, theta >= degrees + 90
    assert torch.equal(projected[inside], g[inside])
    assert (projected[opposite] == 0).all()
    between = ~inside & ~opposite
    expected = g.norm(dim=1) * torch.cos(torch.deg2rad(theta - degrees)).float()
    assert torch.allclose(projected[between].norm(dim=1), expected[between], atol=1e-5)
    # It is the Euclidean projection: what it removes is orthogonal to what it keeps.
    removed = g - projected
    assert ((removed * projected).sum(1).abs() <= 1e-4 * g.norm(dim=1) ** 2).all()


def test_a_gradient_inside_the_cone_is_unchanged_exactly():
    generator = torch.Generator().manual_seed(1)
    r = torch.randn(5, 300, generator=generator)
    for degrees, inside_at in ((30.0, 29.0), (5.0, 0.5), (90.0, 89.9)):
        g = _at_angle(r, inside_at, generator)
        assert torch.equal(cone_projection(g, r, degrees), g)
    # Along the reference itself (any positive multiple), and a zero reference (no direction).
    assert torch.equal(cone_projection(3 * r, r, 0.01), 3 * r)
    g = torch.randn(5, 300, generator=generator)
    assert torch.equal(cone_projection(g, torch.zeros_like(g), 10.0), g)


def test_ninety_degrees_is_the_half_space_and_opposite_gradients_vanish():
    generator = torch.Generator().manual_seed(2)
    r = torch.randn(4, 50, generator=generator)
    r_unit = r / r.norm(dim=1, keepdim=True)
    # Just past orthogonal: the component against r is removed, the rest kept.
    g = _at_angle(r, 100.0, generator)
    projected = cone_projection(g, r, 90.0)
    expected = g - (g * r_unit).sum(1, keepdim=True) * r_unit
    assert torch.allclose(projected, expected, atol=1e-6)
    assert (_angle(projected, r) - 90).abs().max() < 1e-4
    # Exactly orthogonal is on the boundary: kept. Exactly opposite: zero at every angle.
    orthogonal = _at_angle(r, 90.0, generator)
    assert torch.allclose(cone_projection(orthogonal, r, 90.0), orthogonal, atol=1e-6)
    for degrees in (10.0, 45.0, 90.0):
        assert cone_projection(-2 * r, r, degrees).abs().max() < 1e-6
    # 130 degrees from r is at least alpha + 90 for alpha = 30: nothing points into the cone.
    assert cone_projection(_at_angle(r, 130.0, generator), r, 30.0).abs().max() < 1e-6


def test_cone_items_are_independent_of_their_batch():
    generator = torch.Generator().manual_seed(3)
    g, r = torch.randn(6, 30, generator=generator), torch.randn(6, 30, generator=generator)
    batched = cone_projection(g, r, 25.0)
    for b in range(6):
        assert torch.allclose(cone_projection(g[b : b + 1], r[b : b + 1], 25.0), batched[b : b + 1], atol=1e-7)


def test_cone_degrees_out_of_range_are_refused():
    for degrees in (0.0, -5.0, 90.5, float("nan")):
        with pytest.raises(ValueError, match="half-angle"):
            Cone(lambda views: views.sum(dim=(1, 2, 3, 4)), degrees)


def test_class_loss_is_the_mean_negative_log_probability(tiny_classifiers):
    f, _ = tiny_classifiers
    views = torch.rand(2, 3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    loss = ClassLoss(f, [1, 3])(views)  # (2,)
    log_probs = f(views.flatten(0, 1)).float().log_softmax(-1).view(2, 3, -1)
    assert torch.allclose(loss, -torch.stack([log_probs[0, :, 1].mean(), log_probs[1, :, 3].mean()]), atol=1e-6)


# -- claims and the first-claim iterate ---------------------------------------------------------


class _FixedLogits(torch.nn.Module):
    """A stand-in classifier: the same logits for every view of an item (items in order)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits  # (B, C)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        per_item = views.shape[0] // self.logits.shape[0]
        return self.logits.repeat_interleave(per_item, dim=0)


def test_objectives_claim_as_the_benchmark_counts():
    views = torch.zeros(3, 2, 3, 8, 8)
    inputs = ObjectiveInput(torch.zeros(3, 3, 8, 8), torch.zeros(3, 4, 2, 2), views)
    p_f, p_g = torch.tensor([0.9, 0.6, 0.4]), torch.tensor([0.05, 0.1, 0.0])
    logits = lambda p: torch.stack([p.log(), (1 - p).log()], 1)  # noqa: E731  class 0 has probability p
    out = Disagreement(_FixedLogits(logits(p_f)), _FixedLogits(logits(p_g.clamp_min(1e-9))), 0)(inputs)
    # min(p_f - 0.5, 0.2 - p_g): holds for the first two, not the third (p_f < 0.5).
    assert torch.allclose(out.claim, torch.tensor([0.15, 0.1, -0.1]), atol=1e-5)
    assert out.metrics.keys() == {"p_f", "p_g"}  # the records' history is as it was

    probs = torch.tensor([[0.5, 0.3, 0.2], [0.3, 0.4, 0.3], [0.2, 0.2, 0.6]])
    distance = RegionDistance(torch.zeros(1, 3, 8, 8), torch.zeros(1, 4, 2, 2), torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 2, 2))
    out = Counterfactual(_FixedLogits(probs.log()), 0, 1, distance)(inputs)
    # The target (class 0) against the largest other class.
    assert torch.allclose(out.claim, torch.tensor([0.2, -0.1, -0.4]), atol=1e-5)
    target_on_top = Counterfactual(_FixedLogits(probs.log()), [0, 1, 2], 1, distance)(inputs).claim
    assert torch.allclose(target_on_top, torch.tensor([0.2, 0.1, 0.4]), atol=1e-5)


def test_neuron_objectives_make_no_claim(tiny_classifiers):
    from digin_cli.objectives import FeatureMap

    f, _ = tiny_classifiers
    views = torch.rand(1, 2, 3, 64, 64)
    out = NeuronObjective(FeatureMap(f), neuron=0)(ObjectiveInput(torch.rand(1, 3, 64, 64), torch.zeros(1, 4, 16, 16), views))
    assert out.claim is None


def _observe(best: BestIterates, losses: list[list[float]], claims: list[list[float]] | None) -> None:
    for step, loss in enumerate(losses):
        claim = None if claims is None else torch.tensor(claims[step])
        report = ObjectiveOutput(loss=torch.tensor(loss), claim=claim)
        images = torch.full((len(loss), 3, 2, 2), float(step))
        best.observe(step, report, images, torch.full((len(loss), 4, 1, 1), float(step)))


def test_first_claim_keeps_the_first_iterate_whose_claim_holds_with_margin():
    losses = [[0.0, 0.0, 0.0], [-1.0, -1.0, -1.0], [-2.0, -0.5, -2.0], [-3.0, -3.0, -0.5]]
    claims = [[-0.1, -0.1, 0.2], [0.02, -0.2, 0.3], [0.1, -0.2, -0.1], [0.3, -0.1, 0.4]]
    first = BestIterates(torch.zeros(3, 4, 1, 1), keep="first-claim", claim_margin=0.05)
    _observe(first, losses, claims)
    # Item 0 claims by 0.05 at step 2 (0.02 at step 1 is short of the margin), and keeps it
    # though step 3 has a lower loss; item 1 never claims: its best loss; item 2 claims at 0.
    assert first.best_steps == [2, 3, 0] and first.claim_steps == [2, None, 0]
    assert first.best_images[:, 0, 0, 0].tolist() == [2.0, 3.0, 0.0]
    assert first.best_latents[:, 0, 0, 0].tolist() == [2.0, 3.0, 0.0]
    result = first.result(0.0)
    assert result.best_steps == [2, 3, 0] and result.claim_steps == [2, None, 0]

    best = BestIterates(torch.zeros(3, 4, 1, 1), claim_margin=0.05)  # the default, "best-loss"
    _observe(best, losses, claims)
    assert best.best_steps == [3, 3, 2] and best.claim_steps == [2, None, 0]
    # Without a claim, first-claim is best-loss.
    none = BestIterates(torch.zeros(3, 4, 1, 1), keep="first-claim", claim_margin=0.05)
    _observe(none, losses, None)
    assert none.best_steps == [3, 3, 2] and none.claim_steps == [None, None, None]


def test_bad_guard_settings_are_one_line_errors():
    bad = [(OptimConfig(keep="last"), "keep must be"), (OptimConfig(augment="mixup"), "augment must be"),
           (OptimConfig(noise_reg=-1.0), "noise_reg"), (OptimConfig(claim_margin=-0.1), "claim_margin")]  # fmt: skip
    for config, words in bad:
        with pytest.raises(ValueError, match=words) as error:
            config.validate()
        assert "\n" not in str(error.value)
    OptimConfig().validate()
    OptimConfig(keep="first-claim", augment="eot", noise_reg=2.0).validate()


# -- noise regularization ---------------------------------------------------------------------


def test_noise_regularization_is_near_zero_for_gaussian_noise_and_large_off_it():
    z = torch.randn(4, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    typical = noise_regularization(z)  # (4,)
    assert typical.shape == (4,) and (typical < 0.05).all()
    assert (noise_regularization(3 * z, sigma=3.0) < 0.05).all()  # in units of the noise's sd
    smoothed = torch.nn.functional.avg_pool2d(z, 3, stride=1, padding=1, count_include_pad=False)
    smoothed = smoothed / smoothed.flatten(1).std(dim=1).view(-1, 1, 1, 1)  # unit variance again
    for atypical in (z + 0.3, 1.3 * z, 0.8 * z, smoothed):
        assert (noise_regularization(atypical) > 10).all()
    # A local drift, an 8 x 8 spot pushed up in one channel, is seen though the channel mean hardly moves.
    spot = z.clone()
    spot[:, 0, 8:16, 8:16] += 1.5
    assert (noise_regularization(spot) > 1).all()
    # Each standardized statistic has mean 0 and sd 1 under N(0, 1).
    for name, u in noise_statistics(torch.randn(16, 4, 64, 64, generator=torch.Generator().manual_seed(1))).items():
        assert abs(u.mean().item()) < 0.3 and 0.8 < u.std().item() < 1.25, name


def test_noise_regularization_pulls_a_shifted_latent_back_and_items_stand_alone():
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    z[0] += 0.4  # item 0 shifted, item 1 typical
    start = noise_regularization(z)
    assert start[0] > 10 and start[1] < 0.05
    for b in range(2):
        assert torch.allclose(noise_regularization(z[b : b + 1]), start[b : b + 1])
    variable = z.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([variable], lr=0.1)
    for _ in range(30):
        optimizer.zero_grad()
        noise_regularization(variable).sum().backward()
        optimizer.step()
    assert variable.detach()[0].mean() < 0.5 * z[0].mean()  # pulled back toward zero mean
    assert noise_regularization(variable.detach())[0] < 0.2 * start[0]
    assert torch.equal(variable.detach()[1], z[1])  # a typical item gets no gradient at all


# -- the EOT views ----------------------------------------------------------------------------


def _generators(seed: int, batch: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for _ in range(batch)]


def test_cutouts_by_name_are_the_cutouts():
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    config = OptimConfig(num_cutouts=5, view_size=32)
    assert torch.equal(make_views(images, config, _generators(3, 2)), make_cutouts(images, 5, 32, 0.5, 0.005, _generators(3, 2)))


def test_eot_views_repeat_by_seed_and_do_not_depend_on_the_batch():
    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(0), requires_grad=True)
    a = make_eot_views(images, 6, 32, 0.5, 0.005, _generators(1, 3))
    b = make_eot_views(images, 6, 32, 0.5, 0.005, _generators(1, 3))
    assert a.shape == (3, 6, 3, 32, 32) and torch.equal(a, b)
    assert not torch.allclose(a, make_eot_views(images, 6, 32, 0.5, 0.005, _generators(2, 3)))
    for item in range(3):
        alone = make_eot_views(images[item : item + 1], 6, 32, 0.5, 0.005, _generators(1, 1))
        assert torch.allclose(alone[0], a[item], atol=1e-6)
    # Items are seeded alike, so the same image gives the same views in any place of the batch.
    same = make_eot_views(images[:1].expand(2, -1, -1, -1), 6, 32, 0.5, 0.005, _generators(1, 2))
    assert torch.allclose(same[0], same[1], atol=1e-6)
    # Gradients reach each item from its own views only, through every transformation.
    a[1].sum().backward()
    assert images.grad[1].abs().sum() > 0 and images.grad[0].abs().sum() == 0 and images.grad[2].abs().sum() == 0
    # And they differ from plain cutouts drawn from the same seed.
    assert not torch.allclose(a, make_cutouts(images, 6, 32, 0.5, 0.005, _generators(1, 3)), atol=1e-2)


def test_flip_rotation_and_zoom_maths():
    image = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    flipped = flip_views(image, torch.tensor([True, False]))
    assert torch.equal(flipped[0], image[0].flip(-1)) and torch.equal(flipped[1], image[1])
    same = rotate_and_zoom(image, torch.zeros(2), torch.ones(2))
    assert torch.allclose(same, image, atol=1e-4)
    # +90 degrees is a quarter turn counter-clockwise as displayed (torch.rot90 of the H, W axes).
    quarter = rotate_and_zoom(image, torch.full((2,), 90.0), torch.ones(2))
    assert torch.allclose(quarter, torch.rot90(image, 1, (2, 3)), atol=1e-4)
    # A zoom of 2 magnifies the centre: what is constant over the middle fills the view.
    centre = torch.zeros(1, 3, 8, 8)
    centre[..., 1:7, 1:7] = 1.0
    assert torch.allclose(rotate_and_zoom(centre, torch.zeros(1), torch.full((1,), 2.0)), torch.ones(1, 3, 8, 8), atol=1e-5)
    angle = torch.tensor([7.0, -4.0], requires_grad=True)
    views = image.clone().requires_grad_(True)
    rotate_and_zoom(views, angle, torch.tensor([1.05, 0.95])).square().sum().backward()
    assert views.grad.abs().sum() > 0


def test_colour_jitter_maths():
    generator = torch.Generator().manual_seed(0)
    views = torch.rand(3, 3, 5, 5, generator=generator)
    ones = torch.ones(3)
    assert torch.allclose(jitter_colours(views, ones, ones, ones), views, atol=1e-6)
    assert torch.allclose(jitter_colours(views, 1.1 * ones, ones, ones), 1.1 * views, atol=1e-6)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    grey = (views * luma).sum(1, keepdim=True)  # (3, 1, 5, 5)
    # Saturation 0: each pixel its grey in every channel; contrast 0: the view's mean grey everywhere.
    assert torch.allclose(jitter_colours(views, ones, ones, torch.zeros(3)), grey.expand_as(views), atol=1e-6)
    flat = jitter_colours(views, ones, torch.zeros(3), ones)
    assert torch.allclose(flat, grey.mean(dim=(2, 3), keepdim=True).expand_as(views), atol=1e-6)
    # Unclamped, so a saturated pixel still passes its gradient.
    white = torch.ones(1, 3, 4, 4, requires_grad=True)
    jitter_colours(white, torch.tensor([1.1]), torch.tensor([1.0]), torch.tensor([1.0])).sum().backward()
    assert (white.grad > 0).all()


def test_blur_maths():
    views = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(blur_views(views, torch.zeros(2)), views, atol=1e-6)
    constant = torch.full((2, 3, 9, 9), 0.7)
    assert torch.allclose(blur_views(constant, torch.tensor([0.5, 1.0])), constant, atol=1e-6)
    impulse = torch.zeros(1, 3, 9, 9)
    impulse[..., 4, 4] = 1.0
    blurred = blur_views(impulse, torch.tensor([1.0]))[0, 0]
    taps = torch.exp(-0.5 * torch.arange(-2.0, 3.0) ** 2)
    taps = taps / taps.sum()
    assert torch.allclose(blurred[2:7, 2:7], taps[:, None] * taps[None, :], atol=1e-6)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-6)
    # Each view its own sd: the sharper view of two stays closer to the original.
    both = blur_views(views, torch.tensor([0.2, 1.0]))
    assert (both[0] - views[0]).abs().mean() < (both[1] - views[1]).abs().mean()


# -- short runs on the tiny model --------------------------------------------------------------


@pytest.fixture()
def tiny_run(tiny_components):
    engine = GuidedDDIM(tiny_components)
    z_T = initial_latents(tiny_components, [0, 1])
    prompt = engine.encode_text(["a photograph of a circle"] * 2)
    null = engine.encode_text([""] * 2)
    return engine, z_T, prompt, null, SamplerConfig(num_steps=4, guidance_scale=3.0)


def test_first_claim_keeps_an_early_claimed_iterate_on_the_tiny_model(tiny_run, tiny_classifiers):
    engine, z_T, prompt, null, sampler = tiny_run
    f, g = tiny_classifiers
    objective = Disagreement(f, g, 2)
    config = OptimConfig(steps=4, lr_latent=5e-2, loss_steps=2, num_cutouts=4, keep="first-claim")
    result = engine.optimize(objective, z_T, prompt, null, sampler, config)
    best = engine.optimize(objective, z_T, prompt, null, sampler, replace(config, keep="best-loss"))
    assert result.history == best.history  # what is kept, not what is optimized
    assert result.claim_steps == best.claim_steps
    margin = config.claim_margin
    for b in range(2):
        holds = [h["p_f"][b] - 0.5 >= margin and 0.2 - h["p_g"][b] >= margin for h in result.history]
        first = holds.index(True) if True in holds else None
        assert result.claim_steps[b] == first
        if first is None:
            assert result.best_steps[b] == best.best_steps[b]
        else:
            assert result.best_steps[b] == first
    assert result.best_steps != best.best_steps, "the test should see first-claim keep an earlier iterate"
    # A claim that already holds at the start keeps the start.
    loose = Disagreement(f, g, 2, claim_p_f=0.0, claim_p_g=1.0)
    assert engine.optimize(loose, z_T, prompt, null, sampler, config).best_steps == [0, 0]


def test_cone_changes_the_update_and_a_reference_equal_to_the_guide_changes_nothing(tiny_run, tiny_classifiers):
    engine, z_T, prompt, null, sampler = tiny_run
    f, g = tiny_classifiers
    objective = Disagreement(f, g, 3)
    config = OptimConfig(steps=2, lr_latent=5e-2, loss_steps=2, num_cutouts=4, views_per_pass=3)
    plain = engine.first_gradients(objective, z_T, prompt, null, sampler, config)["latent"]
    robust = Cone(ClassLoss(g, 1), degrees=10.0)
    coned = engine.first_gradients(objective, z_T, prompt, null, sampler, config, cone=robust)["latent"]
    assert (coned - plain).abs().max() > 1e-3 * plain.abs().max()
    # Passes add up: the guide's and the reference's view gradients over all passes first.
    whole = engine.first_gradients(objective, z_T, prompt, null, sampler, replace(config, views_per_pass=4),
                                   cone=robust)  # fmt: skip
    assert torch.allclose(whole["latent"], coned, atol=1e-6, rtol=1e-4)

    baseline = engine.optimize(objective, z_T, prompt, null, sampler, config)
    same = lambda views: objective(ObjectiveInput(None, None, views)).loss  # noqa: E731  the guide's own loss
    for degrees in (1.0, 45.0):
        result = engine.optimize(objective, z_T, prompt, null, sampler, config, cone=Cone(same, degrees))
        assert torch.equal(result.best_images, baseline.best_images) and result.history == baseline.history


def test_cone_leaves_the_distance_terms_unprojected(tiny_run, tiny_classifiers):
    """A reference opposite to the guide projects the classifier part to zero: what remains
    is exactly the gradient of the distance terms, which the cone never touches."""
    engine, z_T, prompt, null, sampler = tiny_run
    f, _ = tiny_classifiers
    generator = torch.Generator().manual_seed(0)
    distance = RegionDistance(torch.rand(1, 3, 64, 64, generator=generator), torch.randn(1, 4, 16, 16, generator=generator),
                              torch.full((1, 1, 64, 64), 0.5), torch.full((1, 1, 16, 16), 0.5))  # fmt: skip
    objective = Counterfactual(f, 1, 2, distance)
    config = OptimConfig(steps=1, lr_latent=5e-2, loss_steps=2, num_cutouts=4, views_per_pass=2, optimize_prompt=False,
                         optimize_null=False)  # fmt: skip
    opposite = Cone(lambda views: -ClassLoss(f, 1)(views), degrees=30.0)
    coned = engine.first_gradients(objective, z_T, prompt, null, sampler, config, cone=opposite)["latent"]
    distance_only = lambda inputs: ObjectiveOutput(loss=sum(distance(inputs.images, inputs.latents)))  # noqa: E731
    expected = engine.first_gradients(distance_only, z_T, prompt, null, sampler, config)["latent"]
    assert expected.abs().max() > 0
    assert torch.allclose(coned, expected, atol=1e-6, rtol=1e-4)


def test_noise_regularization_weight_changes_the_run(tiny_run, tiny_classifiers):
    engine, z_T, prompt, null, sampler = tiny_run
    f, g = tiny_classifiers
    # A large z_T step, so that z_T drifts to where the regularizer has a gradient.
    config = OptimConfig(steps=3, lr_latent=0.5, loss_steps=2, num_cutouts=4, optimize_prompt=False, optimize_null=False)
    plain = engine.optimize(Disagreement(f, g, 3), z_T, prompt, null, sampler, config)
    again = engine.optimize(Disagreement(f, g, 3), z_T, prompt, null, sampler, replace(config, noise_reg=0.0))
    assert torch.equal(plain.best_latents, again.best_latents)
    regularized = engine.optimize(Disagreement(f, g, 3), z_T, prompt, null, sampler,
                                  replace(config, noise_reg=1.0))  # fmt: skip
    assert regularized.history != plain.history
    assert not torch.allclose(regularized.best_latents, plain.best_latents)


def test_eot_runs_repeat_and_differ_from_cutouts(tiny_run, tiny_classifiers):
    engine, z_T, prompt, null, sampler = tiny_run
    f, g = tiny_classifiers
    config = OptimConfig(steps=2, lr_latent=5e-2, loss_steps=2, num_cutouts=4, augment="eot")
    a = engine.optimize(Disagreement(f, g, 2), z_T, prompt, null, sampler, config)
    b = engine.optimize(Disagreement(f, g, 2), z_T, prompt, null, sampler, config)
    assert torch.equal(a.best_images, b.best_images) and a.history == b.history
    cutouts = engine.optimize(Disagreement(f, g, 2), z_T, prompt, null, sampler, replace(config, augment="cutouts"))
    assert a.history[0] == cutouts.history[0]  # the same start, judged on plain images
    assert a.history[-1] != cutouts.history[-1]


def test_start_views_loss_is_the_objective_on_the_augmented_start(tiny_run, tiny_classifiers):
    engine, z_T, prompt, null, sampler = tiny_run
    f, g = tiny_classifiers
    objective = Disagreement(f, g, 2)
    config = OptimConfig(num_cutouts=5, loss_steps=2)
    loss = engine.start_views_loss(objective, z_T, prompt, null, sampler, config)
    assert loss.shape == (2,) and not loss.requires_grad
    # By hand: the last step's x0-prediction, decoded, its seeded cutouts, the objective.
    T = sampler.num_steps
    with torch.no_grad():
        _, kept = engine.run_chain(z_T, prompt.expand(T, -1, -1, -1), null.expand(T, -1, -1, -1), 3.0, keep_last=1)
        images = engine.decode(kept[-1])
        views = make_cutouts(images, 5, 64, 0.5, 0.005, view_generators(engine.device, config.seed, 2))
        expected = objective(ObjectiveInput(images, kept[-1], views)).loss
    assert torch.allclose(loss, expected, atol=1e-6)
    # Passes, items alone, EOT views, and the cone's reference added.
    assert torch.allclose(engine.start_views_loss(objective, z_T, prompt, null, sampler, replace(config, views_per_pass=2)),
                          loss, atol=1e-6)  # fmt: skip
    alone = engine.start_views_loss(objective, z_T[1:], prompt[1:], null[1:], sampler, config)
    assert torch.allclose(alone, loss[1:], atol=1e-5)
    eot = engine.start_views_loss(objective, z_T, prompt, null, sampler, replace(config, augment="eot"))
    assert not torch.allclose(eot, loss)
    reference = ClassLoss(g, 2)
    guarded = engine.start_views_loss(objective, z_T, prompt, null, sampler, config, cone=Cone(reference, 30.0))
    assert torch.allclose(guarded, loss + reference(views), atol=1e-5)
    assert torch.allclose(class_probability(f, views, 2) - class_probability(g, views, 2), -loss, atol=1e-6)
