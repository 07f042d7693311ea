"""The guided-DDIM engine: differentiable DDIM sampling and the DiG-IN optimization loop.

This module knows nothing of files, terminals or argument parsing. It receives
diffusers components, an objective (see ``objectives.py``) and configs, and
returns tensors and numbers. Progress is reported through a callback.

Notation follows the paper: z_T is the initial latent, C_t the per-step prompt
embedding, null_t the per-step null-text embedding, and the image is D(z_0).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch.utils.checkpoint import checkpoint
from torchvision.ops import roi_align
from transformers import CLIPTextModel, CLIPTokenizer

from digin_cli.objectives import Objective, ObjectiveInput


@dataclass
class DiffusionComponents:
    """The parts of a Stable-Diffusion-style pipeline the engine needs, all frozen."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    source: str = ""  # where they were loaded from, for the run record
    # Model-specific defaults shipped with a model folder in digin.json (e.g. the
    # null-text inversion learning rate of the small built-in models).
    settings: dict = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor


@dataclass
class SamplerConfig:
    num_steps: int = 20  # DDIM steps; the reference uses 20 with eta = 0
    guidance_scale: float = 3.0  # classifier-free guidance; reference 3.0


REFERENCE_LR_EMBEDDING = 1e-2  # the reference's Adam lr for the prompt and null-text deltas (SD 1.x)


@dataclass
class OptimConfig:
    steps: int = 20  # Adam steps; reference 20
    lr_latent: float = 1e-3  # z_T; reference 1e-3
    # Embedding-delta learning rates; None = the model's default from its digin.json
    # ("prompt_lr" / "null_lr"), else the reference 1e-2. See OptimConfig.resolved.
    lr_prompt: float | None = None
    lr_null: float | None = None
    optimize_latent: bool = True
    optimize_prompt: bool = True
    optimize_null: bool = True
    loss_steps: int = 3  # loss on the x0-prediction of the last K DDIM steps, weights 1:2:...:K
    num_cutouts: int = 16  # augmented classifier views per item while optimizing
    cutout_min_scale: float = 0.5  # smallest cutout side as a share of the image side
    cutout_noise_std: float = 0.005  # Gaussian noise added to each cutout
    view_size: int | None = None  # cutout side in pixels; None = image resolution
    seed: int = 0  # seeds the cutout randomness, so runs repeat exactly
    gradient_checkpointing: bool = True  # per-UNet-call checkpointing: memory flat in num_steps
    checkpoint_decode: bool = True  # with gradient_checkpointing, also recompute the VAE decodes of the loss

    def resolved(self, components: DiffusionComponents, view_size: int | None = None) -> OptimConfig:
        """A copy with every default made concrete, as it will run and be recorded.

        Learning rates left as None take the model folder's defaults (digin.json), else the
        reference 1e-2; the view size falls back to `view_size` (the classifier's input
        size), else the image resolution.
        """
        settings = components.settings
        return replace(
            self,
            lr_prompt=float(settings.get("prompt_lr", REFERENCE_LR_EMBEDDING)) if self.lr_prompt is None else self.lr_prompt,
            lr_null=float(settings.get("null_lr", REFERENCE_LR_EMBEDDING)) if self.lr_null is None else self.lr_null,
            view_size=self.view_size or view_size or components.resolution,
        )


@dataclass
class StepReport:
    """What the engine tells its caller after evaluating one iterate."""

    step: int  # iterate index: 0 = unoptimized, `total` = after the last update
    total: int
    loss: torch.Tensor  # (B,) non-augmented loss of this iterate
    metrics: dict[str, torch.Tensor]  # name -> (B,)


@dataclass
class OptimizationResult:
    initial_images: torch.Tensor  # (B, 3, H, W) iterate 0, in [0, 1], on CPU
    best_images: torch.Tensor  # (B, 3, H, W) lowest non-augmented loss, on CPU
    best_steps: list[int]  # per item, which iterate was kept
    best_latents: torch.Tensor  # (B, C, h, w) the z_T of the kept iterate, on CPU
    history: list[dict[str, list[float]]] = field(default_factory=list)  # per iterate: name -> per item
    seconds: float = 0.0

    def at_step(self, step: int, item: int) -> dict[str, float]:
        return {name: values[item] for name, values in self.history[step].items()}

    def initial(self, item: int) -> dict[str, float]:
        return self.at_step(0, item)

    def best(self, item: int) -> dict[str, float]:
        return self.at_step(self.best_steps[item], item)


ProgressCallback = Callable[[StepReport], None]


@dataclass
class HoldRegion:
    """The part of every item that `optimize` keeps as its unoptimized start has it."""

    latent_mask: torch.Tensor  # (B, 1, h, w) in [0, 1], 1 = latents held to the start's trajectory
    # (B, 1, H, W) in [0, 1]: alpha with which the start's decoded image is laid over every
    # decoded image (None: latents only). The decoder reaches across latent cells (its
    # convolutions and mid-block attention), so held latents alone let a changed
    # surrounding repaint a small object.
    pixel_mask: torch.Tensor | None = None


@dataclass
class HeldTrajectory:
    """A region held to a reference DDIM trajectory (Blended Latent Diffusion, Avrahami et
    al. 2023): inside the latent mask each step's latent and x0-prediction are replaced by
    the reference's, so gradients flow through the rest only; with a pixel mask, the
    reference's decoded image is also laid over every decoded image."""

    mask: torch.Tensor  # (B, 1, h, w) in [0, 1], 1 = held
    latents: torch.Tensor  # (T + 1, B, C, h, w): z_T, then z after each of the T steps
    x0: torch.Tensor  # (T, B, C, h, w) the x0-prediction of each step
    pixel_mask: torch.Tensor | None = None  # (B, 1, H, W)
    image: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1], the reference's decoded z_0

    def blend(self, index: int, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> the same with the held region taken from reference latent `index`."""
        return self.mask * self.latents[index] + (1 - self.mask) * latents

    def blend_x0(self, step: int, x0: torch.Tensor) -> torch.Tensor:
        return self.mask * self.x0[step] + (1 - self.mask) * x0

    def composite(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) decoded images -> the reference image laid over them by the pixel mask."""
        if self.pixel_mask is None:
            return images
        return self.pixel_mask * self.image + (1 - self.pixel_mask) * images


def initial_latents(components: DiffusionComponents, seeds: list[int]) -> torch.Tensor:
    """One z_T per seed, drawn on the CPU so a seed gives the same image on every device.

    Returns (B, C, h, w) scaled by the scheduler's init_noise_sigma, as diffusers does.
    """
    shape = components.latent_shape
    latents = [torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    return torch.cat(latents) * components.scheduler.init_noise_sigma


def make_cutouts(
    images: torch.Tensor,
    num_cutouts: int,
    size: int,
    min_scale: float,
    noise_std: float,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """Random square crops, biased to large ones, resized to `size`, plus Gaussian noise.

    images: (B, 3, H, W) -> (B, num_cutouts, 3, size, size). Differentiable in `images`.
    One generator per item: an item's cutouts do not depend on what else is in the batch.
    """
    batch, _, height, width = images.shape
    draws = [[torch.rand(num_cutouts, generator=g) for _ in range(3)] for g in generators]
    u, left_u, top_u = (torch.cat(parts) for parts in zip(*draws))  # (B * num_cutouts,) each
    # Side as a share of the short side; squaring u pushes most draws toward full size.
    side = (1.0 - (1.0 - min_scale) * u**2) * min(height, width)  # (count,)
    left = left_u * (width - side)
    top = top_u * (height - side)
    item = torch.arange(batch).repeat_interleave(num_cutouts).float()
    boxes = torch.stack([item, left, top, left + side, top + side], dim=1)  # (count, 5)
    crops = roi_align(
        images, boxes.to(images), output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True
    )  # (count, 3, size, size)
    noise = torch.cat([torch.randn((num_cutouts, *crops.shape[1:]), generator=g) for g in generators])
    return (crops + noise.to(crops) * noise_std).view(batch, num_cutouts, *crops.shape[1:])


class GuidedDDIM:
    """Differentiable DDIM (eta = 0) with classifier-free guidance over diffusers components."""

    def __init__(
        self,
        components: DiffusionComponents,
        device: torch.device | str = "cpu",
        unet_dtype: torch.dtype | None = None,
        compile_unet: bool = False,
    ) -> None:
        self.components = components
        self.device = torch.device(device)
        # bf16/fp16 autocast of the UNet only: z_T, embeddings, optimizer and VAE stay fp32.
        self.unet_dtype = unet_dtype
        # torch.compile (TorchInductor) of the UNet, used only inside optimize() and only
        # while no attention is recorded or injected: there the same shapes repeat at every
        # step, so compiling once (tens of seconds on a CPU, forward and backward) pays
        # off. Sampling, inversion and attention control stay eager: their changing shapes,
        # grad modes and attention processors would each trigger a recompile.
        self.compiled_unet = torch.compile(components.unet) if compile_unet else None
        self._use_compiled = False
        # Told the step index at the start of every DDIM step (prompt-to-prompt attention
        # control, see attention.py); None when nothing needs to know.
        self.step_observer = None
        for module in (components.unet, components.vae, components.text_encoder):
            module.to(self.device).eval().requires_grad_(False)

    # -- building blocks -------------------------------------------------

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """CLIP text embeddings exactly as StableDiffusionPipeline computes them: (B, L, D)."""
        tokenizer, text_encoder = self.components.tokenizer, self.components.text_encoder
        tokens = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        attention_mask = None
        if getattr(text_encoder.config, "use_attention_mask", False):
            attention_mask = tokens.attention_mask.to(self.device)
        return text_encoder(tokens.input_ids.to(self.device), attention_mask=attention_mask)[0].float()

    def timesteps(self, num_steps: int) -> list[int]:
        self.components.scheduler.set_timesteps(num_steps)
        return [int(t) for t in self.components.scheduler.timesteps]

    def _unet_autocast(self):
        if self.unet_dtype is None or self.unet_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.unet_dtype)

    @contextmanager
    def _compiled_unet(self) -> Iterator[None]:
        """Inside: the UNet calls go to the compiled UNet, if there is one and no attention control is attached."""
        self._use_compiled = self.compiled_unet is not None and self.step_observer is None
        try:
            yield
        finally:
            self._use_compiled = False

    def predict_noise(self, latents: torch.Tensor, timestep: int, embeddings: torch.Tensor) -> torch.Tensor:
        """The UNet's output for (N, C, h, w) latents and (N, L, D) embeddings, in fp32."""
        model_input = self.components.scheduler.scale_model_input(latents, timestep)
        t = torch.tensor(timestep, device=latents.device)
        with self._unet_autocast():
            unet = self.compiled_unet if self._use_compiled else self.components.unet
            return unet(model_input, t, encoder_hidden_states=embeddings).sample.float()

    def denoise_step(
        self,
        latents: torch.Tensor,
        timestep: int,
        prompt_emb: torch.Tensor,
        null_emb: torch.Tensor,
        guidance_scale: float,
        step_index: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One guided DDIM step z_t -> (z_{t-1}, x0-prediction), both (B, C, h, w).

        The conditional and unconditional predictions come from one batched UNet call.
        """
        if self.step_observer is not None:
            # Inside the (checkpointed) step, so a recomputation in backward sees the right index.
            self.step_observer.begin_step(step_index)
        scheduler = self.components.scheduler
        embeddings = torch.cat([null_emb, prompt_emb])  # (2B, L, D)
        noise_pred = self.predict_noise(torch.cat([latents, latents]), timestep, embeddings)  # [uncond; cond]
        noise_uncond, noise_cond = noise_pred.chunk(2)  # (B, C, h, w) each
        guided = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
        # DDIMScheduler.step is plain tensor code, hence differentiable; it honours
        # the scheduler's prediction_type (epsilon, v_prediction, sample).
        out = scheduler.step(guided, timestep, latents, eta=0.0)
        return out.prev_sample, out.pred_original_sample

    def run_chain(
        self,
        z_T: torch.Tensor,
        prompt_embs: torch.Tensor,
        null_embs: torch.Tensor,
        guidance_scale: float,
        keep_last: int = 0,
        use_checkpoint: bool = False,
        hold: HeldTrajectory | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run all DDIM steps from z_T.

        z_T: (B, C, h, w); prompt_embs, null_embs: (T, B, L, D), one embedding per step.
        Returns z_0 and the x0-predictions of the last `keep_last` steps (oldest first).
        With `use_checkpoint`, every step is recomputed during backward instead of being
        stored, so memory does not grow with T. With `hold`, its region follows its
        reference trajectory.
        """
        timesteps = self.timesteps(prompt_embs.shape[0])
        latents = z_T if hold is None else hold.blend(0, z_T)
        kept: list[torch.Tensor] = []
        for i, t in enumerate(timesteps):
            if use_checkpoint:
                latents, x0 = checkpoint(
                    self.denoise_step, latents, t, prompt_embs[i], null_embs[i], guidance_scale, i, use_reentrant=False
                )
            else:
                latents, x0 = self.denoise_step(latents, t, prompt_embs[i], null_embs[i], guidance_scale, i)
            if hold is not None:
                latents, x0 = hold.blend(i + 1, latents), hold.blend_x0(i, x0)
            if i >= len(timesteps) - keep_last:
                kept.append(x0)
        return latents, kept

    @torch.no_grad()
    def reference_trajectory(
        self, z_T: torch.Tensor, prompt_embs: torch.Tensor, null_embs: torch.Tensor, guidance_scale: float, region: HoldRegion
    ) -> HeldTrajectory:
        """The trajectory from z_T with the given (T, B, L, D) embeddings, to be held inside
        `region`: for an inverted image, its reconstruction's trajectory."""
        latents, x0s = [z_T], []
        for i, t in enumerate(self.timesteps(prompt_embs.shape[0])):
            z, x0 = self.denoise_step(latents[-1], t, prompt_embs[i], null_embs[i], guidance_scale, i)
            latents.append(z)
            x0s.append(x0)
        pixel_mask = image = None
        if region.pixel_mask is not None:
            pixel_mask, image = region.pixel_mask.to(z_T), self.decode(latents[-1])
        return HeldTrajectory(region.latent_mask.to(z_T), torch.stack(latents), torch.stack(x0s), pixel_mask, image)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        image = vae.decode(latents.float() / vae.config.scaling_factor).sample  # (B, 3, H, W) in [-1, 1]
        return (image / 2 + 0.5).clamp(0, 1)

    def decode(self, latents: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
        """VAE decode in fp32 to images in [0, 1]: (B, C, h, w) -> (B, 3, H, W)."""
        if use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._decode, latents, use_reentrant=False)
        return self._decode(latents)

    @torch.no_grad()
    def sample(
        self,
        z_T: torch.Tensor,
        prompt_emb: torch.Tensor,
        null_emb: torch.Tensor,
        config: SamplerConfig,
    ) -> torch.Tensor:
        """A plain forward sample (no optimization): (B, C, h, w) -> images (B, 3, H, W)."""
        T = config.num_steps
        prompt_embs = _per_step(prompt_emb, T)
        null_embs = _per_step(null_emb, T)
        z_0, _ = self.run_chain(z_T.to(self.device), prompt_embs, null_embs, config.guidance_scale)
        return self.decode(z_0)

    # -- the DiG-IN optimization -----------------------------------------

    def optimize(
        self,
        objective: Objective,
        z_T: torch.Tensor,
        prompt_emb: torch.Tensor,
        null_emb: torch.Tensor,
        sampler: SamplerConfig,
        config: OptimConfig,
        on_step: ProgressCallback | None = None,
        hold: HoldRegion | None = None,
    ) -> OptimizationResult:
        """Optimize z_T and per-step prompt / null-text deltas to minimize `objective`.

        z_T: (B, C, h, w). prompt_emb: (B, L, D) or per step (T, B, L, D). null_emb likewise
        (per-step null embeddings come from null-text inversion). Every item is optimized
        independently (per-item losses are summed, Adam is elementwise), and every item
        keeps its own best iterate by the non-augmented loss.
        hold: what of every item stays as the unoptimized start has it (see HoldRegion,
        HeldTrajectory); None holds nothing.
        """
        started = time.perf_counter()
        config = config.resolved(self.components)
        T = sampler.num_steps
        if not 1 <= config.loss_steps <= T:
            raise ValueError(f"loss_steps must be between 1 and the number of DDIM steps ({T})")
        device = self.device
        prompt_base = _per_step(prompt_emb.to(device), T)  # (T, B, L, D)
        null_base = _per_step(null_emb.to(device), T)  # (T, B, L, D)
        batch = z_T.shape[0]

        latent = z_T.detach().to(device).clone().requires_grad_(config.optimize_latent)
        prompt_delta = torch.zeros(prompt_base.shape, device=device, requires_grad=config.optimize_prompt)
        null_delta = torch.zeros(null_base.shape, device=device, requires_grad=config.optimize_null)
        groups = [
            {"params": [p], "lr": lr}
            for p, lr, on in (
                (latent, config.lr_latent, config.optimize_latent),
                (prompt_delta, config.lr_prompt, config.optimize_prompt),
                (null_delta, config.lr_null, config.optimize_null),
            )
            if on
        ]
        optimizer = torch.optim.Adam(groups) if groups else None
        # Per-item L2 norm of z_T; the projection keeps z_T on its sphere (typical set of the prior).
        initial_norm = latent.detach().flatten(1).norm(dim=1)  # (B,)

        # Loss on the x0-predictions of the last K steps, weights k / (1 + ... + K).
        K = config.loss_steps
        weights = [k / (K * (K + 1) / 2) for k in range(1, K + 1)]
        view_size = config.view_size
        # One cutout generator per item, all seeded alike: an item's augmentations, hence its
        # result, do not depend on the batch it shares (only on --seed).
        generators = [torch.Generator().manual_seed(config.seed) for _ in range(batch)]

        history: list[dict[str, list[float]]] = []
        best_loss = torch.full((batch,), math.inf)
        best_steps = [0] * batch
        best_images: torch.Tensor | None = None
        best_latents = latent.detach().cpu().clone()
        initial_images: torch.Tensor | None = None
        total = config.steps if optimizer is not None else 0
        held = None
        if hold is not None:
            # Computed eagerly, before the compiled UNet is switched on: a no-grad call
            # would make it compile a second graph.
            held = self.reference_trajectory(latent.detach(), prompt_base, null_base, sampler.guidance_scale, hold)
        composite = held.composite if held is not None else (lambda images: images)

        with self._compiled_unet():
            for step in range(total + 1):
                update = step < total
                with torch.set_grad_enabled(update):
                    prompt_embs = prompt_base + prompt_delta
                    null_embs = null_base + null_delta
                    z_0, x0_preds = self.run_chain(
                        latent,
                        prompt_embs,
                        null_embs,
                        sampler.guidance_scale,
                        keep_last=K if update else 0,
                        use_checkpoint=update and config.gradient_checkpointing,
                        hold=held,
                    )
                    if update:
                        loss = torch.zeros(batch, device=device)
                        for weight, x0 in zip(weights, x0_preds):
                            images = composite(
                                self.decode(x0, use_checkpoint=config.gradient_checkpointing and config.checkpoint_decode)
                            )
                            views = make_cutouts(
                                images,
                                config.num_cutouts,
                                view_size,
                                config.cutout_min_scale,
                                config.cutout_noise_std,
                                generators,
                            )
                            loss = loss + weight * objective(ObjectiveInput(images, x0, views)).loss
                        loss.sum().backward()

                # Report and select on the plain, non-augmented image of this iterate.
                with torch.no_grad():
                    z_0 = z_0.detach()
                    images = composite(self.decode(z_0))
                    report = objective(ObjectiveInput(images, z_0, images.unsqueeze(1)))
                plain_loss = report.loss.detach().float().cpu()
                metrics = {name: value.detach().float().cpu() for name, value in report.metrics.items()}
                history.append({"loss": plain_loss.tolist(), **{k: v.tolist() for k, v in metrics.items()}})
                images_cpu = images.float().cpu()
                if initial_images is None:
                    initial_images = images_cpu.clone()
                    best_images = images_cpu.clone()
                improved = plain_loss < best_loss  # (B,)
                for b in torch.nonzero(improved).flatten().tolist():
                    best_loss[b] = plain_loss[b]
                    best_steps[b] = step
                    best_images[b] = images_cpu[b]
                    best_latents[b] = latent.detach()[b].cpu()
                if on_step is not None:
                    on_step(StepReport(step=step, total=total, loss=plain_loss, metrics=metrics))

                if update:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if config.optimize_latent:
                        with torch.no_grad():
                            norm = latent.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
                            latent.mul_((initial_norm / norm).view(-1, *[1] * (latent.dim() - 1)))

        return OptimizationResult(
            initial_images=initial_images,
            best_images=best_images,
            best_steps=best_steps,
            best_latents=best_latents,
            history=history,
            seconds=time.perf_counter() - started,
        )


def _per_step(embedding: torch.Tensor, num_steps: int) -> torch.Tensor:
    """(B, L, D) -> (T, B, L, D) by repetition; (T, B, L, D) is checked and passed through."""
    if embedding.dim() == 3:
        return embedding.unsqueeze(0).expand(num_steps, *embedding.shape)
    if embedding.shape[0] != num_steps:
        raise ValueError(f"per-step embeddings have {embedding.shape[0]} steps, the sampler {num_steps}")
    return embedding


__all__ = [
    "DiffusionComponents",
    "GuidedDDIM",
    "HeldTrajectory",
    "HoldRegion",
    "OptimConfig",
    "OptimizationResult",
    "SamplerConfig",
    "StepReport",
    "initial_latents",
    "make_cutouts",
]
