"""The guided-DDIM engine on tiny models: equivalence with diffusers, gradients, optimization."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from digin_cli.engine import GuidedDDIM, HoldRegion, OptimConfig, SamplerConfig, initial_latents, make_cutouts
from digin_cli.objectives import Disagreement, ObjectiveInput, ObjectiveOutput


def _pipeline(components) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=components.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sampler_matches_stable_diffusion_pipeline(tiny_components, prediction_type):
    components = tiny_components
    components.scheduler = DDIMScheduler.from_config(components.scheduler.config, prediction_type=prediction_type)
    engine = GuidedDDIM(components)
    prompts = ["a photograph of a circle", "a photograph of a star"]
    z_T = initial_latents(components, [0, 1])  # (2, 4, 16, 16)
    sampler = SamplerConfig(num_steps=6, guidance_scale=3.0)

    ours = engine.sample(z_T, engine.encode_text(prompts), engine.encode_text([""] * 2), sampler)
    reference = _pipeline(components)(
        prompts, num_inference_steps=6, guidance_scale=3.0, latents=z_T.clone(), output_type="pt"
    ).images  # (2, 3, 64, 64) in [0, 1]

    assert ours.shape == reference.shape == (2, 3, 64, 64)
    assert (ours - reference).abs().max().item() < 1e-4


def test_checkpointed_chain_gives_same_values_and_gradients(tiny_components):
    engine = GuidedDDIM(tiny_components)
    T = 4
    z_T = initial_latents(tiny_components, [3])
    prompt = engine.encode_text(["a photograph of a bar"]).expand(T, -1, -1, -1)  # (T, 1, L, D)
    null = engine.encode_text([""]).expand(T, -1, -1, -1)
    results = []
    for use_checkpoint in (False, True):
        z = z_T.clone().requires_grad_(True)
        z_0, kept = engine.run_chain(z, prompt, null, 3.0, keep_last=2, use_checkpoint=use_checkpoint)
        assert len(kept) == 2
        engine.decode(z_0, use_checkpoint=use_checkpoint).mean().backward()
        results.append((z_0.detach(), z.grad.clone()))
    (z0_plain, grad_plain), (z0_ckpt, grad_ckpt) = results
    assert torch.allclose(z0_plain, z0_ckpt, atol=1e-6)
    assert torch.allclose(grad_plain, grad_ckpt, atol=1e-6)
    assert grad_plain.abs().sum() > 0


def test_gradients_reach_every_variable_and_no_weight(tiny_components, tiny_classifiers):
    f, g = tiny_classifiers
    engine = GuidedDDIM(tiny_components)
    T = 3
    z = initial_latents(tiny_components, [0]).requires_grad_(True)
    prompt_delta = torch.zeros(T, 1, 77, 32, requires_grad=True)
    null_delta = torch.zeros(T, 1, 77, 32, requires_grad=True)
    prompt = engine.encode_text(["a photograph of a star"]) + prompt_delta  # (T, 1, L, D)
    null = engine.encode_text([""]) + null_delta
    _, kept = engine.run_chain(z, prompt, null, 3.0, keep_last=1, use_checkpoint=True)
    images = engine.decode(kept[-1], use_checkpoint=True)
    views = make_cutouts(images, 4, 64, 0.5, 0.005, [torch.Generator().manual_seed(0)])
    Disagreement(f, g, 3)(ObjectiveInput(images, kept[-1], views)).loss.sum().backward()

    for name, variable in (("z_T", z), ("prompt delta", prompt_delta), ("null delta", null_delta)):
        assert variable.grad is not None and variable.grad.abs().sum() > 0, name
    # Every step's delta gets a gradient, not only the last one.
    assert (prompt_delta.grad.flatten(1).abs().sum(1) > 0).all()
    modules = [tiny_components.unet, tiny_components.vae, tiny_components.text_encoder, f, g]
    for module in modules:
        for name, parameter in module.named_parameters():
            assert parameter.grad is None, name
            assert not parameter.requires_grad, name


def test_make_cutouts_shapes_determinism_and_gradient():
    images = torch.rand(2, 3, 64, 48, requires_grad=True)
    a = make_cutouts(images, 5, 32, 0.5, 0.0, [torch.Generator().manual_seed(1) for _ in range(2)])
    b = make_cutouts(images, 5, 32, 0.5, 0.0, [torch.Generator().manual_seed(1) for _ in range(2)])
    assert a.shape == (2, 5, 3, 32, 32)
    assert torch.equal(a, b)
    # Each item's cutouts come from that item only.
    a[0].sum().backward()
    assert images.grad[0].abs().sum() > 0 and images.grad[1].abs().sum() == 0


def test_disagreement_improves_and_respects_switches(tiny_components, tiny_classifiers):
    f, g = tiny_classifiers
    engine = GuidedDDIM(tiny_components)
    seeds = [0, 1]
    z_T = initial_latents(tiny_components, seeds)
    prompt = engine.encode_text(["a photograph of a circle"] * 2)
    null = engine.encode_text([""] * 2)
    sampler = SamplerConfig(num_steps=5, guidance_scale=3.0)
    objective = Disagreement(f, g, 2)
    reports = []
    config = OptimConfig(steps=8, lr_latent=5e-2, loss_steps=2, num_cutouts=4)
    result = engine.optimize(objective, z_T, prompt, null, sampler, config, on_step=reports.append)

    assert [r.step for r in reports] == list(range(9))
    assert len(result.history) == 9
    for item in range(2):
        start, end = result.history[0]["loss"][item], result.history[-1]["loss"][item]
        assert end < start - 0.01, (item, start, end)
        best = result.best(item)
        assert best["loss"] == min(h["loss"][item] for h in result.history)
        assert best["loss"] == pytest.approx(-(best["p_f"] - best["p_g"]), abs=1e-6)
    # z_T stays on its initial sphere (projection after every update).
    assert torch.allclose(result.best_latents.flatten(1).norm(dim=1), z_T.flatten(1).norm(dim=1), rtol=1e-5)
    # Iterate 0 is the plain DDIM sample.
    plain = engine.sample(z_T, prompt, null, sampler)
    assert (result.initial_images - plain).abs().max() < 1e-5

    frozen = OptimConfig(steps=3, optimize_latent=False, loss_steps=2, num_cutouts=4)
    result = engine.optimize(objective, z_T, prompt, null, sampler, frozen)
    assert torch.equal(result.best_latents, z_T)

    nothing = OptimConfig(steps=3, optimize_latent=False, optimize_prompt=False, optimize_null=False)
    result = engine.optimize(objective, z_T, prompt, null, sampler, nothing)
    assert len(result.history) == 1 and result.best_steps == [0, 0]


def test_held_region_follows_the_reference_trajectory(tiny_components, tiny_classifiers):
    """Held latent cells end where the unoptimized start's chain ends, whatever the optimization
    does; the rest of the latent moves; all held, nothing moves at all."""
    f, g = tiny_classifiers
    engine = GuidedDDIM(tiny_components)
    z_T = initial_latents(tiny_components, [0, 1])  # (2, 4, 16, 16)
    prompt = engine.encode_text(["a photograph of a circle"] * 2)
    null = engine.encode_text([""] * 2)
    sampler = SamplerConfig(num_steps=4, guidance_scale=3.0)
    T = sampler.num_steps
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 4:10, 2:8] = 1  # item 0 holds a block, item 1 nothing
    prompt_embs, null_embs = prompt.expand(T, -1, -1, -1), null.expand(T, -1, -1, -1)  # (T, 2, L, D)
    reference = engine.reference_trajectory(z_T, prompt_embs, null_embs, 3.0, HoldRegion(mask))
    assert reference.latents.shape == (T + 1, 2, 4, 16, 16) and reference.x0.shape == (T, 2, 4, 16, 16)
    plain_z0, _ = engine.run_chain(z_T, prompt_embs, null_embs, 3.0)
    assert torch.allclose(reference.latents[-1], plain_z0, atol=1e-6)

    other = initial_latents(tiny_components, [5, 6])
    z0, kept = engine.run_chain(other, prompt_embs, null_embs, 3.0, keep_last=1, hold=reference)
    held = mask.bool().expand_as(z0)
    assert torch.equal(z0[held], plain_z0[held])
    assert torch.equal(kept[0][held], reference.x0[-1][held])
    assert (z0[~held] - plain_z0[~held]).abs().mean() > 0.1

    config = OptimConfig(steps=3, lr_latent=5e-2, loss_steps=2, num_cutouts=4)
    everything = HoldRegion(torch.ones(2, 1, 16, 16))
    result = engine.optimize(Disagreement(f, g, 2), z_T, prompt, null, sampler, config, hold=everything)
    assert len(result.history) == 4
    for step in range(4):
        assert result.history[step]["loss"] == pytest.approx(result.history[0]["loss"], abs=1e-6)

    # A pixel mask lays the start's image over every iterate there; elsewhere the images move.
    pixels = torch.zeros(2, 1, 64, 64)
    pixels[:, :, 8:40, 16:48] = 1
    plain = engine.sample(z_T, prompt, null, sampler)  # (2, 3, 64, 64)
    result = engine.optimize(Disagreement(f, g, 2), z_T, prompt, null, sampler, config, hold=HoldRegion(mask, pixels))
    inside = pixels.bool().expand_as(plain)
    assert torch.allclose(result.best_images[inside], plain[inside], atol=1e-5)
    assert (result.best_images[~inside] - plain[~inside]).abs().mean() > 1e-3


def test_optim_config_takes_the_model_folder_learning_rates(tiny_components):
    import dataclasses

    from digin_cli.models.sd_parts import SMALL_MODEL_SETTINGS

    resolved = OptimConfig().resolved(tiny_components, view_size=32)
    assert resolved.lr_prompt == SMALL_MODEL_SETTINGS["prompt_lr"] and resolved.lr_null == SMALL_MODEL_SETTINGS["null_lr"]
    assert resolved.view_size == 32
    explicit = OptimConfig(lr_prompt=0.3, view_size=48).resolved(tiny_components, view_size=32)
    assert explicit.lr_prompt == 0.3 and explicit.view_size == 48
    hub_like = dataclasses.replace(tiny_components, settings={})  # a model folder without digin.json
    reference = OptimConfig().resolved(hub_like)
    assert reference.lr_prompt == reference.lr_null == 1e-2 and reference.view_size == hub_like.resolution


def test_compiled_unet_runs_only_inside_optimize_without_attention_control(tiny_components):
    """--compile: the compiled UNet serves the optimization steps (fixed shapes); sampling,
    inversion and attention-controlled runs stay eager (they would force recompiles)."""
    from digin_cli.attention import AttentionControl, attach

    engine = GuidedDDIM(tiny_components)
    calls = []

    def compiled(*args, **kwargs):  # stands in for torch.compile(unet): same results, counted
        calls.append(args[0].shape[0])
        return tiny_components.unet(*args, **kwargs)

    engine.compiled_unet = compiled
    z_T = initial_latents(tiny_components, [0])
    prompt, null = engine.encode_text(["a red circle"]), engine.encode_text([""])
    sampler = SamplerConfig(num_steps=3)
    engine.sample(z_T, prompt, null, sampler)
    assert calls == []
    brightness = lambda inputs: ObjectiveOutput(loss=inputs.views.mean(dim=(1, 2, 3, 4)))  # noqa: E731
    optim = OptimConfig(steps=1, num_cutouts=2, loss_steps=1)
    engine.optimize(brightness, z_T, prompt, null, sampler, optim)
    assert calls and set(calls) == {2}  # [uncond; cond] of one item, at every step
    used = len(calls)
    with attach(engine, AttentionControl()):
        engine.optimize(brightness, z_T, prompt, null, sampler, optim)
    assert len(calls) == used
    engine.sample(z_T, prompt, null, sampler)
    assert len(calls) == used


# -- the sampler step in digin's own hands (engine/ddim.py) ---------------------------------


def test_trailing_spacing_takes_the_previous_timestep_from_the_schedule(tiny_components):
    components = tiny_components
    components.scheduler = DDIMScheduler.from_config(components.scheduler.config, timestep_spacing="trailing")
    engine = GuidedDDIM(components)
    timesteps = engine.timesteps(7)
    # DDIMScheduler.step would go from 999 to 999 - 1000 // 7 = 857, which is not in the schedule.
    assert timesteps[:2] == [999, 856]
    alphas = components.scheduler.alphas_cumprod
    x, eps = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    z, x0 = engine.ddim_step(eps, 0, x)
    a_t, a_prev = alphas[999], alphas[856]
    assert torch.allclose(x0, (x - (1 - a_t).sqrt() * eps) / a_t.sqrt(), atol=1e-5)
    assert torch.allclose(z, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, atol=1e-5)
    assert not torch.allclose(z, components.scheduler.step(eps, 999, x).prev_sample, atol=1e-4)
    # The last step lands on the final alpha, as the schedule ends there.
    z_last, x0_last = engine.ddim_step(eps, len(timesteps) - 1, x)
    final = components.scheduler.final_alpha_cumprod
    assert torch.allclose(z_last, final.sqrt() * x0_last + (1 - final).sqrt() * eps, atol=1e-5)


def test_an_euler_config_samples_without_clamping(tiny_folder, tmp_path):
    """SD-Turbo and SDXL folders ship an Euler scheduler config without clip_sample, which
    DDIMScheduler would default to True (x0 clamped to [-1, 1] in latent space)."""
    import json
    import shutil

    from diffusers import EulerDiscreteScheduler

    from digin_cli.models import load_diffusion

    folder = tmp_path / "euler"
    shutil.copytree(tiny_folder, folder)
    euler = {  # as SD-Turbo ships it
        "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
        "timestep_spacing": "trailing", "use_karras_sigmas": False,
    }  # fmt: skip
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(euler))
    EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")  # a valid Euler folder
    components = load_diffusion(str(folder))
    assert components.scheduler.config.clip_sample is False and components.scheduler.config.timestep_spacing == "trailing"
    engine = GuidedDDIM(components)
    timesteps = engine.timesteps(3)
    x, eps = 4 * torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    _, x0 = engine.ddim_step(eps, 1, x)
    assert x0.abs().max() > 1.5, "x0 is not clamped"
    clamping = DDIMScheduler.from_config(components.scheduler.config, clip_sample=True)
    clamping.set_timesteps(3)
    assert clamping.step(eps, timesteps[1], x).pred_original_sample.abs().max() <= 1.0  # what was there before


def test_guidance_zero_is_the_conditional_prediction_with_one_unet_call(tiny_components):
    components = tiny_components
    engine = GuidedDDIM(components)
    prompts = ["a photograph of a circle", "a photograph of a star"]
    z_T = initial_latents(components, [0, 1])
    batches = []
    hook = components.unet.register_forward_hook(lambda _m, inputs, _o: batches.append(inputs[0].shape[0]))
    try:
        ours = engine.sample(z_T, engine.encode_text(prompts), engine.encode_text([""] * 2), SamplerConfig(4, guidance_scale=0.0))
    finally:
        hook.remove()
    assert batches == [2, 2, 2, 2], "one conditional UNet call a step, not the batched pair"
    reference = _pipeline(components)(prompts, num_inference_steps=4, guidance_scale=0.0, latents=z_T.clone(),
                                      output_type="pt").images  # fmt: skip
    assert (ours - reference).abs().max() < 1e-4


def test_without_guidance_the_null_embedding_is_no_variable(tiny_components, tiny_classifiers):
    engine = GuidedDDIM(tiny_components)
    f, g = tiny_classifiers
    z_T = initial_latents(tiny_components, [0])
    null = engine.encode_text([""])
    result = engine.optimize(Disagreement(f, g, 0), z_T, engine.encode_text(["a circle"]), null, SamplerConfig(3, guidance_scale=1.0),
                             OptimConfig(steps=2, loss_steps=1, num_cutouts=2))  # fmt: skip
    assert len(result.history) == 3 and result.best_latents.shape == z_T.shape
