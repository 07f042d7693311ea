"""DDIM inversion and null-text inversion of a real image (Mokady et al. 2023).

DDIM inversion runs the deterministic sampler backwards with the caption's embedding
(guidance 1) and gives a z_T; sampled forward with classifier-free guidance it does
not come back to the image, because guidance pulls the trajectory away. Null-text
inversion then optimizes, step by step, the null (unconditional) embedding so that
the guided forward trajectory lands on the DDIM-inversion trajectory. The result,
z_T plus one null embedding per step, reconstructs the image under the same guidance
scale the counterfactual is sampled with.

Like the engine, this knows nothing of files; the cache of inversions lives in
``tasks/real_images.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from digin_cli.engine import REFERENCE_LR_EMBEDDING, GuidedDDIM, SamplerConfig
from digin_cli.engine.guided_ddim import uses_guidance
from digin_cli.metrics import psnr


@dataclass
class InversionConfig:
    inner_steps: int = 10  # Adam iterations per DDIM step; reference 10
    # Decays as lr * (1 - i / 100) over steps i. None: the model's own default (digin.json),
    # else the reference 1e-2, which suits Stable Diffusion; the small built-in models
    # respond less to their null embedding and need 0.1 (measured: 8.5 -> 24.4 dB).
    lr: float | None = None
    early_stop: float = 1e-5  # stop a step when latent MSE < early_stop + i * 2e-5; reference


@dataclass
class Inversion:
    z_T: torch.Tensor  # (1, C, h, w)
    null_embs: torch.Tensor  # (T, 1, L, D) one optimized null-text embedding per DDIM step
    image_latents: torch.Tensor  # (1, C, h, w) E(x), scaled as the UNet sees latents
    psnr_ddim: float  # reconstruction PSNR of plain DDIM inversion under guidance, dB
    psnr_null_text: float  # reconstruction PSNR after null-text inversion, dB
    latent_mse_ddim: float  # mean squared distance of the reconstructed z_0 to E(x), plain DDIM inversion
    latent_mse_null_text: float  # the same after null-text inversion
    seconds: float  # this image's share of its batch's time


def is_finite(inversion: Inversion) -> bool:
    """Every tensor of the inversion is finite (an fp16 overflow leaves NaN or inf)."""
    return all(bool(torch.isfinite(t).all()) for t in (inversion.z_T, inversion.null_embs, inversion.image_latents))


@torch.no_grad()
def encode_image(engine: GuidedDDIM, image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> latents (B, C, h, w) (posterior mean, times the VAE scaling)."""
    vae = engine.components.vae
    posterior = vae.encode(image.to(engine.device) * 2 - 1).latent_dist
    return posterior.mean * vae.config.scaling_factor


@torch.no_grad()
def ddim_inversion(engine: GuidedDDIM, latents: torch.Tensor, prompt_emb: torch.Tensor, num_steps: int) -> list[torch.Tensor]:
    """Trajectory z_0 ... z_T (num_steps + 1 latents, each (B, C, h, w)) by inverse DDIM, guidance 1,
    from latents (B, C, h, w) under their captions' embeddings `prompt_emb` (B, L, D).

    The forward schedule walked backwards, each step the inverse of the forward step
    (engine.inverse_ddim_step), so every spacing the sampler takes (leading, trailing,
    linspace) inverts; diffusers' DDIMInverseScheduler has no linspace spacing and takes
    t - 1000 // N as the step it comes from. Where that is right, the values are its own.
    """
    timesteps = engine.timesteps(num_steps)  # descending
    trajectory = [latents]
    for index in reversed(range(num_steps)):
        noise = engine.predict_noise(trajectory[-1], timesteps[index], prompt_emb)
        trajectory.append(engine.inverse_ddim_step(noise, index, trajectory[-1]))
    return trajectory


def resolved_lr(engine: GuidedDDIM, config: InversionConfig) -> float:
    """The null-text learning rate: given, else the model's digin.json default, else the reference."""
    if config.lr is not None:
        return config.lr
    return float(engine.components.settings.get("inversion_lr", REFERENCE_LR_EMBEDDING))


def null_text_inversion(
    engine: GuidedDDIM,
    image: torch.Tensor,
    prompt_emb: torch.Tensor,
    null_emb: torch.Tensor,
    sampler: SamplerConfig,
    config: InversionConfig | None = None,
) -> Inversion:
    """Invert one image (1, 3, H, W) in [0, 1] under `prompt_emb` (1, L, D) and guidance `sampler.guidance_scale`."""
    return null_text_inversions(engine, image, prompt_emb, null_emb, sampler, config)[0]


def null_text_inversions(
    engine: GuidedDDIM,
    images: torch.Tensor,
    prompt_embs: torch.Tensor,
    null_emb: torch.Tensor,
    sampler: SamplerConfig,
    config: InversionConfig | None = None,
) -> list[Inversion]:
    """Invert B images (B, 3, H, W) in [0, 1], each under its own caption embedding (B, L, D),
    in one batch: every UNet call runs the images together (on a 2-core CPU a batch of 8
    of the shapes model took 0.7 s an image, alone 2.9 s). Each image's inversion is its
    own: its losses are summed (Adam is elementwise) and it stops early on its own loss, as
    when inverted alone. `null_emb` (1, L, D) is the unconditional embedding they start from."""
    config = config or InversionConfig()
    lr = resolved_lr(engine, config)
    started = time.perf_counter()
    T, guidance, batch = sampler.num_steps, sampler.guidance_scale, images.shape[0]
    # 1. Encode the images and invert them with plain DDIM (guidance 1).
    images = images.to(engine.device)
    latents = encode_image(engine, images)  # (B, C, h, w)
    trajectory = ddim_inversion(engine, latents, prompt_embs, T)  # z_0 ... z_T, each (B, C, h, w)
    z_T = trajectory[-1]
    timesteps = engine.timesteps(T)  # descending, as the forward sampler uses them
    prompt_per_step = prompt_embs.expand(T, -1, -1, -1)  # (T, B, L, D)

    # 2. Optimize one null embedding per image and step (null-text inversion proper).
    if uses_guidance(guidance):
        null_embs_t, current = _optimize_null_embeddings(engine, trajectory, prompt_embs, null_emb, timesteps, guidance, lr,
                                                         config)  # fmt: skip
    else:
        # Without guidance the sampler never reads a null embedding (one conditional UNet call
        # a step): plain DDIM inversion is the inversion, its PSNR reported as both.
        null_embs_t = null_emb.detach().expand(T, batch, -1, -1).clone()  # (T, B, L, D)
        with torch.no_grad():
            current, _ = engine.run_chain(z_T, prompt_per_step, null_embs_t, guidance)

    # 3. How well each image comes back: null-text inversion, and plain DDIM inversion
    #    sampled back under the same guidance for comparison.
    with torch.no_grad():
        plain, _ = engine.run_chain(z_T, prompt_per_step, null_emb.expand(T, batch, -1, -1), guidance)
        plain_images, null_text_images = engine.decode(plain), engine.decode(current)  # (B, 3, H, W)
    seconds = (time.perf_counter() - started) / batch  # each image's share of the batch
    return [
        Inversion(
            z_T=z_T[b : b + 1].cpu(),
            null_embs=null_embs_t[:, b : b + 1].cpu(),
            image_latents=latents[b : b + 1].cpu(),
            psnr_ddim=psnr(plain_images[b : b + 1], images[b : b + 1]),
            psnr_null_text=psnr(null_text_images[b : b + 1], images[b : b + 1]),
            latent_mse_ddim=F.mse_loss(plain[b], latents[b]).item(),
            latent_mse_null_text=F.mse_loss(current[b], latents[b]).item(),
            seconds=seconds,
        )
        for b in range(batch)
    ]


def _optimize_null_embeddings(engine: GuidedDDIM, trajectory: list[torch.Tensor], prompt_embs: torch.Tensor,
                              null_emb: torch.Tensor, timesteps: list[int], guidance: float, lr: float,
                              config: InversionConfig) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Null-text inversion proper: per DDIM step, Adam on each image's null embedding until its
    guided step lands on its DDIM-inversion trajectory. Returns ((T, B, L, D) null embeddings, z_0 (B, C, h, w))."""
    T = len(timesteps)
    current = trajectory[-1]  # (B, C, h, w)
    batch = current.shape[0]
    null_embs = []
    null = null_emb.detach().expand(batch, -1, -1).clone()  # (B, L, D)
    # fp16 loss scaling, as in the optimization (engine/loop.py Variables.scaler); one scale for every step.
    scaler = torch.amp.GradScaler(engine.device.type, enabled=engine.loss_scaling)
    for i, t in enumerate(timesteps):
        target = trajectory[T - i - 1]  # (B, C, h, w)
        with torch.no_grad():
            noise_cond = engine.predict_noise(current, t, prompt_embs)
        null = null.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([null], lr=lr * (1.0 - i / 100.0))
        running = torch.ones(batch, dtype=torch.bool, device=null.device)  # (B,) the images still optimizing
        for _ in range(config.inner_steps):
            # Every image goes through the UNet, the finished ones with no loss: picking the
            # running rows out (nonzero, boolean indexing) would wait on the device each time.
            noise_uncond = engine.predict_noise(current, t, null)
            guided = noise_uncond + guidance * (noise_cond - noise_uncond)
            previous, _ = engine.ddim_step(guided, i, current)
            losses = F.mse_loss(previous, target, reduction="none").flatten(1).mean(dim=1)  # (B,) each image's MSE
            optimizer.zero_grad(set_to_none=True)
            scaler.scale((losses * running).sum()).backward()
            kept = null.detach().clone()
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                # Images that stopped earlier keep their embedding: Adam's momentum would move them.
                null.copy_(torch.where(running.view(-1, 1, 1), null, kept))
            running = running & (losses.detach() >= config.early_stop + i * 2e-5)
            if not running.any():  # the inner step's one wait on the device: whether to stop
                break
        null = null.detach()
        null_embs.append(null)
        with torch.no_grad():
            current, _ = engine.denoise_step(current, t, prompt_embs, null, guidance, i)

    return torch.stack(null_embs), current  # (T, B, L, D), (B, C, h, w)
