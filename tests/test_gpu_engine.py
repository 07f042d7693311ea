"""The engine's GPU faults, checked on the CPU: memory of one update, fp16 loss scaling, the
memory plan, stored attention maps and torch.compile inside checkpointing."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from digin_cli.engine import GuidedDDIM, OptimConfig, SamplerConfig, initial_latents, make_cutouts, memory
from digin_cli.errors import CompileFallbackWarning
from digin_cli.engine.loop import AugmentedLoss, Variables
from digin_cli.engine.memory import MemoryPlan, SavedTensorMeter, StepFootprint, plan_memory
from digin_cli.objectives import Counterfactual, ObjectiveInput, ObjectiveOutput, RegionDistance

SAMPLER = SamplerConfig(num_steps=4, guidance_scale=3.0)


def _inputs(engine: GuidedDDIM, seeds: list[int]):
    z_T = initial_latents(engine.components, seeds)
    prompt = engine.encode_text(["a photograph of a circle"] * len(seeds))
    return z_T, prompt, engine.null_embedding(len(seeds))


def _counterfactual(engine: GuidedDDIM, classifier, batch: int) -> Counterfactual:
    """A classifier term over the views plus a distance of the image and latent alone."""
    side, latent_shape = engine.components.resolution, engine.components.latent_shape
    generator = torch.Generator().manual_seed(5)
    distance = RegionDistance(
        image=torch.rand((1, 3, side, side), generator=generator),
        image_latents=torch.randn((1, *latent_shape), generator=generator),
        keep_pixels=torch.ones(1, 1, side, side) * 0.5, keep_latents=torch.ones(1, 1, *latent_shape[1:]) * 0.5,
    )  # fmt: skip
    return Counterfactual(classifier, [1] * batch, [0] * batch, distance)


def _one_backward_gradients(engine: GuidedDDIM, objective, z_T, prompt, null, config: OptimConfig):
    """The gradients as digin computed them before: every loss term of every view summed, and one
    backward through the whole graph (every classifier graph kept until then)."""
    config = config.resolved(engine.components)
    variables = Variables.create(z_T, prompt, null, SAMPLER.num_steps, config, engine.device)
    loss = AugmentedLoss.create(objective, config, z_T.shape[0], engine.device)
    prompt_embs, null_embs = variables.embeddings()
    _, x0_preds = engine.run_chain(variables.latent, prompt_embs, null_embs, SAMPLER.guidance_scale,
                                   keep_last=config.loss_steps)  # fmt: skip
    total = torch.zeros(z_T.shape[0])
    for weight, x0 in zip(loss.weights, x0_preds):
        image = engine.decode(x0)
        views = make_cutouts(image, config.num_cutouts, config.view_size, config.cutout_min_scale,
                             config.cutout_noise_std, loss.generators)  # fmt: skip
        total = total + weight * objective(ObjectiveInput(image, x0, views)).loss
    total.sum().backward()
    return {"latent": variables.latent.grad, "prompt": variables.prompt_delta.grad, "null": variables.null_delta.grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_views_in_passes_give_the_gradients_of_one_backward(tiny_components, tiny_classifiers, checkpointing):
    engine = GuidedDDIM(tiny_components)
    z_T, prompt, null = _inputs(engine, [0, 1])
    objective = _counterfactual(engine, tiny_classifiers[0], 2)
    config = OptimConfig(loss_steps=3, num_cutouts=4, gradient_checkpointing=checkpointing)
    reference = _one_backward_gradients(engine, objective, z_T, prompt, null, config)
    for views_per_pass in (1, 3, 4):
        ours = engine.first_gradients(objective, z_T, prompt, null, SAMPLER, OptimConfig(
            loss_steps=3, num_cutouts=4, gradient_checkpointing=checkpointing, views_per_pass=views_per_pass))  # fmt: skip
        for name in ("latent", "prompt", "null"):
            assert reference[name].abs().max() > 0, name
            scale = reference[name].abs().max()
            assert (ours[name] - reference[name]).abs().max() <= 1e-5 * scale, (name, views_per_pass)


def _peak_saved_bytes(engine, classifier, loss_steps: int, cutouts: int, views_per_pass: int) -> int:
    z_T, prompt, null = _inputs(engine, [0, 1])
    objective = _counterfactual(engine, classifier, 2)
    config = OptimConfig(loss_steps=loss_steps, num_cutouts=cutouts, gradient_checkpointing=True,
                         views_per_pass=views_per_pass, view_size=96)  # fmt: skip
    meter = SavedTensorMeter()
    with meter.measure():
        engine.first_gradients(objective, z_T, prompt, null, SAMPLER, config)
    return meter.peak


def test_one_update_holds_the_same_bytes_whatever_the_loss_steps_and_cutouts(tiny_components, tiny_classifiers):
    """What stays alive for backward is one pass of views: not K x B x V classifier graphs."""
    engine = GuidedDDIM(tiny_components)
    f = tiny_classifiers[0]
    small = _peak_saved_bytes(engine, f, loss_steps=1, cutouts=2, views_per_pass=2)
    large = _peak_saved_bytes(engine, f, loss_steps=3, cutouts=8, views_per_pass=2)
    # The K latents that the checkpointed decodes keep are a few kB; the classifier graphs of a pass are MBs.
    assert large <= 1.05 * small, (small, large)
    # Control: the meter sees the classifier graphs grow where a pass holds more views.
    assert _peak_saved_bytes(engine, f, loss_steps=1, cutouts=8, views_per_pass=8) > 2 * small


def test_the_meter_counts_what_a_graph_holds_until_it_is_freed():
    meter = SavedTensorMeter()
    x = torch.randn(1000, requires_grad=True)  # 4000 bytes
    with meter.measure():
        y = (x * 2).exp()  # exp saves its output (4000 bytes); x * 2 saves nothing (a constant factor)
        assert meter.current == 4000
        z = (y.sin() * torch.randn(1000)).sum()  # sin saves y (already counted); mul saves the constant: not counted
        assert meter.current == 4000
        z.backward()
    del y, z
    assert meter.peak == 4000 and meter.current == 0


# -- the memory plan -----------------------------------------------------------------------


def test_the_plan_prefers_fewer_views_a_pass_to_recomputing_the_chain():
    footprint = StepFootprint(ddim_step=100, decode=10, view=50)  # T=10, B=2, K=3, V=16
    plan = lambda budget, **kw: plan_memory(footprint, budget, 2, 10, 3, 16, **kw)  # noqa: E731
    # chain 1000 + decodes 60, views 800: all fits.
    assert plan(2000) == MemoryPlan(False, 16)
    # The chain and decodes fit, not every view: 4 views a pass, no recomputation.
    assert plan(1260) == MemoryPlan(False, 4)
    # The chain alone does not fit: checkpointed (100 + 20 held), then as many views as fit.
    assert plan(1000) == MemoryPlan(True, 16)
    assert plan(400) == MemoryPlan(True, 5)
    # Nothing fits: the least the update can hold.
    assert plan(10) == MemoryPlan(True, 1)
    # Given choices are kept.
    assert plan(2000, checkpoint=True) == MemoryPlan(True, 16)
    assert plan(1260, fixed_views=True) == MemoryPlan(True, 16)


def test_cuda_memory_counts_the_allocators_unused_reserve(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4 * 2**30)
    assert memory.available_memory(torch.device("cuda", 0)) == (3 + 10 - 4) * 2**30


def test_a_run_plans_once_and_probes_one_decode(tiny_components, monkeypatch):
    """The plan of the first batch holds for the run, however the free memory moves after
    it; the decode is measured on one image, not K x B."""
    from digin_cli.engine import guided_ddim

    engine = GuidedDDIM(tiny_components)
    free = {"bytes": 64 * 2**30}
    monkeypatch.setattr(guided_ddim, "available_memory", lambda device: free["bytes"])
    decoded = []
    original = GuidedDDIM.decode

    def spy(self, latents, use_checkpoint=False):
        if torch.is_grad_enabled() and not use_checkpoint:
            decoded.append(latents.shape[0])
        return original(self, latents, use_checkpoint)

    monkeypatch.setattr(GuidedDDIM, "decode", spy)
    z_T, prompt, null = _inputs(engine, [0, 1, 2])

    def brightness(inputs):
        return ObjectiveOutput(loss=inputs.views.mean(dim=(1, 2, 3, 4)))

    config = OptimConfig(steps=1, loss_steps=3, num_cutouts=2)
    assert engine._with_memory_plan(brightness, Variables.create(z_T, prompt, null, 4, config.resolved(engine.components),
                                    "cpu"), SAMPLER, config.resolved(engine.components)).gradient_checkpointing is False  # fmt: skip
    assert decoded == [1], "the probe decodes one image"
    free["bytes"] = 1  # the allocator filled up after the first batch
    for batch in ([0, 1], [0, 1, 2]):
        z, p, n = z_T[: len(batch)], prompt[: len(batch)], null[: len(batch)]
        planned = engine._with_memory_plan(brightness, Variables.create(z, p, n, 4, config.resolved(engine.components),
                                           "cpu"), SAMPLER, config.resolved(engine.components))  # fmt: skip
        assert planned.gradient_checkpointing is False and planned.views_per_pass == 2
    # A larger batch than the run planned for is planned again.
    z, p, n = torch.cat([z_T, z_T]), torch.cat([prompt, prompt]), torch.cat([null, null])
    planned = engine._with_memory_plan(brightness, Variables.create(z, p, n, 4, config.resolved(engine.components), "cpu"),
                                       SAMPLER, config.resolved(engine.components))  # fmt: skip
    assert planned.gradient_checkpointing is True


# -- fp16 ----------------------------------------------------------------------------------


def _gradients(components, unet_dtype, loss_scaling: bool | None = None):
    engine = GuidedDDIM(components, unet_dtype=unet_dtype)
    if loss_scaling is not None:
        engine.loss_scaling = loss_scaling
    z_T, prompt, null = _inputs(engine, [0])

    def faint_brightness(inputs):  # a loss as small as a saturated class probability's
        return ObjectiveOutput(loss=1e-3 * inputs.views.mean(dim=(1, 2, 3, 4)))

    return engine.first_gradients(faint_brightness, z_T, prompt, null, SAMPLER, OptimConfig(loss_steps=2, num_cutouts=2))


def test_fp16_loss_scaling_keeps_the_gradients_of_fp32(tiny_components):
    reference = _gradients(tiny_components, None)
    scaled = _gradients(tiny_components, torch.float16)
    for name in ("latent", "prompt", "null"):
        assert scaled[name].abs().max() > 0, f"the {name} gradient underflowed to zero"
        cosine = F.cosine_similarity(scaled[name].flatten(), reference[name].flatten(), dim=0)
        assert cosine >= 0.99, (name, float(cosine))
    # Control: without scaling, fp16 loses these gradients (the embeddings' to exactly zero).
    unscaled = _gradients(tiny_components, torch.float16, loss_scaling=False)
    assert unscaled["prompt"].abs().max() == 0 and unscaled["null"].abs().max() == 0


def test_an_overflowing_fp16_step_is_skipped(tiny_components):
    """Gradients that overflowed (inf) leave the variables as they were, and the scale drops."""
    engine = GuidedDDIM(tiny_components, unet_dtype=torch.float16)
    z_T, prompt, null = _inputs(engine, [0])
    config = OptimConfig(loss_steps=1, num_cutouts=2).resolved(tiny_components)
    variables = Variables.create(z_T, prompt, null, 4, config, "cpu", loss_scaling=True)
    before = variables.latent.detach().clone()
    variables.scaler.scale(variables.latent.sum() * float("inf")).backward()  # an overflowed fp16 backward
    assert torch.isinf(variables.latent.grad).all()
    scale = variables.scaler.get_scale()
    variables.update()
    assert torch.equal(variables.latent.detach(), before)
    assert variables.scaler.get_scale() < scale


def test_a_non_finite_inversion_is_not_cached(tiny_components, monkeypatch, digin_cache):
    from digin_cli.inversion import Inversion, InversionConfig
    from digin_cli.tasks import real_images

    def broken(engine, images, prompts, null, sampler, config):
        shape = engine.components.latent_shape
        return [Inversion(torch.full((1, *shape), float("nan")), torch.zeros(4, 1, 77, 32), torch.zeros(1, *shape),
                          float("nan"), float("nan"), float("nan"), float("nan"), 0.0)]  # fmt: skip

    monkeypatch.setattr(real_images, "null_text_inversions", broken)
    engine = GuidedDDIM(tiny_components)
    image = torch.rand(1, 3, 64, 64)
    before = set((digin_cache / "inversions").glob("*.pt")) if (digin_cache / "inversions").exists() else set()
    ((inversion, hit),) = real_images.invert_cached_batch(engine, [image], ["an image of a circle"], SAMPLER,
                                                          InversionConfig(inner_steps=1))  # fmt: skip
    assert not hit and torch.isnan(inversion.z_T).all()
    after = set((digin_cache / "inversions").glob("*.pt")) if (digin_cache / "inversions").exists() else set()
    assert after == before, "a NaN inversion was written to the cache"


# -- prompt-to-prompt recordings -------------------------------------------------------------


def test_recorded_attention_maps_own_their_storage(tiny_components):
    from digin_cli.attention import AttentionControl, attach

    engine = GuidedDDIM(tiny_components)
    z_T, prompt, null = _inputs(engine, [0, 1])
    control = AttentionControl()
    control.record(store_steps=2, map_steps=0, map_tokens=None, map_side=16)
    with attach(engine, control):
        engine.sample(z_T, prompt, null, SAMPLER)
    assert control.stored, "nothing was recorded"
    for key, stored in control.stored.items():
        # A slice of the layer's (2B x heads, Q, L) probabilities would keep all of them alive.
        assert stored.untyped_storage().nbytes() == stored.numel() * stored.element_size(), key
        assert stored.dtype == torch.float16


# -- torch.compile -------------------------------------------------------------------------


def test_compiled_unet_inside_checkpointing_gives_the_eager_gradients(tiny_components):
    """Real TorchInductor on the CPU: the compiled UNet, recomputed inside checkpointing in
    backward, gives the eager engine's gradients."""
    z_T = initial_latents(tiny_components, [0])

    def brightness(inputs):
        return ObjectiveOutput(loss=inputs.views.mean(dim=(1, 2, 3, 4)))

    config = OptimConfig(loss_steps=1, num_cutouts=2, gradient_checkpointing=True)
    results = {}
    for compiled in (False, True):
        engine = GuidedDDIM(tiny_components, compile_unet=compiled)
        prompt, null = engine.encode_text(["a circle"]), engine.null_embedding()
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompileFallbackWarning)  # no silent fall-back to eager
            results[compiled] = engine.first_gradients(brightness, z_T, prompt, null, SamplerConfig(2), config)
    for name in ("latent", "prompt"):
        assert torch.allclose(results[True][name], results[False][name], rtol=1e-3, atol=1e-6 * results[False][name].abs().max())


def test_a_compile_failure_falls_back_to_eager_with_one_warning(tiny_components):
    from torch._dynamo.exc import BackendCompilerFailed

    z_T = initial_latents(tiny_components, [0])

    def brightness(inputs):
        return ObjectiveOutput(loss=inputs.views.mean(dim=(1, 2, 3, 4)))

    eager = GuidedDDIM(tiny_components)
    prompt, null = eager.encode_text(["a circle"]), eager.null_embedding()
    config = OptimConfig(steps=2, loss_steps=1, num_cutouts=2)
    expected = eager.optimize(brightness, z_T, prompt, null, SamplerConfig(2), config)

    engine = GuidedDDIM(tiny_components)
    calls = []

    def failing_compiled_unet(*args, **kwargs):
        calls.append(1)
        raise BackendCompilerFailed("inductor", RuntimeError("no working C compiler"), None)

    engine.compiled_unet = failing_compiled_unet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = engine.optimize(brightness, z_T, prompt, null, SamplerConfig(2), config)
    fallbacks = [w for w in caught if issubclass(w.category, CompileFallbackWarning)]
    assert len(fallbacks) == 1 and "no working C compiler" in str(fallbacks[0].message)
    assert calls == [1] and engine.compiled_unet is None
    assert torch.equal(result.best_images, expected.best_images)
