"""The guided-DDIM engine: differentiable DDIM sampling and the DiG-IN optimization loop.

The engine knows nothing of files, terminals or argument parsing. It receives
diffusers components, an objective (see ``objectives.py``) and configs, and
returns tensors and numbers. Progress is reported through a callback.

Notation follows the paper: z_T is the initial latent, C_t the per-step prompt
embedding, null_t the per-step null-text embedding, and the image is D(z_0).
"""

from digin_cli.engine.configs import (
    AUGMENTATIONS,
    KEEP_RULES,
    REFERENCE_LR_EMBEDDING,
    NonFiniteLoss,
    OptimConfig,
    OptimizationResult,
    ProgressCallback,
    SamplerConfig,
    StepReport,
)
from digin_cli.engine.guards import Cone, cone_projection, noise_regularization
from digin_cli.engine.guided_ddim import GuidedDDIM
from digin_cli.engine.hold import HeldTrajectory, HoldRegion
from digin_cli.engine.inputs import initial_latents, make_cutouts, make_views

__all__ = [
    "AUGMENTATIONS",
    "KEEP_RULES",
    "REFERENCE_LR_EMBEDDING",
    "Cone",
    "GuidedDDIM",
    "HeldTrajectory",
    "HoldRegion",
    "NonFiniteLoss",
    "OptimConfig",
    "OptimizationResult",
    "ProgressCallback",
    "SamplerConfig",
    "StepReport",
    "cone_projection",
    "initial_latents",
    "make_cutouts",
    "make_views",
    "noise_regularization",
]
