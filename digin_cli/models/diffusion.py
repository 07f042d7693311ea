"""Loading a Stable-Diffusion-style model with diffusers' own loaders.

A model is a Hugging Face hub id (the hub cache and HF_HUB_OFFLINE behave as
with any diffusers code), a local diffusers folder, or the name of a built-in
offline model (see ``builtin.py``), which is a diffusers folder too and goes
through the same loaders.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from digin_cli.components import DiffusionComponents
from digin_cli.errors import DiginError
from digin_cli.families import FAMILIES, SUPPORTED, Family, UnsupportedFamily, folder_reader, recognise
from digin_cli.models.hub import cached_file, hub_unreachable, require_hub

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"

# name -> function that makes sure the built-in model exists on disk and returns its folder
BUILTIN_DIFFUSION_MODELS: dict[str, Callable[[], Path]] = {}

# Optional file in a model folder with digin's defaults for that model (e.g. {"inversion_lr": 0.1}).
SETTINGS_FILE = "digin.json"

# The sub-models a Stable-Diffusion-style repo must have.
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Those with weights: a hub model is in the local cache when these are (as far as its model_index.json names them).
WEIGHTED_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")


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


def load_diffusion(model: str, revision: str | None = None, variant: str | None = None,
                   loras: tuple[str, ...] = ()) -> DiffusionComponents:  # fmt: skip
    """Load the parts of `model`'s pipeline and a DDIM scheduler, with diffusers' loaders.

    SD 1.x / 2.x: UNet, VAE, CLIP text encoder + tokenizer; SDXL and SDXL-Turbo also the
    second text encoder (with projection) and tokenizer. The scheduler's own config (betas,
    prediction_type, timestep spacing) is kept; only its class becomes DDIM, as the method
    needs a deterministic sampler. `revision` and `variant` are from_pretrained's (a hub
    branch or commit; "fp16" weight files); `loras` are "PATH_OR_ID[:SCALE]" LoRA weights,
    fused into the UNet (and text encoders) at their scales.
    """
    quiet_library_output()
    location = model_location(model)
    if is_single_file(model):
        components = load_single_file(Path(location))
    else:
        components = _load_pretrained(model, location, revision, variant)
    for lora in loras:
        fuse_lora(components, lora)
    return components


def model_location(model: str) -> str:
    """Where `model`'s files are: a built-in's folder (made on first use), a local folder or
    file (with ~ expanded), else `model` itself, a hub id."""
    builtin = BUILTIN_DIFFUSION_MODELS.get(model)
    if builtin is not None:
        return str(builtin())
    local = Path(model).expanduser()
    return str(local) if local.exists() else model


def _load_pretrained(model: str, location: str, revision: str | None, variant: str | None) -> DiffusionComponents:
    """A diffusers folder or hub model (`location`), loaded part by part with from_pretrained."""
    # 1. Which family it is, from its config files (each read once); by the hub id's name,
    #    not the cache folder's, when a hub model is read from the cache.
    name, location = location, location if Path(location).exists() else hub_location(model, location, revision)
    local = Path(location)
    read = functools.cache(lambda file: _read_config(location, file, revision))
    family = _recognised(model, name, read)
    if local.is_dir():
        _check_subfolders(model, local, family)
    # 2. The parts, in fp32 whatever the stored dtype: the engine optimizes in fp32 and
    #    autocasts the UNet on CUDA.
    where = {"revision": revision, "variant": variant}
    try:
        parts = {
            "unet": UNet2DConditionModel.from_pretrained(location, subfolder="unet", torch_dtype=torch.float32, **where),
            "vae": AutoencoderKL.from_pretrained(location, subfolder="vae", torch_dtype=torch.float32, **where),
            "text_encoder": CLIPTextModel.from_pretrained(location, subfolder="text_encoder", dtype=torch.float32, **where),
            "tokenizer": CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", revision=revision),
            # Whatever the stored config says, x0 is never clipped or thresholded: the engine's own
            # DDIM update (engine/ddim.py) does neither, and the scheduler object says so too.
            "scheduler": DDIMScheduler.from_pretrained(location, subfolder="scheduler", revision=revision,
                                                       clip_sample=False, thresholding=False),
        }  # fmt: skip
        if family.dual_text_encoder:
            parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                location, subfolder="text_encoder_2", dtype=torch.float32, **where
            )
            parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer_2", revision=revision)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise _load_error(model, local, error) from error
    # 3. Checks of what was loaded, digin's settings.
    if parts["unet"].config.in_channels != parts["vae"].config.latent_channels:
        raise DiginError(f"--model {model} has a {parts['unet'].config.in_channels}-channel UNet for "
                         f"{parts['vae'].config.latent_channels}-channel latents; digin supports {SUPPORTED}")  # fmt: skip
    settings = _read_settings(local) if local.is_dir() else {}
    index = read("model_index.json") or {}
    return DiffusionComponents(
        **parts, source=model, family=family.name,
        identity=model_identity(local) if local.is_dir() else _hub_identity(model, revision),
        settings=settings, force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
    )  # fmt: skip


def _check_subfolders(model: str, folder: Path, family: Family) -> None:
    wanted = SUBFOLDERS + (("text_encoder_2", "tokenizer_2") if family.dual_text_encoder else ())
    missing = [name for name in wanted if not (folder / name).is_dir()]
    if missing:
        raise DiginError(
            f"'{model}' is a folder but not a Stable-Diffusion-style diffusers model: it lacks "
            f"{', '.join(m + '/' for m in missing)}. Pass a folder saved with a diffusers pipeline's "
            f"save_pretrained, a hub id such as {DEFAULT_MODEL}, or the built-in offline model with "
            f"--model {_builtin_names()}."
        )


def _read_settings(folder: Path) -> dict:
    """digin's defaults shipped in a model folder's digin.json ({} without one)."""
    if not (folder / SETTINGS_FILE).is_file():
        return {}
    try:
        return json.loads((folder / SETTINGS_FILE).read_text())
    except (OSError, ValueError) as error:
        raise DiginError(f"{folder / SETTINGS_FILE} is not valid JSON ({error}); fix or delete it") from None


def _load_error(model: str, local: Path, error: Exception) -> DiginError:
    where = "the local folder" if local.is_dir() else "the Hugging Face hub (or its local cache)"
    reason = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
    return DiginError(
        f"could not load the diffusion model '{model}' from {where}: {reason}. "
        f"A hub model must be downloaded once with network access (for example "
        f"`hf download {model if '/' in model else DEFAULT_MODEL}`) and is then read "
        "from the cache, also with HF_HUB_OFFLINE=1; a local folder must hold a diffusers "
        f"Stable Diffusion model ({', '.join(SUBFOLDERS)}). With no network, use the built-in "
        f"offline model: --model {_builtin_names()}."
    )


def _read_config(location: str, file: str, revision: str | None = None) -> dict | None:
    """A config file of a local folder or a hub model (from the cache, else fetched: a few
    kB, so the family is known before the weights are downloaded); None when absent."""
    folder = Path(location)
    if folder.is_dir():
        return folder_reader(folder)(file)
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        found = try_to_load_from_cache(location, file, revision=revision)
        if not isinstance(found, str):
            found = hf_hub_download(location, file, revision=revision)
    except (OSError, ValueError, HfHubHTTPError, OfflineModeIsEnabled):  # not a hub id, offline, no such file
        return None
    try:
        return json.loads(Path(found).read_text())
    except (OSError, ValueError):
        return None


def detect_family(model: str, revision: str | None = None) -> Family:
    """The family of `model` (a built-in name, a folder, a single file or a hub id) from its
    config files, read without loading any weights; one line naming what it is when digin
    does not sample it."""
    if is_single_file(model):
        return single_file_family(Path(model).expanduser())
    name = model_location(model)
    location = name if Path(name).exists() else hub_location(model, name, revision)
    return _recognised(model, name, lambda file: _read_config(location, file, revision))


def hub_location(model: str, repo_id: str, revision: str | None = None) -> str:
    """Where the hub model `repo_id` is read from: the hub id (the libraries keep the cache up to
    date), or, when the hub cannot be reached, the model's folder in the local cache, read
    without a request (the libraries would ask the hub for optional files such as adapter
    configs and shard indexes, and retry each). A model missing from the cache with no hub
    to fetch it from fails at once."""
    snapshot = _cached_pipeline(repo_id, revision)
    if snapshot is None:
        require_hub(repo_id, f"--model {model}", f"or give a local diffusers folder with --model PATH "
                    f"(no network needed: --model {_builtin_names()})", revision)  # fmt: skip
        return repo_id
    return repo_id if hub_unreachable() is None else str(snapshot)


def _cached_pipeline(repo_id: str, revision: str | None) -> Path | None:
    """The cache's folder of the pipeline when it holds the weights of every model its
    model_index.json names, else None."""
    index = cached_file(repo_id, "model_index.json", revision)
    if index is None:
        return None
    try:
        parts = [name for name in json.loads(index.read_text()) if name in WEIGHTED_SUBFOLDERS]
    except (OSError, ValueError, TypeError):
        return None
    complete = bool(parts) and all(_has_weights(index.parent / part) for part in parts)
    return index.parent if complete else None


def _has_weights(folder: Path) -> bool:
    return any(file.suffix in (".safetensors", ".bin") for file in folder.glob("*"))


def _recognised(model: str, location: str, read) -> Family:
    try:
        return recognise(location, read)
    except UnsupportedFamily as error:
        raise DiginError(f"--model {model} is {error}; digin supports {SUPPORTED}") from None


def fuse_lora(components: DiffusionComponents, spec: str) -> None:
    """Fuse the LoRA weights of `spec` ("PATH_OR_ID[:SCALE]", scale 1 by default) into the
    components' UNet and text encoders, with diffusers' own LoRA loader (peft underneath)."""
    path, scale = parse_lora(spec)
    pipeline = components.as_pipeline()
    try:
        pipeline.load_lora_weights(path, adapter_name="digin")
        pipeline.fuse_lora(lora_scale=scale, adapter_names=["digin"])
        pipeline.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DiginError(f"--lora {spec}: could not load LoRA weights ({reason}); give a .safetensors file, "
                         "a folder with pytorch_lora_weights.safetensors, or a hub id") from None  # fmt: skip
    components.identity += f"+lora:{Path(path).resolve() if Path(path).exists() else path}:{scale:g}"


def parse_lora(spec: str) -> tuple[str, float]:
    """'PATH_OR_ID[:SCALE]' -> (path, scale); one line naming the option when it is malformed."""
    head, separator, tail = spec.rpartition(":")
    scaled = bool(separator) and _is_number(tail)
    if separator and head and not scaled and not _colon_in_path(spec, tail):
        raise DiginError(f"--lora {spec}: the scale '{tail}' is not a number; give PATH_OR_ID[:SCALE], "
                         "e.g. my_lora.safetensors:0.8")  # fmt: skip
    path, value = (head, float(tail)) if scaled else (spec, 1.0)
    if not path or not math.isfinite(value):
        raise DiginError(f"--lora {spec}: give PATH_OR_ID or PATH_OR_ID:SCALE with a finite SCALE, e.g. style.safetensors:0.8")
    if Path(path).suffix in (".safetensors", ".bin") and not Path(path).expanduser().is_file():
        raise DiginError(f"--lora {spec}: no such file; give an existing .safetensors file, a folder or a hub id")
    return str(Path(path).expanduser()) if Path(path).expanduser().exists() else path, value


def _colon_in_path(spec: str, tail: str) -> bool:
    """Whether the last colon of `spec` belongs to its path: a file or folder named so, or a
    Windows drive (C:\\loras\\style); hub ids have no colon, so any other tail was meant as a scale."""
    return Path(spec).expanduser().exists() or tail.startswith(("\\", "/"))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# One-file checkpoints in the original (LDM / SGM) layout, as most fine-tuned models are shared.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def is_single_file(model: str) -> bool:
    return Path(model).suffix in SINGLE_FILE_SUFFIXES and Path(model).expanduser().is_file()


def load_single_file(path: Path) -> DiffusionComponents:
    """A one-file checkpoint through diffusers' from_single_file: its keys say the pipeline
    (SDXL when the second text encoder's are there), and the configs of the components come
    from the hub repository diffusers names for that kind of checkpoint (a few kB, fetched
    once, then read from the cache), or, beside the file, from a diffusers folder named like
    it without its suffix (`model.safetensors` + `model/`) when there is one."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    family = single_file_family(path)
    pipeline_class = StableDiffusionXLPipeline if family.dual_text_encoder else StableDiffusionPipeline
    config_folder = path.with_suffix("")
    extra = {"config": str(config_folder)} if config_folder.is_dir() else {}
    if pipeline_class is StableDiffusionPipeline:
        extra.update(safety_checker=None, requires_safety_checker=False)
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    try:
        pipeline = pipeline_class.from_single_file(str(path), torch_dtype=torch.float32, **extra)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SingleFileComponentError) as error:
        reason = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
        raise DiginError(
            f"--model {path}: could not load the single-file checkpoint ({reason}). Its component configs "
            "come from the hub once (network needed the first time), or from a diffusers folder beside it "
            f"named {config_folder.name}/"
        ) from None
    parts = {name: getattr(pipeline, name) for name in ("unet", "vae", "text_encoder", "tokenizer")}
    if family.dual_text_encoder:
        parts.update(text_encoder_2=pipeline.text_encoder_2, tokenizer_2=pipeline.tokenizer_2)
    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, clip_sample=False, thresholding=False)
    settings = _read_settings(config_folder) if config_folder.is_dir() else {}
    return DiffusionComponents(**parts, scheduler=scheduler, source=str(path), family=family.name,
                               identity=model_identity(path), settings=settings)  # fmt: skip


def single_file_family(path: Path) -> Family:
    """The family of a one-file checkpoint from its tensor names (read without the tensors for
    .safetensors): SDXL's have a second text encoder (conditioner.embedders.1), SD 2.x's an
    OpenCLIP one (cond_stage_model.model), SD 1.x's a CLIP one; "turbo" in the file name makes
    it the family's Turbo model. v-prediction SD 2.x files cannot be told from their tensors:
    they sample as their configs say."""
    from safetensors import safe_open

    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
        else:
            keys = list(torch.load(path, map_location="meta", weights_only=True, mmap=True).get("state_dict", {}))
    except Exception as error:  # a damaged or foreign file: safetensors and torch raise many kinds
        raise DiginError(f"--model {path}: not a readable checkpoint ({type(error).__name__}); give a .safetensors "
                         "or .ckpt Stable Diffusion checkpoint, or a diffusers folder") from None  # fmt: skip
    turbo = "turbo" in path.name.lower()
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return FAMILIES["sdxl-turbo" if turbo else "sdxl"]
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise DiginError(f"--model {path}: no Stable Diffusion UNet in this checkpoint (no model.diffusion_model.* tensors)")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return FAMILIES["sd-turbo" if turbo else "sd2"]
    return FAMILIES["sd1"]


def model_identity(folder: Path) -> str:
    """The folder's absolute path (for a hub model the snapshot folder, which names the
    revision) and the sizes and modification times of its UNet files: the same string
    for the same weights, another one when the weights are replaced."""
    folder = folder.resolve()
    if folder.is_file():  # a single-file checkpoint
        files = [folder]
    else:
        unet = folder / "unet" if (folder / "unet").is_dir() else folder
        files = [p for p in unet.iterdir() if p.is_file()]
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    digest = hashlib.sha256(repr(stats).encode()).hexdigest()[:12]
    return f"{folder}@{digest}"


def _hub_identity(model: str, revision: str | None = None) -> str:
    """A hub model's identity: its cached snapshot folder, whose name is the revision."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, "unet/config.json", revision=revision)
    return model_identity(Path(found).parent.parent) if isinstance(found, str) else model


def check_model_path(model: str) -> None:
    """A model named like a local path must be a folder; hub ids look like `org/name`."""
    if model in BUILTIN_DIFFUSION_MODELS or is_single_file(model):
        return
    if Path(model).suffix in SINGLE_FILE_SUFFIXES:
        raise DiginError(f"--model {model}: no such file; give an existing .safetensors / .ckpt checkpoint, a diffusers folder or a hub id")
    looks_local = model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or model.endswith("/")
    if looks_local and not Path(model).expanduser().is_dir():
        raise DiginError(
            f"--model {model}: no such folder; give a diffusers model folder, a hub id such as {DEFAULT_MODEL}, "
            f"or a built-in name (--model {_builtin_names()})"
        )


def _builtin_names() -> str:
    return " or --model ".join(sorted(BUILTIN_DIFFUSION_MODELS)) or "tiny"
