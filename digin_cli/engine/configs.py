"""What the engine is told (sampler and optimization settings) and what it answers (per-step reports, results)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from digin_cli.components import DiffusionComponents


@dataclass
class SamplerConfig:
    """How the DDIM chain is sampled. The tasks leave the fields None where the user gave no
    option and fill them from the model family's defaults (families.py, `resolved`); the
    engine itself reads `num_steps` and `guidance_scale` only."""

    num_steps: int | None = 20  # DDIM steps; the reference uses 20 with eta = 0
    guidance_scale: float | None = 3.0  # classifier-free guidance; reference 3.0
    timestep_spacing: str | None = None  # leading | trailing | linspace; None: the scheduler config's
    resolution: int | None = None  # pixels; None: the UNet's own (sample_size x the VAE factor)

    def resolved(self, family) -> SamplerConfig:
        """A copy with every field left None taken from `family` (a families.Family)."""
        return replace(
            self,
            num_steps=family.ddim_steps if self.num_steps is None else self.num_steps,
            guidance_scale=family.guidance if self.guidance_scale is None else self.guidance_scale,
            timestep_spacing=self.timestep_spacing or family.spacing,
            resolution=family.resolution if self.resolution is None else self.resolution,
        )


# The share of the device's available memory that one update may hold (engine/memory.py):
# while the chain's activations, the loss decodes and the classifier views fit it, nothing
# is recomputed. A share, not all of it: the allocator fragments, and the optimizer state,
# the weights' copies under autocast and the reported images need room too.
CHECKPOINT_MEMORY_SHARE = 0.25

# The reference's Adam lr for every text-embedding variable (SD 1.x): the prompt and null-text
# deltas of the optimization, and the null embeddings of null-text inversion.
REFERENCE_LR_EMBEDDING = 1e-2

# OptimConfig.keep: which iterate an item keeps.
KEEP_RULES = ("best-loss", "first-claim")
# OptimConfig.augment: the classifier's views while optimizing (engine/inputs.py, make_views).
AUGMENTATIONS = ("cutouts", "eot")


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
    loss_steps: int | None = 3  # (None: the tasks take min(3, T)) loss on the x0-prediction of the last K DDIM steps, weights 1:2:...:K
    num_cutouts: int = 16  # augmented classifier views per item while optimizing
    cutout_min_scale: float = 0.5  # smallest cutout side as a share of the image side
    cutout_noise_std: float = 0.005  # Gaussian noise added to each cutout
    view_size: int | None = None  # cutout side in pixels; None = image resolution
    seed: int = 0  # seeds the cutout randomness, so runs repeat exactly
    # Per-UNet-call checkpointing: memory flat in num_steps, at the price of a second forward
    # pass in backward. None (auto): only where what an update holds (measured on one item
    # at the first optimize of a run, engine/memory.py) would take more than
    # CHECKPOINT_MEMORY_SHARE of the device's available memory: not for the small built-in
    # models, always for SD at 512 px.
    gradient_checkpointing: bool | None = None
    checkpoint_decode: bool = True  # with gradient_checkpointing, also recompute the VAE decodes of the loss
    # Each item's cutouts that go through the objective (its classifiers) at once; their
    # graphs are freed before the next pass. None (auto): all, unless that would not fit
    # the memory budget (engine/memory.py). Changes how fast, not what: not fingerprinted.
    views_per_pass: int | None = None
    # Guards against results that fool only the guide. Every default leaves the
    # optimization exactly as it was without them.
    # Which iterate an item keeps (KEEP_RULES): "best-loss", the one with the lowest plain
    # loss (the reference's); "first-claim", the first whose objective's claim holds by
    # `claim_margin` on the plain image (ObjectiveOutput.claim: disagree p_f >= 0.5 and
    # p_g <= 0.2, uvce the target is the top class), before later steps over-optimize it;
    # an item whose claim never holds, or an objective without a claim, keeps its best-loss one.
    keep: str = "best-loss"
    claim_margin: float = 0.05  # with keep="first-claim": by how much the claim must hold (its units: probability)
    # DNO-style noise regularization (engine/guards.py, noise_regularization): the weight of a
    # loss on z_T, added to every update, that penalizes per-channel and per-patch statistics
    # (mean, second moment, neighbour correlation, ...) a standard Gaussian sample would show
    # with a probability under 0.3%. z_T's norm is already kept by the projection. 0: off.
    noise_reg: float = 0.0
    # The classifier's views while optimizing (AUGMENTATIONS): "cutouts", the paper's random
    # crops + Gaussian noise; "eot", an expectation over transformations: the same crops, then
    # random flips, rotations (+-10 deg), scales (0.9-1.1), brightness / contrast / saturation
    # jitter (+-10%) and a light blur, then the noise (engine/inputs.py, make_eot_views).
    augment: str = "cutouts"

    def validate(self) -> None:
        """ValueError, one line, for a guard setting out of range (before anything loads)."""
        if self.keep not in KEEP_RULES:
            raise ValueError(f"keep must be one of {', '.join(KEEP_RULES)}, not '{self.keep}'")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, not '{self.augment}'")
        if not (self.noise_reg >= 0 and math.isfinite(self.noise_reg)):
            raise ValueError(f"noise_reg must be a finite weight >= 0, not {self.noise_reg}")
        if not (self.claim_margin >= 0 and math.isfinite(self.claim_margin)):
            raise ValueError(f"claim_margin must be >= 0, not {self.claim_margin}")

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
    best_images: torch.Tensor  # (B, 3, H, W) the kept iterate (OptimConfig.keep; default: lowest non-augmented loss), on CPU
    best_steps: list[int]  # per item, which iterate was kept
    best_latents: torch.Tensor  # (B, C, h, w) the z_T of the kept iterate, on CPU
    history: list[dict[str, list[float]]] = field(default_factory=list)  # per iterate: name -> per item
    seconds: float = 0.0
    # Per item, the first iterate whose claim held by OptimConfig.claim_margin on its plain
    # image, whatever OptimConfig.keep; None where it never did or the objective makes no claim.
    claim_steps: list[int | None] = field(default_factory=list)

    def at_step(self, step: int, item: int) -> dict[str, float]:
        return {name: values[item] for name, values in self.history[step].items()}

    def initial(self, item: int) -> dict[str, float]:
        return self.at_step(0, item)

    def best(self, item: int) -> dict[str, float]:
        return self.at_step(self.best_steps[item], item)


ProgressCallback = Callable[[StepReport], None]


class NonFiniteLoss(FloatingPointError):
    """An iterate's plain loss is NaN or infinite (an fp16 overflow, a diverging update):
    the run stops rather than keep an earlier iterate without a word."""

    def __init__(self, step: int, items: list[int]) -> None:
        super().__init__(f"the loss is not finite at optimization step {step} (batch items {items})")
        self.step, self.items = step, items
