"""The model families digin samples, recognised from a pipeline's config files, and each
family's defaults: one table, shown by `digin models --family` and written into every run
record. Every default is only that: --ddim-steps, --guidance, --spacing and --resolution
override it.

Pure Python (json only), so that `digin models --family` and the option checks that run
before any model loads stay fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    # Sampler defaults. None: the pipeline's own (resolution: the UNet's sample_size times
    # the VAE's factor; spacing: the scheduler config's timestep_spacing).
    ddim_steps: int
    guidance: float
    spacing: str | None = None
    resolution: int | None = None
    dual_text_encoder: bool = False  # SDXL: two encoders, pooled embedding and time ids
    examples: str = ""

    def as_record(self) -> dict:
        return {"name": self.name, "ddim_steps": self.ddim_steps, "guidance": self.guidance,
                "spacing": self.spacing, "resolution": self.resolution}  # fmt: skip


# The paper's setting (20 DDIM steps, guidance 3.0) for every guided family: it is what the
# optimization was tuned with, lower than the 5-7.5 users sample with, for more diverse starts.
# The Turbo models are distilled for 1-4 steps without guidance at 512 px (trailing spacing):
# 4 steps leaves the default loss on the last 3 x0-predictions room.
FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("sd1", "Stable Diffusion 1.x (CLIP ViT-L, 77 x 768)", 20, 3.0,
               examples="CompVis/stable-diffusion-v1-4, stable-diffusion-v1-5/stable-diffusion-v1-5"),
        Family("sd2", "Stable Diffusion 2.x, 512 px epsilon (OpenCLIP ViT-H, 77 x 1024)", 20, 3.0,
               examples="stabilityai/stable-diffusion-2-1-base"),
        Family("sd2-v", "Stable Diffusion 2.x, 768 px v-prediction", 20, 3.0, examples="stabilityai/stable-diffusion-2-1"),
        Family("sdxl", "SDXL (CLIP ViT-L + OpenCLIP bigG, 77 x 2048, pooled 1280, time ids)", 20, 3.0,
               dual_text_encoder=True, examples="stabilityai/stable-diffusion-xl-base-1.0"),
        Family("sd-turbo", "SD-Turbo (SD 2.1 distilled for 1-4 steps)", 4, 0.0, "trailing", 512,
               examples="stabilityai/sd-turbo"),
        Family("sdxl-turbo", "SDXL-Turbo (SDXL distilled for 1-4 steps)", 4, 0.0, "trailing", 512,
               dual_text_encoder=True, examples="stabilityai/sdxl-turbo"),
        Family("sd", "another Stable-Diffusion-format pipeline (one CLIP text encoder, a 4-channel UNet)", 20, 3.0,
               examples="digin's built-in shapes and tiny models"),
    )
}  # fmt: skip

# Pipeline classes of families digin cannot sample exactly, as one line says what they are.
UNSUPPORTED = {
    "StableDiffusionXLImg2ImgPipeline": "an SDXL image-to-image / refiner pipeline (aesthetic-score conditions)",
    "StableDiffusion3Pipeline": "a Stable Diffusion 3 pipeline (an MMDiT transformer, no UNet)",
    "FluxPipeline": "a FLUX pipeline (a transformer, no UNet)",
    "StableDiffusionInpaintPipeline": "an inpainting pipeline (a 9-channel UNet)",
    "StableDiffusionXLInpaintPipeline": "an SDXL inpainting pipeline (a 9-channel UNet)",
    "DDPMPipeline": "an unconditional pipeline (no text encoder)",
    "DDIMPipeline": "an unconditional pipeline (no text encoder)",
    "LDMPipeline": "an unconditional latent pipeline (no text encoder)",
}
SUPPORTED = "SD 1.x, SD 2.x, SDXL, SD-Turbo and SDXL-Turbo text-to-image pipelines (`digin models --family`)"


class UnsupportedFamily(ValueError):
    """The pipeline is of a family digin does not sample; the message says what it is."""


ConfigReader = Callable[[str], dict | None]  # a file of the pipeline ("unet/config.json") -> its JSON, or None


def recognise(name: str, read: ConfigReader) -> Family:
    """The family of the pipeline `name` whose config files `read` returns.

    SDXL: a UNet with `addition_embed_type="text_time"` (pooled text embedding and time ids);
    SD 2.x: 1024-wide cross-attention, "-v" with v-prediction; SD 1.x: 768-wide. Turbo models
    have their base's architecture and are told apart by name ("turbo" in the hub id or the
    folder's name) or by `"family"` in the folder's digin.json.
    Raises UnsupportedFamily for the pipelines of UNSUPPORTED, transformer pipelines, UNets
    with other input channels than the VAE's latents, and unconditional UNets.
    """
    index = read("model_index.json") or {}
    pipeline = index.get("_class_name", "")
    if pipeline in UNSUPPORTED:
        raise UnsupportedFamily(UNSUPPORTED[pipeline])
    if "transformer" in index and "unet" not in index:
        raise UnsupportedFamily(f"a transformer pipeline ({pipeline})")
    unet = read("unet/config.json") or {}
    vae = read("vae/config.json") or {}
    if unet and unet.get("cross_attention_dim") is None:
        raise UnsupportedFamily("an unconditional model (its UNet has no text conditioning)")
    if unet and vae and unet.get("in_channels", 4) != vae.get("latent_channels", 4):
        raise UnsupportedFamily(
            f"a model with a {unet.get('in_channels')}-channel UNet for {vae.get('latent_channels', 4)}-channel latents "
            "(an inpainting or image-conditioned model)"
        )
    settings = read("digin.json") or {}
    if settings.get("family") is not None:
        if settings["family"] not in FAMILIES:
            raise UnsupportedFamily(f"of family '{settings['family']}' by its digin.json, which is none of {', '.join(FAMILIES)}")
        return FAMILIES[settings["family"]]
    turbo = "turbo" in Path(name.rstrip("/")).name.lower()
    if unet.get("addition_embed_type") == "text_time" or "text_encoder_2" in index:
        return FAMILIES["sdxl-turbo" if turbo else "sdxl"]
    prediction = (read("scheduler/scheduler_config.json") or {}).get("prediction_type", "epsilon")
    width = unet.get("cross_attention_dim")
    if width == 1024:
        return FAMILIES["sd-turbo" if turbo else ("sd2-v" if prediction == "v_prediction" else "sd2")]
    if width == 768:
        return FAMILIES["sd1"]
    return FAMILIES["sd"]


def folder_reader(folder: Path) -> ConfigReader:
    def read(file: str) -> dict | None:
        try:
            return json.loads((folder / file).read_text())
        except (OSError, ValueError):
            return None

    return read
