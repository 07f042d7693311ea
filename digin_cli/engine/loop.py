"""The parts of one optimization run: its variables, its augmented loss, the best iterates kept."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from digin_cli.engine.configs import OptimConfig, OptimizationResult
from digin_cli.engine.guards import Cone, cone_projection
from digin_cli.engine.hold import HeldTrajectory
from digin_cli.engine.inputs import make_views, view_generators
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
    # Dynamic loss scaling (enabled for an fp16 UNet): fp16 gradients smaller than 6e-8
    # underflow to zero without a word; the loss is scaled up before backward, the
    # gradients unscaled before Adam, and a step whose gradients overflowed is skipped.
    scaler: torch.amp.GradScaler

    @classmethod
    def create(cls, z_T, prompt_emb, null_emb, num_steps: int, config: OptimConfig, device, guided: bool = True,
               loss_scaling: bool = False) -> Variables:  # fmt: skip
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
        scaler = torch.amp.GradScaler(torch.device(device).type, enabled=loss_scaling and optimizer is not None)
        return cls(latent, prompt_base, prompt_delta, null_base, null_delta, optimizer, initial_norm,
                   config.optimize_latent, scaler)  # fmt: skip

    def gradients(self) -> dict[str, torch.Tensor | None]:
        """The unscaled gradients of the last backward, by variable (None: not a variable)."""
        if self.optimizer is not None:
            self.scaler.unscale_(self.optimizer)
        return {"latent": self.latent.grad, "prompt": self.prompt_delta.grad, "null": self.null_delta.grad}

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-step prompt and null embeddings of the current iterate: (T, B, L, D) each."""
        return self.prompt_base + self.prompt_delta, self.null_base + self.null_delta

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def update(self) -> None:
        """One Adam step (skipped where fp16 gradients overflowed), then z_T back onto its initial norm."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.project_latent:
            with torch.no_grad():
                norm = self.latent.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
                self.latent.mul_((self.initial_norm / norm).view(-1, *[1] * (self.latent.dim() - 1)))


@dataclass
class AugmentedLoss:
    """The loss an update descends: the objective on the augmented views (OptimConfig.augment)
    of the decoded x0-predictions of the last K steps, weighted k / (1 + ... + K); with a
    cone, the objective's gradient with respect to the views projected onto it (guards.py)."""

    objective: Objective
    weights: list[float]
    config: OptimConfig
    # One view generator per item, all seeded alike: an item's augmentations, hence its
    # result, do not depend on the batch it shares (only on --seed).
    generators: list[torch.Generator]
    cone: Cone | None = None

    @classmethod
    def create(cls, objective: Objective, config: OptimConfig, batch: int, device: torch.device,
               cone: Cone | None = None) -> AugmentedLoss:  # fmt: skip
        K = config.loss_steps
        weights = [k / (K * (K + 1) / 2) for k in range(1, K + 1)]
        return cls(objective, weights, config, view_generators(device, config.seed, batch), cone)

    def backward(self, x0_preds: list[torch.Tensor], decode: Callable[[torch.Tensor], torch.Tensor],
                 views_per_pass: int, batched: bool = False,
                 scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss) -> None:  # fmt: skip
        """Backpropagate the loss of the last K x0-predictions (B, C, h, w), oldest first, into
        what made them, holding the classifier graphs of one pass of `views_per_pass` views at
        a time: K x B x V classifier graphs kept for one backward are what runs out of memory.

        1. The K decodes (`batched`: one decode of K * B, fewer, larger calls); their graphs stay.
        2. Per loss step, the image and its latent become leaves; the objective runs on the
           views pass by pass, each pass backpropagated into the leaves at once (its
           classifier graph freed), then the views' gradient (projected onto the cone, if
           any: view_gradient) through the augmentations into the image.
        3. One backward from the K images and latents, with their gradients, through the
           decodes and the chain.

        Passes add up to the loss of all views at once because an objective's loss is a mean
        over its views plus terms of the image and latent alone (objectives.Objective): pass
        c, with share n_c / V of the views, enters weighted n_c / V. `scale` multiplies every
        term before its backward (fp16 loss scaling)."""
        batch = x0_preds[0].shape[0]
        # 1. The decoded x0-predictions, K x (B, 3, H, W).
        decoded_all = decode(torch.cat(x0_preds)).split(batch) if batched else [decode(x0) for x0 in x0_preds]
        roots: list[torch.Tensor] = []
        gradients: list[torch.Tensor] = []
        # 2. Each loss step's terms, backpropagated into its leaves.
        for weight, x0, decoded in zip(self.weights, x0_preds, decoded_all):
            image = decoded.detach().requires_grad_(True)  # (B, 3, H, W)
            latent = x0.detach().requires_grad_(True)  # (B, C, h, w)
            views = make_views(image, self.config, self.generators)  # (B, V, 3, S, S)
            view_gradient = self.view_gradient(image, latent, views, weight, views_per_pass, scale)
            if view_gradient is not None:
                views.backward(view_gradient)  # into image.grad, through the augmentations
            for root, leaf in ((decoded, image), (x0, latent)):
                if leaf.grad is not None and root.requires_grad:
                    roots.append(root)
                    gradients.append(leaf.grad)
        # 3. Through the decodes and the chain, once.
        if roots:
            torch.autograd.backward(roots, gradients)

    def view_gradient(self, image: torch.Tensor, latent: torch.Tensor, views: torch.Tensor, weight: float,
                      views_per_pass: int, scale: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:  # fmt: skip
        """The gradient of one loss step's objective with respect to its views (B, V, 3, S, S),
        None if it has none; its terms of the image and latent alone go into their .grad as
        the passes run, unprojected. With a cone, the guide's gradient over all passes, then
        the reference's over all passes, then per item the projection of the one onto the
        cone around the other."""
        guide = run_passes(lambda part: self.objective(ObjectiveInput(image, latent, part)).loss, views, weight,
                           views_per_pass, scale)  # fmt: skip
        if self.cone is None or guide is None:
            return guide
        reference = run_passes(self.cone.reference, views, 1.0, views_per_pass, scale)
        if reference is None:  # the reference does not see the views: no direction to follow
            return guide
        return cone_projection(guide.flatten(1), reference.flatten(1), self.cone.degrees).view_as(guide)


def run_passes(loss: Callable[[torch.Tensor], torch.Tensor], views: torch.Tensor, weight: float, views_per_pass: int,
               scale: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:  # fmt: skip
    """The gradient of weight * loss(views) (B,), summed over items, with respect to views
    (B, V, 3, S, S), computed `views_per_pass` views at a time (each pass's graph freed by
    its backward, its share n / V of the views weighting it); None where loss ignores the views."""
    leaves = views.detach().requires_grad_(True)
    num_views = views.shape[1]
    for first in range(0, num_views, views_per_pass):
        part = leaves[:, first : first + views_per_pass]  # (B, n, 3, S, S)
        term = loss(part)  # (B,)
        scale(term.sum() * (weight * part.shape[1] / num_views)).backward()
    return leaves.grad


class BestIterates:
    """The history of every iterate, and per item the iterate it keeps: the one with the
    lowest plain loss so far ("best-loss"), or ("first-claim") the first whose claim holds
    by `claim_margin`, after which that item's kept iterate no longer changes; until then,
    and where the claim never holds or the objective makes none, its best-loss iterate."""

    def __init__(self, latent: torch.Tensor, keep: str = "best-loss", claim_margin: float = 0.0) -> None:
        batch = latent.shape[0]
        self.keep_first_claim = keep == "first-claim"
        self.claim_margin = claim_margin
        self.history: list[dict[str, list[float]]] = []
        self.best_loss = torch.full((batch,), math.inf)
        self.best_steps = [0] * batch
        self.claim_steps: list[int | None] = [None] * batch
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
        claimed_before = torch.tensor([s is not None for s in self.claim_steps])  # (B,)
        claims = torch.zeros_like(claimed_before)  # (B,) the claim holds at this iterate
        if report.claim is not None:
            claims = report.claim.detach().float().cpu() >= self.claim_margin
            for b in torch.nonzero(claims & ~claimed_before).flatten().tolist():
                self.claim_steps[b] = step
        improved = plain_loss < self.best_loss  # (B,)
        if self.keep_first_claim:
            # Items claimed earlier keep that iterate; a first claim replaces the best-loss one.
            kept = ~claimed_before & (improved | claims)
        else:
            kept = improved
        for b in torch.nonzero(kept).flatten().tolist():
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
            claim_steps=list(self.claim_steps),
        )


def per_step(embedding: torch.Tensor, num_steps: int) -> torch.Tensor:
    """(B, L, D) -> (T, B, L, D) by repetition; (T, B, L, D) is checked and passed through."""
    if embedding.dim() == 3:
        return embedding.unsqueeze(0).expand(num_steps, *embedding.shape)
    if embedding.shape[0] != num_steps:
        raise ValueError(f"per-step embeddings have {embedding.shape[0]} steps, the sampler {num_steps}")
    return embedding
