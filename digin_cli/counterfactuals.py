"""Jobs on real images: visual counterfactuals (`digin uvce`).

Per image: load and crop it (io), invert it with null-text inversion (cached on disk,
keyed by image content, model, caption, steps and guidance), reconstruct it while
recording cross-attention, build the foreground mask, then for every target class
start from the prompt-to-prompt edit and optimize with the engine. Several images (or
targets) can share one engine batch (`batch_size`): each keeps its own inversion, mask,
prompt-to-prompt attention, loss and best iterate. Items are written atomically and a
finished item is skipped when the same command runs again.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digin_cli.attention import AttentionControl, attach, find_word_tokens, token_mapping
from digin_cli.engine import GuidedDDIM, HoldRegion, OptimConfig, SamplerConfig
from digin_cli.errors import DiginError
from digin_cli.inversion import (
    Inversion,
    InversionConfig,
    encode_image,
    masked_psnr,
    null_text_inversion,
    psnr,
    resolved_lr,
)
from digin_cli.io import (
    ImageReadError,
    cache_dir,
    labelled_sheet,
    list_images,
    load_image,
    load_mask,
    load_tensors,
    merge_summary_parts,
    save_png,
    save_tensors,
    write_json,
    write_jsonl,
)
from digin_cli.masks import Mask, attention_mask, latent_cells, object_core, sam_mask, to_latent_grid
from digin_cli.models import Classifier, load_classifier, load_diffusion, resolve_class
from digin_cli.objectives import Counterfactual, ObjectiveInput, RegionDistance
from digin_cli.runs import NoProgress, Progress, RuntimeOptions, check_common, resolve_device, resolve_dtype, slug, versions

INVERSION_FORMAT = 2  # bump when the cached content changes


@dataclass
class RealImageOptions:
    """How a real image becomes a starting point: caption, inversion, mask, prompt-to-prompt."""

    caption: str | None = None  # default "an image of a <source class>"
    caption_template: str = "an image of a {}"
    captioner: str | None = None  # transformers image-to-text model that extends the default caption
    mask_file: Path | None = None  # the user's own mask (white = class object), or a folder of masks named like the images
    sam_checkpoint: Path | None = None  # SAM-HQ weights; none = the attention map is the mask
    sam_model_type: str | None = None
    p2p_fraction: float = 0.3  # share of the DDIM steps whose cross-attention is injected
    inversion: InversionConfig = field(default_factory=InversionConfig)


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


def inversion_key(image: torch.Tensor, model: str, caption: str, sampler: SamplerConfig, config: InversionConfig) -> str:
    """Cache key: image content, model, caption, steps, guidance and the inversion settings."""
    digest = hashlib.sha256()
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    digest.update(pixels.tobytes())
    digest.update(repr((INVERSION_FORMAT, model, caption, sampler.num_steps, sampler.guidance_scale, asdict(config))).encode())
    return digest.hexdigest()[:32]


def invert_cached(
    engine: GuidedDDIM, image: torch.Tensor, caption: str, sampler: SamplerConfig, config: InversionConfig
) -> tuple[Inversion, bool]:
    """Null-text inversion of (1, 3, H, W), from the cache when the same inversion was done before."""
    config = replace(config, lr=resolved_lr(engine, config))  # the key holds the lr actually used
    key = inversion_key(image, engine.components.source, caption, sampler, config)
    path = cache_dir() / "inversions" / f"{key}.pt"
    cached = load_tensors(path)
    if cached is not None:
        return Inversion(**cached), True
    prompt_emb = engine.encode_text([caption])
    null_emb = engine.encode_text([""])
    inversion = null_text_inversion(engine, image, prompt_emb, null_emb, sampler, config)
    save_tensors(asdict(inversion), path)
    return inversion, False


def prepare_image(
    engine: GuidedDDIM,
    path: Path,
    classifier: Classifier,
    source: str | None,
    options: RealImageOptions,
    sampler: SamplerConfig,
    sam_predictor=None,
    captioner=None,
) -> PreparedImage:
    """Load, invert (cached), reconstruct while recording attention, and mask one image."""
    started = time.perf_counter()
    components = engine.components
    size = components.resolution
    image = load_image(path, size)[None]  # (1, 3, H, W)
    if source is None:
        with torch.no_grad():
            source_index = int(classifier(image.to(engine.device)).argmax(dim=1))
    else:
        source_index = resolve_class(classifier, source)
    source_name = classifier.class_names[source_index]
    caption = options.caption or options.caption_template.format(source_name)
    if captioner is not None and options.caption is None:
        caption = captioner.extend(image[0], caption)
    span = find_word_tokens(components.tokenizer, caption, source_name)
    if span is None:
        raise DiginError(
            f"the caption '{caption}' does not contain the source class name '{source_name}'; "
            "prompt-to-prompt swaps that word for the target's, so put it in --caption"
        )
    inversion, hit = invert_cached(engine, image, caption, sampler, options.inversion)

    T = sampler.num_steps
    control = AttentionControl()
    control.record(
        store_steps=math.ceil(options.p2p_fraction * T),
        map_steps=max(1, T // 2),  # the reference averages the first half of the steps
        map_tokens=span,
        map_side=components.latent_shape[-1],
    )
    with attach(engine, control), torch.no_grad():
        reconstruction = engine.sample(
            inversion.z_T, engine.encode_text([caption]), inversion.null_embs.to(engine.device), sampler
        ).cpu()
    latent_side = components.latent_shape[-1]
    if options.mask_file is not None:
        pixels = load_mask(options.mask_file, size)
        source_name_mask = "file"
    else:
        attention = control.attention_map()  # (1, s, s)
        if attention is None:
            raise DiginError(f"{components.source} has no cross-attention layers to build a mask from; give --mask FILE")
        attention = attention.cpu()
        if sam_predictor is not None:
            array = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            pixels, source_name_mask = sam_mask(sam_predictor, array, attention), "sam-hq"
        else:
            pixels, source_name_mask = attention_mask(attention, size), "attention"
    mask = Mask(pixels=pixels, latents=to_latent_grid(pixels, latent_side), source=source_name_mask)
    return PreparedImage(
        name=Path(path).stem,
        image=image,
        caption=caption,
        source_index=source_index,
        inversion=inversion,
        cache_hit=hit,
        reconstruction=reconstruction,
        reconstruction_psnr=psnr(reconstruction, image),
        mask=mask,
        control=control,
        seconds=time.perf_counter() - started,
    )


def swap_class(caption: str, source_name: str, target_name: str) -> str:
    """The caption with the source class words replaced by the target class words (first occurrence)."""
    lower = caption.lower()
    at = lower.find(source_name.lower())
    if at < 0:
        return caption
    return caption[:at] + target_name + caption[at + len(source_name) :]


def heat_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| averaged over channels, as a black-red-yellow-white map: (3, H, W) -> (3, H, W)."""
    diff = (a - b).abs().mean(dim=0)  # (H, W)
    x = diff / diff.max().clamp_min(1e-6)
    return torch.stack([(3 * x).clamp(0, 1), (3 * x - 1).clamp(0, 1), (3 * x - 2).clamp(0, 1)])


def mask_overlay(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(3, H, W) image with the (1, H, W) mask tinted red."""
    red = torch.tensor([1.0, 0.1, 0.1]).view(3, 1, 1)
    alpha = 0.55 * mask
    return image * (1 - alpha) + red * alpha


# -- uvce -----------------------------------------------------------------------------


@dataclass
class UvceJob:
    classifier: str
    inputs: Path  # an image file or a folder of images
    targets: list[str]
    out: Path
    source_class: str | None = None  # default: the classifier's prediction (or the CSV's)
    csv_file: Path | None = None  # file,class[,target] rows for a folder
    weight_latent: float = 25.0
    weight_pixel: float = 250.0
    batch_size: int = 1  # counterfactuals (image x target) optimized together in one engine batch
    real: RealImageOptions = field(default_factory=RealImageOptions)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class WorkItem:
    path: Path
    source: str | None
    targets: list[str]
    caption: str | None = None  # from the CSV's caption column; overrides --caption for this image


CSV_COLUMNS = ("file", "class", "target", "caption")


def read_csv(path: Path, folder: Path, default_targets: list[str], need_target: bool = True) -> list[WorkItem]:
    """Rows `file,class[,target]`. A first row with a cell 'file' is a header and may name the
    columns in any order: file, class, target, caption (the caption for that image's inversion)."""
    if not path.is_file():
        raise DiginError(f"--csv {path} does not exist; give a file with rows file,class[,target]")
    columns = ["file", "class", "target"]
    items = []
    with open(path, newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            row = [cell.strip() for cell in row]
            if not row or not row[0] or row[0].startswith("#"):
                continue
            if number == 1 and "file" in (cell.lower() for cell in row):
                columns = [cell.lower() for cell in row]
                unknown = sorted(set(columns) - set(CSV_COLUMNS))
                if unknown or "class" not in columns:
                    problem = f"unknown column(s) {', '.join(unknown)}" if unknown else "no class column"
                    raise DiginError(f"--csv {path} header: {problem}; columns are {', '.join(CSV_COLUMNS)} (file and class needed)")
                continue
            cells = dict(zip(columns, row))
            if not cells.get("class"):
                raise DiginError(f"--csv {path} line {number}: expected {','.join(columns)}, got {','.join(row)}")
            targets = [cells["target"]] if cells.get("target") else default_targets
            if need_target and not targets:
                raise DiginError(f"--csv {path} line {number}: no target; add a target column or give --target")
            items.append(WorkItem(folder / cells["file"], cells["class"], targets, cells.get("caption") or None))
    return items


def work_items(
    inputs: Path, csv_file: Path | None, source_class: str | None, targets: list[str], need_target: bool = True
) -> list[WorkItem]:
    """The images of a run: one file, a folder, or a folder with a CSV of classes."""
    if not inputs.exists():
        raise DiginError(f"{inputs} does not exist; give an image file or a folder of images")
    if inputs.is_dir():
        if csv_file is not None:
            return read_csv(csv_file, inputs, targets, need_target)
        images = list_images(inputs)
        if not images:
            raise DiginError(f"no image files in {inputs}; supported: png, jpg, webp, bmp, tif, gif")
        return [WorkItem(p, source_class, targets) for p in images]
    return [WorkItem(inputs, source_class, targets)]


def _check_uvce(job: UvceJob) -> None:
    check_common(job.out, job.sampler, job.optim, job.batch_size)
    if not job.targets and job.csv_file is None:
        raise DiginError("give at least one --target class")
    if not 0.0 <= job.real.p2p_fraction <= 1.0:
        raise DiginError(f"--p2p-fraction must be between 0 and 1, got {job.real.p2p_fraction}")
    if job.weight_latent < 0 or job.weight_pixel < 0:
        raise DiginError("--w-latent and --w-pixel must be 0 or more")
    _check_mask_options(job.real)


def _check_mask_options(real: RealImageOptions) -> None:
    """The mask options shared by uvce and neuron-cf."""
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


@dataclass
class Session:
    """What every real-image run loads once: the classifier, the engine, SAM-HQ if asked for."""

    classifier: Classifier
    engine: GuidedDDIM
    sam_predictor: Any
    optim: OptimConfig  # with view_size set to the classifier's input size
    captioner: Any = None


def open_session(
    classifier_spec: str, runtime: RuntimeOptions, real: RealImageOptions, optim: OptimConfig, check=None
) -> Session:
    """Load everything once; `check(classifier)` validates class names before the heavy loads."""
    device = resolve_device(runtime.device)
    unet_dtype = resolve_dtype(runtime.dtype, device)
    classifier = load_classifier(classifier_spec, device)
    if check is not None:
        check(classifier)
    engine = GuidedDDIM(load_diffusion(runtime.model), device=device, unet_dtype=unet_dtype, compile_unet=runtime.compile)
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


def run_uvce(job: UvceJob, progress: Progress | None = None) -> dict[str, Any]:
    """Visual counterfactuals of real images for a classifier (paper section 5)."""
    progress = progress or NoProgress()
    started = time.perf_counter()
    _check_uvce(job)
    items = work_items(job.inputs, job.csv_file, job.source_class, job.targets)

    def resolve_targets(classifier: Classifier) -> None:
        # Class names as the classifier spells them: a misspelt target fails before any heavy
        # work, and file names do not depend on how the user wrote the class.
        for item in items:
            item.targets = [classifier.class_names[resolve_class(classifier, t)] for t in item.targets]

    session = open_session(job.classifier, job.runtime, job.real, job.optim, check=resolve_targets)
    engine, classifier, optim = session.engine, session.classifier, session.optim
    components = engine.components

    config = {
        "classifier": job.classifier,
        "model": job.runtime.model,
        "dtype": job.runtime.dtype,
        "compile": job.runtime.compile,
        "inputs": str(job.inputs),
        "targets": job.targets,
        "weight_latent": job.weight_latent,
        "weight_pixel": job.weight_pixel,
        "real": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(job.real).items()},
        "resolution": components.resolution,
        "sampler": asdict(job.sampler),
        "optim": asdict(optim),
    }

    def prepare(item: WorkItem) -> PreparedImage:
        return prepare_image(engine, item.path, classifier, item.source, item_options(job.real, item), job.sampler,
                             session.sam_predictor, session.captioner)  # fmt: skip

    def run_batch(tasks: list[Task]) -> list[dict[str, Any]]:
        return _counterfactuals(engine, classifier, tasks, job, optim, config, progress)

    summary = run_items(
        items, job.out, lambda item: {t: f"{slug(item.path.stem)}_{slug(t)}.json" for t in item.targets},
        prepare, run_batch, job.batch_size,
    )  # fmt: skip
    return {"command": "uvce", "out": str(job.out), "items": summary, "seconds": round(time.perf_counter() - started, 3)}


@dataclass
class Task:
    """One unit of engine work: a label of an item (a target class for uvce, the neuron for
    neuron-cf) on its prepared image. Tasks of several images share an engine batch."""

    item: WorkItem
    prepared: PreparedImage
    label: str
    stem: str  # file name stem of the outputs


@dataclass(frozen=True)
class Shard:
    """This process's share of a folder run: items index, index + count, index + 2 count, ...

    `accelerate launch` (like torchrun) starts one process per GPU and tells each its RANK
    and the WORLD_SIZE; a plain run is the only shard. Shards write into the same output
    folder; summary.jsonl is merged from every shard's part (see merge_summary_parts)."""

    index: int = 0
    count: int = 1

    @classmethod
    def from_environment(cls) -> Shard:
        try:
            count, index = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        except ValueError:
            raise DiginError("RANK and WORLD_SIZE must be integers (they are set by accelerate launch / torchrun)") from None
        if count < 1 or not 0 <= index < count:
            raise DiginError(f"RANK {index} is not between 0 and WORLD_SIZE - 1 ({count - 1})")
        return cls(index, count)

    def take(self, items: list[WorkItem]) -> list[WorkItem]:
        return items[self.index :: self.count]


SUMMARY_PARTS = ".summary-parts"  # per-shard summaries of a multi-process run, merged into summary.jsonl


def run_items(
    items: list[WorkItem], out: Path, outputs, prepare, run_batch, batch_size: int = 1, shard: Shard | None = None
) -> list[dict[str, Any]]:
    """The resumable loop of a real-image run, over this process's shard of `items`.

    outputs(item) -> {label: json file name}: an item's label is finished when its JSON
    exists (JSONs are written last, atomically), and is then skipped. prepare(item) loads,
    inverts and masks one image; the pending labels of prepared images queue up as Tasks,
    and run_batch(tasks) runs up to `batch_size` of them in one engine batch, writes their
    files and returns one summary entry per task. A bad file fails alone, in prepare; the
    run goes on. summary.jsonl is rewritten after every image and batch (with several
    shards: this shard's part, then the merge of all parts), in folder order.
    Raises DiginError at the end when any item of this shard failed."""
    shard = shard or Shard.from_environment()
    mine = shard.take(items)
    position = {str(item.path): k for k, item in enumerate(items)}
    in_order = lambda entry: position.get(entry["file"], len(items))  # noqa: E731
    summary: list[dict[str, Any]] = []
    failures: list[str] = []
    queue: list[Task] = []
    out.mkdir(parents=True, exist_ok=True)

    def write_summary() -> None:
        summary.sort(key=in_order)  # stable: an image's labels keep their order
        if shard.count == 1:
            write_jsonl(summary, out / "summary.jsonl")
            return
        parts = out / SUMMARY_PARTS
        write_jsonl(summary, parts / f"{shard.index}-of-{shard.count}.jsonl")
        merge_summary_parts(parts, out / "summary.jsonl", order=in_order)

    def fail(path: Path, error: Exception) -> None:
        failures.append(f"{path.name}: {error}")
        summary.append({"file": str(path), "status": "failed", "error": str(error)})

    def flush() -> None:
        batch = queue[:batch_size]
        del queue[:batch_size]
        try:
            entries = run_batch(batch)
        except DiginError as error:
            for path in dict.fromkeys(task.item.path for task in batch):
                fail(path, error)
        else:
            summary.extend({"file": str(task.item.path), **entry} for task, entry in zip(batch, entries))
        write_summary()

    for item in mine:
        names = outputs(item)
        pending = [label for label, name in names.items() if not (out / name).is_file()]
        for label, name in names.items():
            if label not in pending:
                summary.append({"file": str(item.path), "label": label, "json": name, "status": "done earlier"})
        if pending:
            try:
                prepared = prepare(item)
            except (ImageReadError, DiginError) as error:
                fail(item.path, error)
            else:
                queue.extend(Task(item, prepared, label, slug(item.path.stem)) for label in pending)
        while len(queue) >= batch_size:
            flush()
        write_summary()
    while queue:
        flush()
    if not mine:
        write_summary()  # a shard with nothing to do still leaves its (empty) part
    if failures:
        if len(mine) == 1:
            raise DiginError(failures[0])
        raise DiginError(
            f"{len(failures)} of {len(mine)} images failed ({failures[0]}); the others are in {out}, "
            "see summary.jsonl; rerun the same command to retry only the missing ones"
        )
    return summary


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


@dataclass
class Edit:
    """What one uvce task changes: the class, the caption and prompt-to-prompt's token mapping."""

    label: str  # the target as the run names it (the summary's label)
    target_index: int
    target_name: str
    source_name: str
    target_caption: str
    mapping: torch.Tensor | None  # (L, L) source -> target caption tokens; None keeps positions


def _edit(components, classifier: Classifier, prepared: PreparedImage, target: str) -> Edit:
    target_index = resolve_class(classifier, target)
    target_name = classifier.class_names[target_index]
    source_name = classifier.class_names[prepared.source_index]
    target_caption = swap_class(prepared.caption, source_name, target_name)
    source_span = find_word_tokens(components.tokenizer, prepared.caption, source_name)
    target_span = find_word_tokens(components.tokenizer, target_caption, target_name)
    length = components.tokenizer.model_max_length
    mapping = token_mapping(source_span, target_span, length) if target_span is not None else None
    return Edit(target, target_index, target_name, source_name, target_caption, mapping)


def _counterfactuals(
    engine: GuidedDDIM,
    classifier: Classifier,
    tasks: list[Task],
    job: UvceJob,
    optim: OptimConfig,
    config: dict[str, Any],
    progress: Progress,
) -> list[dict[str, Any]]:
    """Counterfactuals of B tasks (image x target) in one engine batch: each starts from its own
    prompt-to-prompt edit and inversion, keeps its own background; writes every task's files."""
    started = time.perf_counter()
    prepared = [task.prepared for task in tasks]
    edits = [_edit(engine.components, classifier, p, task.label) for p, task in zip(prepared, tasks)]
    batch = batch_inputs(engine, prepared, False, job.weight_latent, job.weight_pixel)  # the background stays
    targets = [e.target_index for e in edits]
    sources = [p.source_index for p in prepared]
    objective = Counterfactual(classifier, targets, sources, batch.distance)
    inject_steps = math.ceil(job.real.p2p_fraction * job.sampler.num_steps)
    control = AttentionControl.for_batch([p.control for p in prepared], [e.mapping for e in edits], inject_steps)
    label = ", ".join(f"{p.name} -> {e.target_name}" for p, e in zip(prepared, edits))
    progress.start(label if len(label) <= 60 else f"{len(tasks)} counterfactuals ({label[:40]}...)", optim.steps)
    try:
        with attach(engine, control):
            result = engine.optimize(
                objective,
                batch.z_T,
                engine.encode_text([e.target_caption for e in edits]),  # (B, L, D)
                batch.null_embs,
                job.sampler,
                optim,
                on_step=progress.step,
            )
    finally:
        progress.finish()
    with torch.no_grad():
        original = objective(_plain_input(engine, batch.images)).metrics  # name -> (B,)
    share = (time.perf_counter() - started) / len(tasks)  # each task's share of the batch
    return [
        _write_counterfactual(task.prepared, edit, {k: float(v[b]) for k, v in original.items()}, result, b, job, config,
                              task.stem, task.prepared.seconds + share)  # fmt: skip
        for b, (task, edit) in enumerate(zip(tasks, edits))
    ]


def _write_counterfactual(
    prepared: PreparedImage,
    edit: Edit,
    original: dict[str, float],
    result,
    b: int,
    job: UvceJob,
    config: dict[str, Any],
    stem: str,
    seconds: float,
) -> dict[str, Any]:
    """Files, record and summary entry of item b of a batch's result."""
    target_index, target_name, source_name = edit.target_index, edit.target_name, edit.source_name
    target_caption = edit.target_caption
    start, best = result.initial(b), result.best(b)
    counterfactual = result.best_images[b]
    base = f"{stem}_{slug(target_name)}"
    files = {
        "original": f"{base}_original.png",
        "reconstruction": f"{base}_reconstruction.png",
        "p2p_start": f"{base}_p2p.png",
        "counterfactual": f"{base}_counterfactual.png",
        "mask": f"{base}_mask.png",
        "difference": f"{base}_difference.png",
        "sheet": f"{base}_sheet.png",
    }
    out = job.out
    save_png(prepared.image[0], out / files["original"])
    save_png(prepared.reconstruction[0], out / files["reconstruction"])
    save_png(result.initial_images[b], out / files["p2p_start"])
    save_png(counterfactual, out / files["counterfactual"])
    overlay = mask_overlay(prepared.image[0], prepared.mask.pixels[0])
    difference = heat_map(counterfactual, prepared.image[0])
    save_png(overlay, out / files["mask"])
    save_png(difference, out / files["difference"])

    def lines(title: str, metrics: dict[str, float]) -> list[str]:
        return [title, f"p({source_name}) {metrics['p_source']:.3f}", f"p({target_name}) {metrics['p_target']:.3f}"]

    sheet = labelled_sheet(
        [
            (prepared.image[0], lines("original", original)),
            (result.initial_images[b], lines("p2p start", start)),
            (counterfactual, lines(f"counterfactual (step {result.best_steps[b]})", best)),
            (overlay, [f"mask ({prepared.mask.source})"]),
            (difference, ["difference"]),
        ],
        title=f"{prepared.name}: {source_name} -> {target_name}  ({job.classifier})",
    )
    save_png(sheet, out / files["sheet"])
    rounded = lambda metrics: {k: round(v, 6) for k, v in metrics.items()}  # noqa: E731
    background = 1 - prepared.mask.pixels[0]
    record = {
        "command": "uvce",
        "versions": versions(),
        "config": config,
        "file": str(prepared.name),
        "caption": prepared.caption,
        "target_caption": target_caption,
        "source_class": source_name,
        "source_index": prepared.source_index,
        "target_class": target_name,
        "target_index": target_index,
        "mask_source": prepared.mask.source,
        "inversion": {
            "cache_hit": prepared.cache_hit,
            "psnr_ddim_db": round(prepared.inversion.psnr_ddim, 3),
            "psnr_null_text_db": round(prepared.inversion.psnr_null_text, 3),
            "latent_mse_ddim": round(prepared.inversion.latent_mse_ddim, 6),
            "latent_mse_null_text": round(prepared.inversion.latent_mse_null_text, 6),
            "seconds": round(prepared.inversion.seconds, 3),
        },
        "reconstruction_psnr_db": round(prepared.reconstruction_psnr, 3),
        "background_psnr_db": round(masked_psnr(counterfactual, prepared.image[0], background), 3),
        "original": rounded(original),
        "p2p_start": rounded(start),
        "counterfactual": rounded(best),
        "best_step": result.best_steps[b],
        "flipped": bool(best["p_target"] > best["p_source"]),
        "history": [
            {"step": step, **{name: round(values[b], 6) for name, values in entry.items()}}
            for step, entry in enumerate(result.history)
        ],
        "files": files,
        "seconds": round(seconds, 3),
        "batch_size": len(result.best_steps),
    }
    write_json(record, out / f"{base}.json")  # last: its presence marks the item as finished
    return {
        "label": edit.label,
        "target": target_name,
        "json": f"{base}.json",
        "status": "ok",
        "p_target_before": round(original["p_target"], 6),
        "p_target_after": round(best["p_target"], 6),
        "p_source_after": round(best["p_source"], 6),
        "flipped": record["flipped"],
        "background_psnr_db": record["background_psnr_db"],
        "seconds": record["seconds"],
    }


def _plain_input(engine: GuidedDDIM, image: torch.Tensor) -> ObjectiveInput:
    """The original image as an objective sees a reported iterate: one plain view."""
    return ObjectiveInput(image, encode_image(engine, image), image.unsqueeze(1))


# -- neuron-cf ------------------------------------------------------------------------


@dataclass
class NeuronCfJob:
    classifier: str
    inputs: Path  # an image file or a folder of images
    out: Path
    neuron: int | None = None
    direction_file: Path | None = None
    layer: str | None = None
    class_name: str | None = None  # the class the neuron is suspected to be spurious for; default: predicted
    source_class: str | None = None  # with from_other_class: what the images show (default: predicted)
    csv_file: Path | None = None  # file,class rows for a folder
    direction_mode: str = "both"  # max | min | both
    from_other_class: bool = False  # start from other classes' images and see whether the neuron triggers the class
    drop_threshold: float = 0.3  # flag when minimizing drops p(class) by at least this much...
    object_error_ratio: float = 2.0  # ...while the object core's error stays within this factor of the reconstruction's
    # Hold the object (on top of the distance term): its core's latent cells follow the
    # reconstruction's trajectory at every DDIM step and the reconstruction is laid over
    # every decoded image by the soft mask, so the object stays by construction and the
    # verdict judges the confidence.
    hold_object: bool = True
    weight_latent: float = 25.0
    weight_pixel: float = 250.0
    batch_size: int = 1  # images optimized together in one engine batch
    real: RealImageOptions = field(default_factory=RealImageOptions)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def spurious_verdict(
    p_original: float,
    p_minimized: float,
    object_psnr_db: float,
    reconstruction_psnr_db: float,
    drop_threshold: float,
    object_error_ratio: float,
) -> dict[str, Any]:
    """Is the neuron a likely harmful spurious feature for the class on this image?

    Yes when minimizing it drops the class confidence by at least `drop_threshold` and the
    object really stayed: the mean squared error in its core is at most `object_error_ratio`
    times that of the model's own reconstruction of the image (the VAE bounds every PSNR,
    so an absolute threshold would mean different things for different models). A ratio
    of 2 is a PSNR at most 3 dB below the reconstruction's."""
    drop = p_original - p_minimized
    floor = reconstruction_psnr_db - 10 * math.log10(object_error_ratio)
    kept = object_psnr_db >= floor
    flagged = drop >= drop_threshold and kept
    if flagged:
        text = f"likely harmful spurious feature: p(class) {p_original:.2f} -> {p_minimized:.2f} with the object kept ({object_psnr_db:.1f} dB)"
    elif not kept:
        text = (f"inconclusive: the object changed too ({object_psnr_db:.1f} dB in its core; the reconstruction has "
                f"{reconstruction_psnr_db:.1f} dB, at most {object_error_ratio:g}x its error allowed: {floor:.1f} dB)")  # fmt: skip
    else:
        text = f"not flagged: p(class) {p_original:.2f} -> {p_minimized:.2f} (drop {drop:.2f} < {drop_threshold:.2f})"
    return {
        "flagged": flagged,
        "confidence_drop": round(drop, 6),
        "object_kept": kept,
        "object_psnr_db": round(object_psnr_db, 3),
        "reconstruction_object_psnr_db": round(reconstruction_psnr_db, 3),
        "drop_threshold": drop_threshold,
        "object_error_ratio": object_error_ratio,
        "text": text,
    }


def _check_neuron_cf(job: NeuronCfJob) -> list[str]:
    check_common(job.out, job.sampler, job.optim, job.batch_size)
    if (job.neuron is None) == (job.direction_file is None):
        raise DiginError("give exactly one of --neuron N and --direction FILE")
    if job.direction_mode not in ("max", "min", "both"):
        raise DiginError(f"--direction-mode must be max, min or both, got '{job.direction_mode}'")
    if not job.object_error_ratio >= 1:
        raise DiginError(f"--object-error-ratio must be 1 or more (1 = as close as the reconstruction), got {job.object_error_ratio}")
    _check_mask_options(job.real)
    if job.from_other_class:
        if job.class_name is None:
            raise DiginError("--from-other-class needs --class: the class the neuron might trigger")
        if job.direction_mode == "min":
            raise DiginError("--from-other-class maximizes the neuron; drop --direction-mode min")
        return ["max"]
    return ["max", "min"] if job.direction_mode == "both" else [job.direction_mode]


def run_neuron_cf(job: NeuronCfJob, progress: Progress | None = None) -> dict[str, Any]:
    """Neuron counterfactuals of real images: keep the object, change what the neuron sees (paper section 6)."""
    from digin_cli.objectives import FeatureMap, NeuronCounterfactual, NeuronObjective
    from digin_cli.runs import neuron_target

    progress = progress or NoProgress()
    started = time.perf_counter()
    modes = _check_neuron_cf(job)
    items = work_items(job.inputs, job.csv_file, job.source_class if job.from_other_class else job.class_name, [], need_target=False)
    fixed_class: int | None = None  # --class, resolved before the heavy loads

    def check(classifier: Classifier) -> None:
        nonlocal fixed_class
        if job.class_name is not None:
            fixed_class = resolve_class(classifier, job.class_name)

    session = open_session(job.classifier, job.runtime, job.real, job.optim, check=check)
    engine, classifier, optim = session.engine, session.classifier, session.optim
    feature_map = FeatureMap(classifier, job.layer)
    direction = neuron_target(feature_map, feature_map.width(), job.neuron, job.direction_file, engine.device)
    label = f"n{job.neuron}" if direction is None else slug(job.direction_file.stem)
    config = {
        "classifier": job.classifier,
        "model": job.runtime.model,
        "dtype": job.runtime.dtype,
        "compile": job.runtime.compile,
        "inputs": str(job.inputs),
        "layer": job.layer,
        "neuron": job.neuron,
        "direction_file": str(job.direction_file) if job.direction_file else None,
        "modes": modes,
        "from_other_class": job.from_other_class,
        "weight_latent": job.weight_latent,
        "weight_pixel": job.weight_pixel,
        "hold_object": job.hold_object,
        "real": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(job.real).items()},
        "resolution": engine.components.resolution,
        "sampler": asdict(job.sampler),
        "optim": asdict(optim),
    }

    def prepare(item: WorkItem) -> PreparedImage:
        return prepare_image(engine, item.path, classifier, item.source, item_options(job.real, item), job.sampler,
                             session.sam_predictor, session.captioner)  # fmt: skip

    def run_batch(tasks: list[Task]) -> list[dict[str, Any]]:
        """Every mode optimizes the whole batch at once; each image keeps its own object."""
        t0 = time.perf_counter()
        prepared = [task.prepared for task in tasks]
        # The class judged: the image's own (from --class, the CSV or the prediction), or with
        # --from-other-class the class the neuron might trigger.
        class_indices = [fixed_class if job.from_other_class else p.source_index for p in prepared]
        batch = batch_inputs(engine, prepared, True, job.weight_latent, job.weight_pixel)  # the object stays
        distance = batch.distance
        # Each object's core: held with --hold-object, and where the verdict judges "kept".
        cores = torch.stack([object_core(p.mask.pixels[0]) for p in prepared])  # (B, 1, H, W)
        hold = None
        if job.hold_object:
            # The object stays as reconstructed: its core's latent cells follow the reconstruction's
            # trajectory, and the reconstruction is laid over each image by the soft object mask.
            latent_side = batch.z_T.shape[-1]
            hold = HoldRegion(latent_cells(cores, latent_side).to(engine.device), distance.keep_pixels)
        prompt_emb = engine.encode_text([p.caption for p in prepared])  # (B, L, D)
        with torch.no_grad():
            original = NeuronCounterfactual(NeuronObjective(feature_map, job.neuron, direction), class_indices, distance)(
                _plain_input(engine, batch.images)
            ).metrics  # name -> (B,)
        names = ", ".join(p.name for p in prepared)
        names = names if len(names) <= 40 else f"{len(prepared)} images"
        results = {}
        for mode in modes:
            objective = NeuronCounterfactual(
                NeuronObjective(feature_map, job.neuron, direction, maximize=mode == "max"), class_indices, distance
            )
            progress.start(f"{names}: {mode} {label}", optim.steps)
            try:
                results[mode] = engine.optimize(objective, batch.z_T, prompt_emb, batch.null_embs, job.sampler, optim,
                                                on_step=progress.step, hold=hold)  # fmt: skip
            finally:
                progress.finish()
        share = (time.perf_counter() - t0) / len(tasks)  # each image's share of the batch
        return [
            write_item(task, class_indices[b], {k: float(v[b]) for k, v in original.items()}, results, b, cores[b], share)
            for b, task in enumerate(tasks)
        ]

    def write_item(task: Task, class_index: int, original: dict[str, float], results: dict, b: int, core: torch.Tensor,
                   share: float) -> dict[str, Any]:  # fmt: skip
        """Verdict, files, record and summary entry of item b of a batch."""
        prepared, stem, item = task.prepared, task.stem, task.item
        class_name = classifier.class_names[class_index]
        reconstruction_core_psnr = masked_psnr(prepared.reconstruction[0], prepared.image[0], core)
        measured = {}
        for mode in modes:
            image = results[mode].best_images[b]  # (3, H, W)
            measured[mode] = {
                **{k: round(v, 6) for k, v in results[mode].best(b).items()},
                "start": {k: round(v, 6) for k, v in results[mode].initial(b).items()},
                "best_step": results[mode].best_steps[b],
                "object_psnr_db": round(masked_psnr(image, prepared.image[0], core), 3),
                "background_psnr_db": round(masked_psnr(image, prepared.image[0], 1 - prepared.mask.pixels[0]), 3),
            }
        verdict = None
        if "min" in measured and not job.from_other_class:
            verdict = spurious_verdict(original["p_class"], measured["min"]["p_class"], measured["min"]["object_psnr_db"],
                                       reconstruction_core_psnr, job.drop_threshold, job.object_error_ratio)  # fmt: skip
        triggers = None
        if job.from_other_class:
            after = measured["max"]["p_class"]
            triggers = {"triggers_class": bool(after >= 0.5 > original["p_class"]), "p_class_before": round(original["p_class"], 6),
                        "p_class_after": after}  # fmt: skip

        base = f"{stem}_{label}"
        files = {"original": f"{base}_original.png", "mask": f"{base}_mask.png", "sheet": f"{base}_sheet.png"}
        save_png(prepared.image[0], job.out / files["original"])
        overlay = mask_overlay(prepared.image[0], prepared.mask.pixels[0])
        save_png(overlay, job.out / files["mask"])
        panels = [(prepared.image[0], ["original", f"act {original['activation']:.3f}", f"p({class_name}) {original['p_class']:.3f}"])]
        for mode in modes:
            name = "maximized" if mode == "max" else "minimized"
            files[name] = f"{base}_{name}.png"
            save_png(results[mode].best_images[b], job.out / files[name])
            m = measured[mode]
            panels.append((results[mode].best_images[b], [name, f"act {m['activation']:.3f}", f"p({class_name}) {m['p_class']:.3f}"]))
        panels.append((overlay, [f"mask ({prepared.mask.source})", "kept"]))
        title = f"{prepared.name}: {label} of {job.classifier}, class '{class_name}'"
        if verdict is not None:
            title += f" - {verdict['text']}"
        save_png(labelled_sheet(panels, title=title), job.out / files["sheet"])
        record = {
            "command": "neuron-cf",
            "versions": versions(),
            "config": config,
            "file": str(item.path),
            "caption": prepared.caption,
            "class_name": class_name,
            "class_index": class_index,
            "mask_source": prepared.mask.source,
            "inversion": {
                "cache_hit": prepared.cache_hit,
                "psnr_ddim_db": round(prepared.inversion.psnr_ddim, 3),
                "psnr_null_text_db": round(prepared.inversion.psnr_null_text, 3),
            },
            "reconstruction_psnr_db": round(prepared.reconstruction_psnr, 3),
            "original": {k: round(v, 6) for k, v in original.items()},
            **{("maximized" if mode == "max" else "minimized"): measured[mode] for mode in modes},
            "verdict": verdict,
            "from_other_class": triggers,
            "files": files,
            "seconds": round(prepared.seconds + share, 3),
            "batch_size": len(results[modes[0]].best_steps),
        }
        write_json(record, job.out / f"{base}.json")  # last: marks the item finished
        entry = {"label": label, "json": f"{base}.json", "status": "ok", "class": class_name,
                 "activation_before": round(original["activation"], 6), "p_class_before": round(original["p_class"], 6)}  # fmt: skip
        for mode in modes:
            entry[f"activation_{mode}"] = measured[mode]["activation"]
            entry[f"p_class_{mode}"] = measured[mode]["p_class"]
        if verdict is not None:
            entry["flagged"] = verdict["flagged"]
            entry["verdict"] = verdict["text"]
        if triggers is not None:
            entry["triggers_class"] = triggers["triggers_class"]
        return entry

    summary = run_items(items, job.out, lambda item: {label: f"{slug(item.path.stem)}_{label}.json"}, prepare, run_batch,
                        job.batch_size)  # fmt: skip
    flagged = [e for e in summary if e.get("flagged")]
    judged = [e for e in summary if "flagged" in e]
    return {
        "command": "neuron-cf",
        "out": str(job.out),
        "items": summary,
        "flagged": len(flagged),
        "judged": len(judged),
        "seconds": round(time.perf_counter() - started, 3),
    }
