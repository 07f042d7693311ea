"""Real images as starting points (uvce, neuron-cf): load and crop, invert with null-text
inversion (cached on disk), reconstruct while recording cross-attention, mask; what a run
loads once; and stacking prepared images into one engine batch."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digin_cli.attention import AttentionControl, attach, find_word_tokens
from digin_cli.engine import GuidedDDIM, OptimConfig, SamplerConfig
from digin_cli.errors import DiginError
from digin_cli.inversion import Inversion, InversionConfig, encode_image, is_finite, null_text_inversions, resolved_lr
from digin_cli.io import ImageReadError, cache_dir, list_images, load_image, load_mask, load_tensors, save_tensors
from digin_cli.masks import Mask, attention_mask, sam_mask, to_latent_grid
from digin_cli.metrics import psnr
from digin_cli.models import Classifier, load_classifier, resolve_class
from digin_cli.objectives import ObjectiveInput, RegionDistance
from digin_cli.tasks.folder_runs import ImageError, WorkItem
from digin_cli.tasks.runtime import RuntimeOptions, open_engine, resolve_runtime

INVERSION_FORMAT = 4  # bump when the cached content or the key changes


@dataclass
class RealImageOptions:
    """How a real image becomes a starting point: caption, inversion, mask, prompt-to-prompt."""

    caption: str | None = None  # default "an image of a <source class>"
    caption_template: str = "an image of a {}"
    captioner: str | None = None  # transformers image-to-text model that extends the default caption
    mask_file: Path | None = None  # the user's own mask (white = class object), or a folder of masks named like the images
    sam_checkpoint: Path | None = None  # SAM-HQ weights; none = the attention map is the mask
    sam_model_type: str | None = None
    # Shares of the DDIM steps whose cross-attention is injected; with several, each
    # counterfactual starts from the one whose prompt-to-prompt start has the lowest loss
    # (the reference's UVCE searches 0.3, 0.4 and 0.5).
    p2p_fractions: tuple[float, ...] = (0.3, 0.4, 0.5)
    inversion: InversionConfig = field(default_factory=InversionConfig)

    def record(self) -> dict[str, Any]:
        """As the run config records it (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def check_real_image_options(real: RealImageOptions, sampler: SamplerConfig) -> None:
    """The real-image options shared by uvce and neuron-cf: the mask and the inversion."""
    # Null-text inversion decays its learning rate as lr * (1 - i / 100) over the steps i
    # (the reference's schedule): past 100 steps it would turn negative.
    if sampler.num_steps > 100:
        raise DiginError(f"--ddim-steps must be at most 100 for null-text inversion (its learning rate decays to 0 at step 100), got {sampler.num_steps}")
    if real.mask_file is not None and not real.mask_file.exists():
        raise DiginError(f"--mask {real.mask_file} does not exist; give a mask image, or a folder of masks named like the images")
    if real.mask_file is not None and real.sam_checkpoint is not None:
        raise DiginError("give either --mask or --sam-checkpoint, not both")


def item_options(real: RealImageOptions, item: WorkItem) -> RealImageOptions:
    """The real-image options of one image: the CSV's caption, and with a folder of masks
    (--mask DIR) the mask with the image's file name stem."""
    mask = real.mask_file
    if mask is not None and mask.is_dir():
        matches = [p for p in list_images(mask) if p.stem == item.path.stem]
        if not matches:
            raise DiginError(f"no mask for {item.path.name} in {mask}; add {item.path.stem}.png (white = object)")
        mask = matches[0]
    return replace(real, caption=item.caption or real.caption, mask_file=mask)


# -- the inversion cache ---------------------------------------------------------------


def inversion_key(image: torch.Tensor, model: str, dtype: str, caption: str, sampler: SamplerConfig,
                  config: InversionConfig, spacing: str = "leading") -> str:  # fmt: skip
    """Cache key: image content, the model's identity (which weights, see DiffusionComponents),
    the UNet dtype, caption, steps, guidance, timestep spacing and the inversion settings."""
    digest = hashlib.sha256()
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    digest.update(pixels.tobytes())
    settings = (INVERSION_FORMAT, model, dtype, caption, sampler.num_steps, sampler.guidance_scale, spacing, asdict(config))
    digest.update(repr(settings).encode())
    return digest.hexdigest()[:32]


def invert_cached(
    engine: GuidedDDIM, image: torch.Tensor, caption: str, sampler: SamplerConfig, config: InversionConfig
) -> tuple[Inversion, bool]:
    """Null-text inversion of (1, 3, H, W), from the cache when the same inversion was done before."""
    return invert_cached_batch(engine, [image], [caption], sampler, config)[0]


def invert_cached_batch(engine: GuidedDDIM, images: list[torch.Tensor], captions: list[str], sampler: SamplerConfig,
                        config: InversionConfig) -> list[tuple[Inversion, bool]]:  # fmt: skip
    """Null-text inversions of several (1, 3, H, W) images, each under its caption: those done
    before from the cache, the others in one batch. Returns (inversion, cache hit) per image."""
    config = replace(config, lr=resolved_lr(engine, config))  # the key holds the lr actually used
    model, dtype = engine.components.identity, str(engine.unet_dtype)
    spacing = engine.components.scheduler.config.timestep_spacing
    keys = [inversion_key(image, model, dtype, text, sampler, config, spacing) for image, text in zip(images, captions)]
    paths = [cache_dir() / "inversions" / f"{key}.pt" for key in keys]
    cached = [load_tensors(path) for path in paths]
    results: list[tuple[Inversion, bool] | None] = [(Inversion(**c), True) if c is not None else None for c in cached]
    missing = [k for k, result in enumerate(results) if result is None]
    if missing:
        inversions = null_text_inversions(
            engine, torch.cat([images[k] for k in missing]), engine.encode_text([captions[k] for k in missing]),
            engine.null_embedding(), sampler, config,
        )  # fmt: skip
        for k, inversion in zip(missing, inversions):
            if is_finite(inversion):  # a failed inversion is never cached: the next run tries again
                save_tensors(asdict(inversion), paths[k])
            results[k] = (inversion, False)
    return results


# -- one image -----------------------------------------------------------------------


@dataclass
class PreparedImage:
    """A real image ready to be edited."""

    name: str
    image: torch.Tensor  # (1, 3, H, W) in [0, 1]
    caption: str
    source_index: int
    inversion: Inversion
    cache_hit: bool
    reconstruction: torch.Tensor  # (1, 3, H, W)
    reconstruction_psnr: float
    mask: Mask
    control: AttentionControl  # holds the recorded cross-attention of the reconstruction
    seconds: float = 0.0  # loading, inversion (or cache read), reconstruction and mask


def prepare_image(
    engine: GuidedDDIM,
    path: Path,
    classifier: Classifier,
    source: str | None,
    options: RealImageOptions,
    sampler: SamplerConfig,
    sam_predictor=None,
    captioner=None,
    record_p2p: bool = True,
) -> PreparedImage:
    """Load, invert (cached), reconstruct while recording attention, and mask one image.
    `record_p2p`: keep the conditional cross-attention that prompt-to-prompt injects
    (uvce); neuron-cf edits no words and needs only the class words' map."""
    (prepared,) = prepare_images(engine, [(path, source, options)], classifier, sampler, sam_predictor, captioner,
                                 record_p2p)  # fmt: skip
    if isinstance(prepared, Exception):
        raise prepared
    return prepared


def prepare_images(
    engine: GuidedDDIM,
    images: list[tuple[Path, str | None, RealImageOptions]],
    classifier: Classifier,
    sampler: SamplerConfig,
    sam_predictor=None,
    captioner=None,
    record_p2p: bool = True,
) -> list[PreparedImage | ImageReadError | DiginError]:
    """prepare_image for several (path, source class, options) at once, their inversions in
    one batch (the options differ in caption and mask only: the inversion settings are the
    run's, taken from the first). Returns per image its PreparedImage, or the error that
    makes it unusable."""
    # 1. Each image as the model sees it, its class and its caption.
    loaded: list[tuple[torch.Tensor, int, str, Any, float] | Exception] = []
    for path, source, options in images:
        started = time.perf_counter()
        try:
            image = load_image(path, engine.components.resolution)[None]  # (1, 3, H, W)
            source_index, caption, span = _source_and_caption(engine, image, classifier, source, options, captioner)
        except ImageError as error:
            loaded.append(error)
        else:
            loaded.append((image, source_index, caption, span, time.perf_counter() - started))
    # 2. Null-text inversion of those that loaded, from the cache when done before, else in one batch.
    ready = [k for k, entry in enumerate(loaded) if not isinstance(entry, Exception)]
    started = time.perf_counter()
    inversions = dict(zip(ready, invert_cached_batch(
        engine, [loaded[k][0] for k in ready], [loaded[k][2] for k in ready], sampler, images[0][2].inversion,
    ))) if ready else {}  # fmt: skip
    inversion_share = (time.perf_counter() - started) / max(1, len(ready))
    # 3. Each reconstruction, with its cross-attention recorded, and the object mask: the
    #    user's file, SAM-HQ from attention points, or the attention map.
    prepared: list[PreparedImage | Exception] = []
    for k, ((path, _, options), entry) in enumerate(zip(images, loaded)):
        if isinstance(entry, Exception):
            prepared.append(entry)
            continue
        started = time.perf_counter()
        image, source_index, caption, span, load_seconds = entry
        inversion, hit = inversions[k]
        if not is_finite(inversion):
            prepared.append(DiginError("its null-text inversion is not finite (with --dtype fp16 the UNet can "
                                       "overflow); use --dtype bf16 or fp32"))
            continue
        store_fraction = max(options.p2p_fractions) if record_p2p else 0.0
        reconstruction, control = _reconstruct(engine, inversion, caption, span, sampler, store_fraction)
        try:
            mask = _object_mask(engine, image, control, options, sam_predictor)
        except ImageError as error:
            prepared.append(error)
            continue
        prepared.append(PreparedImage(
            name=Path(path).stem, image=image, caption=caption, source_index=source_index, inversion=inversion,
            cache_hit=hit, reconstruction=reconstruction, reconstruction_psnr=psnr(reconstruction, image), mask=mask,
            control=control, seconds=load_seconds + inversion_share + time.perf_counter() - started,
        ))  # fmt: skip
    return prepared


def _source_and_caption(engine: GuidedDDIM, image: torch.Tensor, classifier: Classifier, source: str | None,
                        options: RealImageOptions, captioner) -> tuple[int, str, Any]:  # fmt: skip
    """The source class (given, else predicted), the caption and where the class words sit in it."""
    if source is None:
        with torch.no_grad():
            source_index = int(classifier(image.to(engine.device)).argmax(dim=1))
    else:
        source_index = resolve_class(classifier, source)
    source_name = classifier.class_names[source_index]
    caption = options.caption or options.caption_template.format(source_name)
    if captioner is not None and options.caption is None:
        caption = captioner.extend(image[0], caption)
    span = find_word_tokens(engine.components.tokenizer, caption, source_name)
    if span is None:
        raise DiginError(
            f"the caption '{caption}' does not contain the source class name '{source_name}'; "
            "prompt-to-prompt swaps that word for the target's, so put it in --caption"
        )
    return source_index, caption, span


def _reconstruct(engine: GuidedDDIM, inversion: Inversion, caption: str, span, sampler: SamplerConfig,
                 p2p_fraction: float) -> tuple[torch.Tensor, AttentionControl]:  # fmt: skip
    """Sample the inversion back, (1, 3, H, W) on the CPU, recording the cross-attention that
    prompt-to-prompt injects later and the class words' map that makes the mask."""
    T = sampler.num_steps
    control = AttentionControl()
    control.record(
        store_steps=math.ceil(p2p_fraction * T),
        map_steps=max(1, T // 2),  # the reference averages the first half of the steps
        map_tokens=span,
        map_side=engine.components.latent_shape[-1],
    )
    with attach(engine, control), torch.no_grad():
        reconstruction = engine.sample(
            inversion.z_T, engine.encode_text([caption]), inversion.null_embs.to(engine.device), sampler
        ).cpu()
    return reconstruction, control


def _object_mask(engine: GuidedDDIM, image: torch.Tensor, control: AttentionControl, options: RealImageOptions,
                 sam_predictor) -> Mask:  # fmt: skip
    components = engine.components
    size, latent_side = components.resolution, components.latent_shape[-1]
    if options.mask_file is not None:
        pixels, source = load_mask(options.mask_file, size), "file"
    else:
        attention = control.attention_map()  # (1, s, s)
        if attention is None:
            raise DiginError(f"{components.source} has no cross-attention layers to build a mask from; give --mask FILE")
        attention = attention.cpu()
        if sam_predictor is not None:
            array = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            pixels, source = sam_mask(sam_predictor, array, attention), "sam-hq"
        else:
            pixels, source = attention_mask(attention, size), "attention"
    return Mask(pixels=pixels, latents=to_latent_grid(pixels, latent_side), source=source)


# -- what a run loads once -------------------------------------------------------------


@dataclass
class Session:
    """What every real-image run loads once: the classifier, the engine, SAM-HQ if asked for."""

    classifier: Classifier
    engine: GuidedDDIM
    sam_predictor: Any
    optim: OptimConfig  # with view_size set to the classifier's input size
    captioner: Any = None

    def prepare(self, items: list[WorkItem], real: RealImageOptions, sampler: SamplerConfig,
                record_p2p: bool = True) -> list[PreparedImage | ImageReadError | DiginError]:  # fmt: skip
        """Work items' images, each prepared with that item's own options (caption, mask), their
        inversions in one batch; an image that cannot be used gets its error instead."""
        options: list[RealImageOptions | DiginError] = []
        for item in items:
            try:
                options.append(item_options(real, item))
            except DiginError as error:
                options.append(error)
        usable = [(item, option) for item, option in zip(items, options) if not isinstance(option, DiginError)]
        prepared = iter(prepare_images(self.engine, [(item.path, item.source, option) for item, option in usable],
                                       self.classifier, sampler, self.sam_predictor, self.captioner, record_p2p))  # fmt: skip
        return [option if isinstance(option, DiginError) else next(prepared) for option in options]


def open_session(
    classifier_spec: str, runtime: RuntimeOptions, real: RealImageOptions, sampler: SamplerConfig, optim: OptimConfig,
    check=None,
) -> Session:
    """Load everything once; `check(classifier)` validates class names before the heavy loads."""
    device, unet_dtype = resolve_runtime(runtime)
    classifier = load_classifier(classifier_spec, device)
    if check is not None:
        check(classifier)
    engine = open_engine(runtime, device, unet_dtype, sampler)
    sam_predictor = None
    if real.sam_checkpoint is not None:
        from digin_cli.models.segmenter import load_sam_hq

        sam_predictor = load_sam_hq(real.sam_checkpoint, real.sam_model_type, device)
    captioner = None
    if real.captioner is not None:
        from digin_cli.models.captioner import load_captioner

        captioner = load_captioner(real.captioner, device)
    optim = optim.resolved(engine.components, max(classifier.input_size))
    return Session(classifier, engine, sam_predictor, optim, captioner)


# -- several images in one engine batch --------------------------------------------------


@dataclass
class BatchInputs:
    """What the engine needs from B prepared images, each item its own."""

    images: torch.Tensor  # (B, 3, H, W) the originals, on the engine's device
    distance: RegionDistance
    z_T: torch.Tensor  # (B, C, h, w) from each inversion
    null_embs: torch.Tensor  # (T, B, L, D) each inversion's per-step null embeddings


def batch_inputs(engine: GuidedDDIM, prepared: list[PreparedImage], keep_object: bool, weight_latent: float,
                 weight_pixel: float) -> BatchInputs:  # fmt: skip
    """Stack B prepared images for one engine batch. The distance holds each image's object
    (neuron-cf: `keep_object`) or its background (uvce: the mask inverted)."""
    device = engine.device
    images = torch.cat([p.image for p in prepared]).to(device)  # (B, 3, H, W)
    masks = torch.cat([p.mask.pixels for p in prepared]).to(device)  # (B, 1, H, W)
    latent_masks = torch.cat([p.mask.latents for p in prepared]).to(device)  # (B, 1, h, w)
    distance = RegionDistance(
        image=images,
        image_latents=torch.cat([p.inversion.image_latents for p in prepared]).to(device),  # (B, C, h, w)
        keep_pixels=masks if keep_object else 1 - masks,
        keep_latents=latent_masks if keep_object else 1 - latent_masks,
        weight_latent=weight_latent,
        weight_pixel=weight_pixel,
    )
    z_T = torch.cat([p.inversion.z_T for p in prepared])  # (B, C, h, w)
    null_embs = torch.cat([p.inversion.null_embs for p in prepared], dim=1)  # (T, B, L, D)
    return BatchInputs(images, distance, z_T, null_embs)


def plain_input(engine: GuidedDDIM, images: torch.Tensor) -> ObjectiveInput:
    """The originals (B, 3, H, W) as an objective sees a reported iterate: one plain view each."""
    return ObjectiveInput(images, encode_image(engine, images), images.unsqueeze(1))


def inversion_record(prepared: PreparedImage) -> dict[str, Any]:
    """How well the image was inverted, as its record states it."""
    inversion = prepared.inversion
    return {
        "cache_hit": prepared.cache_hit,
        "psnr_ddim_db": round(inversion.psnr_ddim, 3),
        "psnr_null_text_db": round(inversion.psnr_null_text, 3),
        "latent_mse_ddim": round(inversion.latent_mse_ddim, 6),
        "latent_mse_null_text": round(inversion.latent_mse_null_text, 6),
        "seconds": round(inversion.seconds, 3),
    }
