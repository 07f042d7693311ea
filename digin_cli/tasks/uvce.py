"""`digin uvce`: visual counterfactuals of real images for a classifier (paper section 5).

Per image: load, invert (cached), reconstruct while recording cross-attention and mask
(``real_images``); then for every target class start from the prompt-to-prompt edit and
optimize with the engine, the background held by the distance term. Several image x
target pairs share one engine batch (`batch_size`), each with its own inversion, mask,
injected attention, loss and best iterate. Items are written atomically and a finished
item is skipped when the same command runs again (``folder_runs``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from digin_cli.attention import AttentionControl, attach, find_word_tokens, token_mapping
from digin_cli.drawing import heat_map, labelled_sheet, mask_overlay
from digin_cli.engine import OptimConfig, OptimizationResult, SamplerConfig
from digin_cli.errors import DiginError
from digin_cli.io import save_png, write_json
from digin_cli.metrics import masked_psnr
from digin_cli.models import Classifier, resolve_class
from digin_cli.objectives import Counterfactual
from digin_cli.tasks.folder_runs import Task, run_items, work_items
from digin_cli.tasks.real_images import (
    PreparedImage,
    RealImageOptions,
    Session,
    batch_inputs,
    check_mask_options,
    inversion_record,
    open_session,
    plain_input,
)
from digin_cli.tasks.runtime import (
    NoProgress,
    Progress,
    RuntimeOptions,
    check_engine_options,
    item_history,
    run_config,
    slug,
    versions,
)


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


def _check_uvce(job: UvceJob) -> None:
    check_engine_options(job.out, job.sampler, job.optim, job.batch_size)
    if not job.targets and job.csv_file is None:
        raise DiginError("give at least one --target class")
    if not 0.0 <= job.real.p2p_fraction <= 1.0:
        raise DiginError(f"--p2p-fraction must be between 0 and 1, got {job.real.p2p_fraction}")
    if job.weight_latent < 0 or job.weight_pixel < 0:
        raise DiginError("--w-latent and --w-pixel must be 0 or more")
    check_mask_options(job.real)


def run_uvce(job: UvceJob, progress: Progress | None = None) -> dict[str, Any]:
    """Visual counterfactuals of real images for a classifier (paper section 5)."""
    progress = progress or NoProgress()
    started = time.perf_counter()
    # 1. Check the options and list the work before anything heavy is loaded.
    _check_uvce(job)
    items = work_items(job.inputs, job.csv_file, job.source_class, job.targets)

    def resolve_targets(classifier: Classifier) -> None:
        # Class names as the classifier spells them: a misspelt target fails before any heavy
        # work, and file names do not depend on how the user wrote the class.
        for item in items:
            item.targets = [classifier.class_names[resolve_class(classifier, t)] for t in item.targets]

    # 2. The classifier, the engine (and SAM-HQ, the captioner), once.
    session = open_session(job.classifier, job.runtime, job.real, job.optim, check=resolve_targets)
    specific = {
        "classifier": job.classifier,
        "inputs": str(job.inputs),
        "targets": job.targets,
        "weight_latent": job.weight_latent,
        "weight_pixel": job.weight_pixel,
        "real": job.real.record(),
    }
    config = run_config(job.runtime, specific, session.engine.components.resolution, job.sampler, session.optim)
    # 3. The resumable loop over the images, image x target pairs batched.
    summary = run_items(
        items, job.out, lambda item: {t: f"{slug(item.path.stem)}_{slug(t)}.json" for t in item.targets},
        lambda item: session.prepare(item, job.real, job.sampler),
        lambda tasks: _counterfactuals(session, tasks, job, config, progress), job.batch_size,
    )  # fmt: skip
    return {"command": "uvce", "out": str(job.out), "items": summary, "seconds": round(time.perf_counter() - started, 3)}


def swap_class(caption: str, source_name: str, target_name: str) -> str:
    """The caption with the source class words replaced by the target class words (first occurrence)."""
    lower = caption.lower()
    at = lower.find(source_name.lower())
    if at < 0:
        return caption
    return caption[:at] + target_name + caption[at + len(source_name) :]


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
    session: Session, tasks: list[Task], job: UvceJob, config: dict[str, Any], progress: Progress
) -> list[dict[str, Any]]:
    """Counterfactuals of B tasks (image x target) in one engine batch: each starts from its own
    prompt-to-prompt edit and inversion, keeps its own background; writes every task's files."""
    started = time.perf_counter()
    engine, classifier = session.engine, session.classifier
    # 1. Each task's edit, and the batch's inputs, objective and injected attention.
    prepared = [task.prepared for task in tasks]
    edits = [_edit(engine.components, classifier, p, task.label) for p, task in zip(prepared, tasks)]
    batch = batch_inputs(engine, prepared, False, job.weight_latent, job.weight_pixel)  # the background stays
    objective = Counterfactual(classifier, [e.target_index for e in edits], [p.source_index for p in prepared], batch.distance)
    inject_steps = math.ceil(job.real.p2p_fraction * job.sampler.num_steps)
    control = AttentionControl.for_batch([p.control for p in prepared], [e.mapping for e in edits], inject_steps)
    # 2. The optimization, from the prompt-to-prompt start.
    label = ", ".join(f"{p.name} -> {e.target_name}" for p, e in zip(prepared, edits))
    progress.start(label if len(label) <= 60 else f"{len(tasks)} counterfactuals ({label[:40]}...)", session.optim.steps)
    try:
        with attach(engine, control):
            result = engine.optimize(
                objective,
                batch.z_T,
                engine.encode_text([e.target_caption for e in edits]),  # (B, L, D)
                batch.null_embs,
                job.sampler,
                session.optim,
                on_step=progress.step,
            )
    finally:
        progress.finish()
    # 3. The originals' figures, then every task's files, record and summary entry.
    with torch.no_grad():
        original = objective(plain_input(engine, batch.images)).metrics  # name -> (B,)
    share = (time.perf_counter() - started) / len(tasks)  # each task's share of the batch
    return [
        _write_counterfactual(task, edit, {k: float(v[b]) for k, v in original.items()}, result, b, job, config,
                              task.prepared.seconds + share)  # fmt: skip
        for b, (task, edit) in enumerate(zip(tasks, edits))
    ]


def _write_counterfactual(
    task: Task,
    edit: Edit,
    original: dict[str, float],
    result: OptimizationResult,
    b: int,
    job: UvceJob,
    config: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """Files, record and summary entry of item b of a batch's result."""
    prepared = task.prepared
    base = f"{task.stem}_{slug(edit.target_name)}"
    files = _save_images(prepared, edit, original, result, b, job, base)
    best = result.best(b)
    rounded = lambda metrics: {k: round(v, 6) for k, v in metrics.items()}  # noqa: E731
    background = 1 - prepared.mask.pixels[0]
    record = {
        "command": "uvce",
        "versions": versions(),
        "config": config,
        "file": str(prepared.name),
        "caption": prepared.caption,
        "target_caption": edit.target_caption,
        "source_class": edit.source_name,
        "source_index": prepared.source_index,
        "target_class": edit.target_name,
        "target_index": edit.target_index,
        "mask_source": prepared.mask.source,
        "inversion": inversion_record(prepared),
        "reconstruction_psnr_db": round(prepared.reconstruction_psnr, 3),
        "background_psnr_db": round(masked_psnr(result.best_images[b], prepared.image[0], background), 3),
        "original": rounded(original),
        "p2p_start": rounded(result.initial(b)),
        "counterfactual": rounded(best),
        "best_step": result.best_steps[b],
        "flipped": bool(best["p_target"] > best["p_source"]),
        "history": item_history(result, b),
        "files": files,
        "seconds": round(seconds, 3),
        "batch_size": len(result.best_steps),
    }
    write_json(record, job.out / f"{base}.json")  # last: its presence marks the item as finished
    return {
        "label": edit.label,
        "target": edit.target_name,
        "json": f"{base}.json",
        "status": "ok",
        "p_target_before": round(original["p_target"], 6),
        "p_target_after": round(best["p_target"], 6),
        "p_source_after": round(best["p_source"], 6),
        "flipped": record["flipped"],
        "background_psnr_db": record["background_psnr_db"],
        "seconds": record["seconds"],
    }


def _save_images(prepared: PreparedImage, edit: Edit, original: dict[str, float], result: OptimizationResult, b: int,
                 job: UvceJob, base: str) -> dict[str, str]:  # fmt: skip
    """The PNGs of one counterfactual and its labelled sheet; returns their file names."""
    counterfactual = result.best_images[b]  # (3, H, W)
    files = {
        "original": f"{base}_original.png",
        "reconstruction": f"{base}_reconstruction.png",
        "p2p_start": f"{base}_p2p.png",
        "counterfactual": f"{base}_counterfactual.png",
        "mask": f"{base}_mask.png",
        "difference": f"{base}_difference.png",
        "sheet": f"{base}_sheet.png",
    }
    overlay = mask_overlay(prepared.image[0], prepared.mask.pixels[0])
    difference = heat_map(counterfactual, prepared.image[0])
    for key, image in (("original", prepared.image[0]), ("reconstruction", prepared.reconstruction[0]),
                       ("p2p_start", result.initial_images[b]), ("counterfactual", counterfactual), ("mask", overlay),
                       ("difference", difference)):  # fmt: skip
        save_png(image, job.out / files[key])

    def lines(title: str, metrics: dict[str, float]) -> list[str]:
        return [title, f"p({edit.source_name}) {metrics['p_source']:.3f}", f"p({edit.target_name}) {metrics['p_target']:.3f}"]

    sheet = labelled_sheet(
        [
            (prepared.image[0], lines("original", original)),
            (result.initial_images[b], lines("p2p start", result.initial(b))),
            (counterfactual, lines(f"counterfactual (step {result.best_steps[b]})", result.best(b))),
            (overlay, [f"mask ({prepared.mask.source})"]),
            (difference, ["difference"]),
        ],
        title=f"{prepared.name}: {edit.source_name} -> {edit.target_name}  ({job.classifier})",
    )
    save_png(sheet, job.out / files["sheet"])
    return files
