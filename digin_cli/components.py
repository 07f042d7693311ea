"""The parts of a Stable-Diffusion-style pipeline, as the loader hands them to the engine.

A room of its own so that the loader (``models``) and the engine (``engine``) can both
use it without either depending on the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


@dataclass
class DiffusionComponents:
    """The parts of a Stable-Diffusion-style pipeline the engine needs, all frozen."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    source: str = ""  # the model as the user named it, for the run record
    # What the weights are, for cache keys and run fingerprints: a local folder's absolute
    # path with its UNet's file sizes and times, a hub model's snapshot (its revision).
    identity: str = ""
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
