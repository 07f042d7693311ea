"""Loading a Stable-Diffusion-style model with diffusers' own loaders.

A model is a Hugging Face hub id (the hub cache and HF_HUB_OFFLINE behave as
with any diffusers code), a local diffusers folder, or the name of a built-in
offline model (see ``builtin.py``), which is a diffusers folder too and goes
through the same loaders.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from digin_cli.components import DiffusionComponents
from digin_cli.errors import DiginError

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"

# name -> function that makes sure the built-in model exists on disk and returns its folder
BUILTIN_DIFFUSION_MODELS: dict[str, Callable[[], Path]] = {}

# Optional file in a model folder with digin's defaults for that model (e.g. {"inversion_lr": 0.1}).
SETTINGS_FILE = "digin.json"

# The sub-models a Stable-Diffusion-style repo must have.
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def quiet_library_output() -> None:
    """Loading bars and warnings of transformers/diffusers would bury digin's own progress;
    download bars of the hub client stay, so a first download still shows what it does."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    import huggingface_hub.utils.logging as hub_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.set_verbosity_error()
    hub_logging.set_verbosity_error()  # connection retries; the final error is reported by digin


def load_diffusion(model: str) -> DiffusionComponents:
    """Load UNet, VAE, CLIP text encoder + tokenizer and a DDIM scheduler from `model`.

    The scheduler's own config (betas, prediction_type, timestep spacing) is kept; only
    its class becomes DDIM, as the method needs a deterministic sampler.
    """
    quiet_library_output()
    builtin = BUILTIN_DIFFUSION_MODELS.get(model)
    location = str(builtin()) if builtin is not None else model
    local = Path(location).expanduser()
    if local.is_dir():
        location = str(local)
        check_family(model, local / "model_index.json")
        missing = [name for name in SUBFOLDERS if not (local / name).is_dir()]
        if missing:
            raise DiginError(
                f"'{model}' is a folder but not a Stable-Diffusion-style diffusers model: it lacks "
                f"{', '.join(m + '/' for m in missing)}. Pass a folder saved with "
                "StableDiffusionPipeline.save_pretrained, a hub id such as "
                f"{DEFAULT_MODEL}, or the built-in offline model with --model {_builtin_names()}."
            )
    try:
        # fp32 whatever the stored dtype: the engine optimizes in fp32 and autocasts the UNet on CUDA.
        unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(location, subfolder="vae", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer")
        # Whatever the stored config says, x0 is never clipped or thresholded: the engine's own
        # DDIM update (engine/ddim.py) does neither, and the scheduler object says so too.
        scheduler = DDIMScheduler.from_pretrained(location, subfolder="scheduler", clip_sample=False, thresholding=False)
    except (OSError, ValueError, KeyError, TypeError) as error:
        where = "the local folder" if local.is_dir() else "the Hugging Face hub (or its local cache)"
        reason = str(error).strip().splitlines()[0].rstrip('.') if str(error).strip() else type(error).__name__
        raise DiginError(
            f"could not load the diffusion model '{model}' from {where}: {reason}. "
            f"A hub model must be downloaded once with network access (for example "
            f"`hf download {model if '/' in model else DEFAULT_MODEL}`) and is then read "
            "from the cache, also with HF_HUB_OFFLINE=1; a local folder must hold a diffusers "
            f"Stable Diffusion model ({', '.join(SUBFOLDERS)}). With no network, use the built-in "
            f"offline model: --model {_builtin_names()}."
        ) from error
    if not hasattr(unet.config, "cross_attention_dim") or unet.config.cross_attention_dim is None:
        raise DiginError(f"--model {model} has no text-conditioned UNet (an unconditional model); digin supports {SUPPORTED}")
    if unet.config.in_channels != vae.config.latent_channels:
        raise DiginError(
            f"--model {model} has a {unet.config.in_channels}-channel UNet for {vae.config.latent_channels}-channel latents "
            f"(an inpainting or image-conditioned model); digin supports {SUPPORTED}"
        )
    settings = {}
    if local.is_dir() and (local / SETTINGS_FILE).is_file():
        try:
            settings = json.loads((local / SETTINGS_FILE).read_text())
        except (OSError, ValueError) as error:
            raise DiginError(f"{local / SETTINGS_FILE} is not valid JSON ({error}); fix or delete it") from None
    return DiffusionComponents(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, source=model,
        identity=model_identity(local) if local.is_dir() else _hub_identity(model), settings=settings,
    )  # fmt: skip


def model_identity(folder: Path) -> str:
    """The folder's absolute path (for a hub model the snapshot folder, which names the
    revision) and the sizes and modification times of its UNet files: the same string
    for the same weights, another one when the weights are replaced."""
    folder = folder.resolve()
    unet = folder / "unet" if (folder / "unet").is_dir() else folder
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in unet.iterdir() if p.is_file())
    digest = hashlib.sha256(repr(stats).encode()).hexdigest()[:12]
    return f"{folder}@{digest}"


# Pipelines digin cannot sample exactly (yet), by diffusers' class name, as one line says what they are.
UNSUPPORTED_FAMILIES = {
    "StableDiffusionXLPipeline": "an SDXL pipeline (two text encoders, pooled and time-id conditions)",
    "StableDiffusionXLImg2ImgPipeline": "an SDXL pipeline (two text encoders, pooled and time-id conditions)",
    "StableDiffusion3Pipeline": "a Stable Diffusion 3 pipeline (an MMDiT transformer, no UNet)",
    "FluxPipeline": "a FLUX pipeline (a transformer, no UNet)",
    "StableDiffusionInpaintPipeline": "an inpainting pipeline (a 9-channel UNet)",
    "DDPMPipeline": "an unconditional pipeline (no text encoder)",
    "DDIMPipeline": "an unconditional pipeline (no text encoder)",
    "LDMPipeline": "an unconditional latent pipeline (no text encoder)",
}
SUPPORTED = "Stable Diffusion 1.x / 2.x-style text-to-image pipelines (StableDiffusionPipeline: one CLIP text encoder, a 4-channel UNet)"


def check_family(model: str, model_index: Path) -> None:
    """Refuse, in one line, a pipeline folder of a family the engine does not sample exactly;
    it would otherwise fail at its first UNet call or be sampled wrong."""
    try:
        index = json.loads(model_index.read_text())
    except (OSError, ValueError):
        return  # no model_index.json: the sub-folder checks speak
    name = index.get("_class_name", "")
    what = UNSUPPORTED_FAMILIES.get(name)
    if what is None and "transformer" in index and "unet" not in index:
        what = f"a transformer pipeline ({name})"
    if what is not None:
        raise DiginError(f"--model {model} is {what}; digin supports {SUPPORTED}")


def _hub_identity(model: str) -> str:
    """A hub model's identity: its cached snapshot folder, whose name is the revision."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, "unet/config.json")
    return model_identity(Path(found).parent.parent) if isinstance(found, str) else model


def check_model_path(model: str) -> None:
    """A model named like a local path must be a folder; hub ids look like `org/name`."""
    if model in BUILTIN_DIFFUSION_MODELS:
        return
    looks_local = model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or model.endswith("/")
    if looks_local and not Path(model).expanduser().is_dir():
        raise DiginError(
            f"--model {model}: no such folder; give a diffusers model folder, a hub id such as {DEFAULT_MODEL}, "
            f"or a built-in name (--model {_builtin_names()})"
        )


def _builtin_names() -> str:
    return " or --model ".join(sorted(BUILTIN_DIFFUSION_MODELS)) or "tiny"
