"""The parts of a Stable-Diffusion-style pipeline, as the loader hands them to the engine.

A room of its own so that the loader (``models``) and the engine (``engine``) can both
use it without either depending on the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


@dataclass
class DiffusionComponents:
    """The parts of a Stable-Diffusion-style pipeline the engine needs, all frozen."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    # SDXL's second text encoder (OpenCLIP bigG with projection: pooled embedding) and its tokenizer.
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    source: str = ""  # the model as the user named it, for the run record
    family: str = "sd"  # a key of families.FAMILIES
    # What the weights are, for cache keys and run fingerprints: a local folder's absolute
    # path with its UNet's file sizes and times, a hub model's snapshot (its revision).
    identity: str = ""
    # Model-specific defaults shipped with a model folder in digin.json (e.g. the
    # null-text inversion learning rate of the small built-in models).
    settings: dict = field(default_factory=dict)
    # SDXL pipelines' config: the unconditional (empty-prompt) embeddings are zeros.
    force_zeros_for_empty_prompt: bool = True
    # Sampling resolution in pixels when it is not the UNet's own (--resolution; the Turbo
    # families' 512). A multiple of the VAE factor.
    resolution_override: int | None = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return self.resolution_override or self.unet.config.sample_size * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (self.unet.config.in_channels, side, side)

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders, a pooled embedding and time ids (`addition_embed_type="text_time"`)."""
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> list:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    def as_pipeline(self):
        """The diffusers pipeline over these same modules (nothing copied): for diffusers'
        own loaders (LoRA) and as the reference the tests compare the engine with."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if self.is_sdxl:
            return StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=self.scheduler,
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
            )  # fmt: skip
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet, scheduler=self.scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
