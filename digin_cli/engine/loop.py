"""The parts of one optimization run: its variables, its augmented loss, the best iterates kept."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from digin_cli.engine.configs import OptimConfig, OptimizationResult
from digin_cli.engine.hold import HeldTrajectory
from digin_cli.engine.inputs import make_cutouts
from digin_cli.objectives import Objective, ObjectiveInput, ObjectiveOutput


def composite(held: HeldTrajectory | None, images: torch.Tensor) -> torch.Tensor:
    return images if held is None else held.composite(images)


@dataclass
class Variables:
    """What `optimize` changes: z_T and the per-step prompt and null-text deltas, with their Adam."""

    latent: torch.Tensor  # (B, C, h, w) z_T
    prompt_base: torch.Tensor  # (T, B, L, D)
    prompt_delta: torch.Tensor  # (T, B, L, D)
    null_base: torch.Tensor  # (T, B, L, D)
    null_delta: torch.Tensor  # (T, B, L, D)
    optimizer: torch.optim.Adam | None  # None when every variable is frozen
    initial_norm: torch.Tensor  # (B,) the L2 norm of each item's z_T
    project_latent: bool

    @classmethod
    def create(cls, z_T, prompt_emb, null_emb, num_steps: int, config: OptimConfig, device, guided: bool = True) -> Variables:
        """Without guidance (a scale of 1 or less) the null embeddings are never used, so
        their deltas are no variable."""
        prompt_base = per_step(prompt_emb.to(device), num_steps)  # (T, B, L, D)
        null_base = per_step(null_emb.to(device), num_steps)  # (T, B, L, D)
        latent = z_T.detach().to(device).clone().requires_grad_(config.optimize_latent)
        prompt_delta = torch.zeros(prompt_base.shape, device=device, requires_grad=config.optimize_prompt)
        optimize_null = config.optimize_null and guided
        null_delta = torch.zeros(null_base.shape, device=device, requires_grad=optimize_null)
        groups = [
            {"params": [p], "lr": lr}
            for p, lr, on in (
                (latent, config.lr_latent, config.optimize_latent),
                (prompt_delta, config.lr_prompt, config.optimize_prompt),
                (null_delta, config.lr_null, optimize_null),
            )
            if on
        ]
        optimizer = torch.optim.Adam(groups) if groups else None
        # Per-item L2 norm of z_T; the projection keeps z_T on its sphere (typical set of the prior).
        initial_norm = latent.detach().flatten(1).norm(dim=1)  # (B,)
        return cls(latent, prompt_base, prompt_delta, null_base, null_delta, optimizer, initial_norm, config.optimize_latent)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-step prompt and null embeddings of the current iterate: (T, B, L, D) each."""
        return self.prompt_base + self.prompt_delta, self.null_base + self.null_delta

    def update(self) -> None:
        """One Adam step, then z_T back onto its initial norm."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.project_latent:
            with torch.no_grad():
                norm = self.latent.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
                self.latent.mul_((self.initial_norm / norm).view(-1, *[1] * (self.latent.dim() - 1)))


@dataclass
class AugmentedLoss:
    """The loss an update descends: the objective on random cutouts of the decoded
    x0-predictions of the last K steps, weighted k / (1 + ... + K)."""

    objective: Objective
    weights: list[float]
    config: OptimConfig
    # One cutout generator per item, all seeded alike: an item's augmentations, hence its
    # result, do not depend on the batch it shares (only on --seed).
    generators: list[torch.Generator]

    @classmethod
    def create(cls, objective: Objective, config: OptimConfig, batch: int) -> AugmentedLoss:
        K = config.loss_steps
        weights = [k / (K * (K + 1) / 2) for k in range(1, K + 1)]
        generators = [torch.Generator().manual_seed(config.seed) for _ in range(batch)]
        return cls(objective, weights, config, generators)

    def __call__(self, x0_preds: list[torch.Tensor], decode: Callable[[torch.Tensor], torch.Tensor],
                 batched: bool = False) -> torch.Tensor:  # fmt: skip
        """The last K x0-predictions (B, C, h, w), oldest first, and how to decode latents into
        images -> the per-item loss (B,). Each is decoded just before its use, or, `batched`,
        all K in one decode of K * B (fewer, larger calls; K times the decode's memory)."""
        config = self.config
        batch = x0_preds[0].shape[0]
        loss = torch.zeros(batch, device=x0_preds[0].device)
        decoded_all = decode(torch.cat(x0_preds)).split(batch) if batched else None  # K x (B, 3, H, W)
        for k, (weight, x0) in enumerate(zip(self.weights, x0_preds)):
            decoded = decoded_all[k] if batched else decode(x0)  # (B, 3, H, W)
            views = make_cutouts(
                decoded, config.num_cutouts, config.view_size, config.cutout_min_scale, config.cutout_noise_std,
                self.generators,
            )  # fmt: skip
            loss = loss + weight * self.objective(ObjectiveInput(decoded, x0, views)).loss
        return loss


class BestIterates:
    """The history of every iterate, and per item the one with the lowest plain loss so far."""

    def __init__(self, latent: torch.Tensor) -> None:
        batch = latent.shape[0]
        self.history: list[dict[str, list[float]]] = []
        self.best_loss = torch.full((batch,), math.inf)
        self.best_steps = [0] * batch
        self.best_latents = latent.detach().cpu().clone()  # (B, C, h, w)
        self.best_images: torch.Tensor | None = None  # (B, 3, H, W)
        self.initial_images: torch.Tensor | None = None  # (B, 3, H, W)
        self.last_loss: torch.Tensor | None = None  # (B,)
        self.last_metrics: dict[str, torch.Tensor] = {}

    def observe(self, step: int, report: ObjectiveOutput, images: torch.Tensor, latent: torch.Tensor) -> None:
        plain_loss = report.loss.detach().float().cpu()  # (B,)
        metrics = {name: value.detach().float().cpu() for name, value in report.metrics.items()}
        self.last_loss, self.last_metrics = plain_loss, metrics
        self.history.append({"loss": plain_loss.tolist(), **{k: v.tolist() for k, v in metrics.items()}})
        images_cpu = images.float().cpu()
        if self.initial_images is None:
            self.initial_images = images_cpu.clone()
            self.best_images = images_cpu.clone()
        improved = plain_loss < self.best_loss  # (B,)
        for b in torch.nonzero(improved).flatten().tolist():
            self.best_loss[b] = plain_loss[b]
            self.best_steps[b] = step
            self.best_images[b] = images_cpu[b]
            self.best_latents[b] = latent.detach()[b].cpu()

    def result(self, seconds: float) -> OptimizationResult:
        return OptimizationResult(
            initial_images=self.initial_images,
            best_images=self.best_images,
            best_steps=self.best_steps,
            best_latents=self.best_latents,
            history=self.history,
            seconds=seconds,
        )


def per_step(embedding: torch.Tensor, num_steps: int) -> torch.Tensor:
    """(B, L, D) -> (T, B, L, D) by repetition; (T, B, L, D) is checked and passed through."""
    if embedding.dim() == 3:
        return embedding.unsqueeze(0).expand(num_steps, *embedding.shape)
    if embedding.shape[0] != num_steps:
        raise ValueError(f"per-step embeddings have {embedding.shape[0]} steps, the sampler {num_steps}")
    return embedding
