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
from digin_cli.io import save_png
from digin_cli.metrics import masked_psnr
from digin_cli.models import Classifier, resolve_class
from digin_cli.objectives import Counterfactual
from digin_cli.tasks.folder_runs import Task, run_items, work_items
from digin_cli.tasks.real_images import (
    PreparedImage,
    RealImageOptions,
    Session,
    batch_inputs,
    check_real_image_options,
    inversion_record,
    open_session,
    plain_input,
)
from digin_cli.tasks.guards import ConeGuide, check_cone, load_cone
from digin_cli.tasks.judges import Judges, check_judge_options, load_judges
from digin_cli.tasks.records import item_record, open_run_folder, rounded, run_result
from digin_cli.tasks.runtime import (
    NoProgress,
    Progress,
    RuntimeOptions,
    check_engine_options,
    with_family_defaults,
    check_number,
    finite_losses,
    item_history,
    run_config,
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
    judges: tuple[str, ...] = ()  # classifier specs that judge the results, never the loss
    cone: str | None = None  # "SPEC[:DEGREES]": the guide's gradient kept within a cone around SPEC's


def _check_uvce(job: UvceJob) -> None:
    check_engine_options(job.out, job.sampler, job.optim, job.batch_size, job.runtime)
    if not job.targets and job.csv_file is None:
        raise DiginError("give at least one --target class")
    if not job.real.p2p_fractions:
        raise DiginError("give at least one --p2p-fraction (a share of the DDIM steps, 0 to 1)")
    for fraction in job.real.p2p_fractions:
        check_number("--p2p-fraction", fraction, low=0, high=1)
    check_number("--w-latent", job.weight_latent, low=0)
    check_number("--w-pixel", job.weight_pixel, low=0)
    check_real_image_options(job.real, job.sampler)
    check_judge_options(job.judges, None)
    check_cone(job.cone, job.judges)


def run_uvce(job: UvceJob, progress: Progress | None = None) -> dict[str, Any]:
    """Visual counterfactuals of real images for a classifier (paper section 5)."""
    progress = progress or NoProgress()
    started = time.perf_counter()
    # 1. Check the options and list the work before anything heavy is loaded.
    job = with_family_defaults(job)
    _check_uvce(job)
    items = work_items(job.inputs, job.csv_file, job.source_class, job.targets)

    judges: list[Judges] = []
    cones: list[ConeGuide | None] = []

    def resolve_targets(classifier: Classifier) -> None:
        # Class names as the classifier spells them: a misspelt target fails before any heavy
        # work, and file names do not depend on how the user wrote the class.
        for item in items:
            item.targets = [classifier.class_names[resolve_class(classifier, t)] for t in item.targets]
        targets = {resolve_class(classifier, t) for item in items for t in item.targets}
        judges.append(load_judges(job.judges, classifier, sorted(targets)))  # before the diffusion model
        cones.append(load_cone(job.cone, classifier, sorted(targets)))

    # 2. The classifier, the engine (and SAM-HQ, the captioner), once.
    session = open_session(job.classifier, job.runtime, job.real, job.sampler, job.optim, check=resolve_targets)
    specific = {
        "classifier": session.classifier.spec,
        "inputs": str(job.inputs),
        "targets": job.targets,
        "weight_latent": job.weight_latent,
        "weight_pixel": job.weight_pixel,
        "real": job.real.record(),
        "judges": judges[0].specs,
        # How the prompt-to-prompt start is chosen: by the loss the optimization descends
        # (augmented views, the cone's reference), not by the plain image alone.
        "p2p_search": "guarded views",
        **({"cone": cones[0].record()} if cones[0] else {}),  # absent without: earlier run folders resume
    }
    config = run_config(job.runtime, specific, session.engine.components, job.sampler, session.optim)
    folder = open_run_folder(job.out, "uvce", config, session.engine.device, job.runtime)
    folder.annotator = judges[0]
    # 3. The resumable loop over the images, image x target pairs batched.
    records = run_items(
        items, folder, lambda item: item.targets, lambda items: session.prepare(items, job.real, job.sampler),
        lambda tasks: _counterfactuals(session, tasks, job, progress, cones[0]), job.batch_size,
    )  # fmt: skip
    return run_result(folder, records, started)


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


def _counterfactuals(session: Session, tasks: list[Task], job: UvceJob, progress: Progress,
                     cone_guide: ConeGuide | None) -> list[dict[str, Any]]:  # fmt: skip
    """Counterfactuals of B tasks (image x target) in one engine batch: each starts from its own
    prompt-to-prompt edit and inversion, keeps its own background; writes every task's files."""
    started = time.perf_counter()
    engine, classifier = session.engine, session.classifier
    # 1. Each task's edit, and the batch's inputs, objective and injected attention.
    prepared = [task.prepared for task in tasks]
    edits = [_edit(engine.components, classifier, p, task.label) for p, task in zip(prepared, tasks)]
    batch = batch_inputs(engine, prepared, False, job.weight_latent, job.weight_pixel)  # the background stays
    objective = Counterfactual(classifier, [e.target_index for e in edits], [p.source_index for p in prepared], batch.distance)
    target_embs = engine.encode_text([e.target_caption for e in edits])  # (B, L, D)
    cone = cone_guide.cone(classifier, [e.target_index for e in edits]) if cone_guide else None
    # 2. Each task's prompt-to-prompt start: how many steps get the recorded attention.
    search = _search_p2p_steps(session, objective, prepared, edits, batch, target_embs, job, cone)
    inject_steps = [min(search[b], key=search[b].get) for b in range(len(tasks))]
    control = AttentionControl.for_batch([p.control for p in prepared], [e.mapping for e in edits], inject_steps)
    # 3. The optimization, from the chosen prompt-to-prompt starts.
    label = ", ".join(f"{p.name} -> {e.target_name}" for p, e in zip(prepared, edits))
    progress.start(label if len(label) <= 60 else f"{len(tasks)} counterfactuals ({label[:40]}...)", session.optim.steps)
    try:
        with attach(engine, control), finite_losses():
            result = engine.optimize(
                objective,
                batch.z_T,
                target_embs,
                batch.null_embs,
                job.sampler,
                session.optim,
                on_step=progress.step,
                cone=cone,
            )
    finally:
        progress.finish()
    # 4. The originals' figures, then every task's files and record.
    with torch.no_grad():
        original = objective(plain_input(engine, batch.images)).metrics  # name -> (B,)
    share = (time.perf_counter() - started) / len(tasks)  # each task's share of the batch
    T = job.sampler.num_steps
    return [
        _counterfactual_record(task, edit, {k: float(v[b]) for k, v in original.items()}, result, b, job,
                               task.prepared.seconds + share, classifier.spec,
                               p2p={"inject_steps": inject_steps[b], "fraction": round(inject_steps[b] / T, 4),
                                    "start_loss_by_inject_steps": {str(k): None if v is None else round(v, 6)
                                                                   for k, v in search[b].items()}})  # fmt: skip
        for b, (task, edit) in enumerate(zip(tasks, edits))
    ]


def _search_p2p_steps(session: Session, objective: Counterfactual, prepared: list[PreparedImage], edits: list[Edit],
                      batch, target_embs: torch.Tensor, job: UvceJob, cone) -> list[dict[int, float | None]]:  # fmt: skip
    """Per task, the guarded loss of its prompt-to-prompt start at each candidate number of
    injected steps (the --p2p-fraction shares of the DDIM steps, rounded up): the objective
    on the augmented views the optimization will see, plus the cone's reference loss.

    The reference's UVCE samples the start at 0.3, 0.4 and 0.5 and optimizes from the
    one with the lowest loss: a longer injection keeps more of the original's layout (and
    background), a shorter one lets the target's shape form. Ranked by the plain image
    alone, the search preferred starts that satisfy the guide at once: a bar turned into
    a trapezoid the oracle calls a triangle, kept at step 0. One forward sample a
    candidate, no gradients; with one candidate nothing is sampled."""
    T = job.sampler.num_steps
    candidates = sorted({math.ceil(fraction * T) for fraction in job.real.p2p_fractions})
    if len(candidates) == 1:
        return [{candidates[0]: None} for _ in prepared]
    losses = {}
    for steps in candidates:
        control = AttentionControl.for_batch([p.control for p in prepared], [e.mapping for e in edits], steps)
        with attach(session.engine, control), finite_losses():
            losses[steps] = session.engine.start_views_loss(objective, batch.z_T, target_embs, batch.null_embs, job.sampler,
                                                            session.optim, cone=cone)  # fmt: skip
    return [{steps: float(losses[steps][b]) for steps in candidates} for b in range(len(prepared))]


def _counterfactual_record(
    task: Task,
    edit: Edit,
    original: dict[str, float],
    result: OptimizationResult,
    b: int,
    job: UvceJob,
    seconds: float,
    classifier_spec: str,
    p2p: dict[str, Any],
) -> dict[str, Any]:
    """Files and record of item b of a batch's result."""
    prepared = task.prepared
    files = _save_images(prepared, edit, original, result, b, job, task.name, classifier_spec)
    best = result.best(b)
    background = 1 - prepared.mask.pixels[0]
    return item_record(
        "uvce", task.name, {"file": str(task.item.path)},
        classes={"source": edit.source_name, "target": edit.target_name},
        before=rounded(original), after=rounded(best), best_step=result.best_steps[b], history=item_history(result, b),
        files=files, seconds=seconds,
        # Flipped as a reader (and peers' flip rate) takes it: the classifier's top class is the target.
        flipped=int(best["top_class"]) == edit.target_index,
        target_above_source=bool(best["p_target"] > best["p_source"]),
        start=rounded(result.initial(b)),
        caption=prepared.caption,
        target_caption=edit.target_caption,
        p2p=p2p,
        source_index=prepared.source_index,
        target_index=edit.target_index,
        mask_source=prepared.mask.source,
        inversion=inversion_record(prepared),
        reconstruction_psnr_db=round(prepared.reconstruction_psnr, 3),
        background_psnr_db=round(masked_psnr(result.best_images[b], prepared.image[0], background), 3),
        batch_size=len(result.best_steps),
    )  # fmt: skip


def _save_images(prepared: PreparedImage, edit: Edit, original: dict[str, float], result: OptimizationResult, b: int,
                 job: UvceJob, base: str, session_spec: str) -> dict[str, str]:  # fmt: skip
    """The PNGs of one counterfactual and its labelled sheet; returns their file names."""
    counterfactual = result.best_images[b]  # (3, H, W)
    files = {
        "original": f"{base}_original.png",
        "reconstruction": f"{base}_reconstruction.png",
        "p2p_start": f"{base}_p2p.png",
        "counterfactual": f"{base}_counterfactual.png",
        "mask": f"{base}_mask.png",
        "object_mask": f"{base}_object-mask.png",
        "difference": f"{base}_difference.png",
        "sheet": f"{base}_sheet.png",
    }
    overlay = mask_overlay(prepared.image[0], prepared.mask.pixels[0])
    difference = heat_map(counterfactual, prepared.image[0])
    for key, image in (("original", prepared.image[0]), ("reconstruction", prepared.reconstruction[0]),
                       ("p2p_start", result.initial_images[b]), ("counterfactual", counterfactual), ("mask", overlay),
                       ("object_mask", prepared.mask.pixels[0].expand(3, -1, -1)), ("difference", difference)):  # fmt: skip
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
        title=f"{prepared.name}: {edit.source_name} -> {edit.target_name}  ({session_spec})",
    )
    save_png(sheet, job.out / files["sheet"])
    return files
