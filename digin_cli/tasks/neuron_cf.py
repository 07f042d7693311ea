"""`digin neuron-cf`: neuron counterfactuals of real images (paper section 6). The object is
kept, a neuron (or feature direction) is raised and lowered around it, and the neuron is
flagged as a likely harmful spurious feature when lowering it drops the class confidence
while the object stayed."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from digin_cli.drawing import labelled_sheet, mask_overlay
from digin_cli.engine import HoldRegion, OptimConfig, OptimizationResult, SamplerConfig
from digin_cli.errors import DiginError
from digin_cli.io import save_png
from digin_cli.masks import latent_cells, object_core
from digin_cli.metrics import masked_psnr
from digin_cli.models import Classifier, resolve_class
from digin_cli.objectives import FeatureMap, NeuronCounterfactual, NeuronObjective
from digin_cli.tasks.folder_runs import Task, run_items, work_items
from digin_cli.tasks.neuron_target import check_neuron_or_direction, neuron_target, target_label
from digin_cli.tasks.real_images import (
    RealImageOptions,
    Session,
    batch_inputs,
    check_real_image_options,
    inversion_record,
    open_session,
    plain_input,
)
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

MODE_NAMES = {"max": "maximized", "min": "minimized"}


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
    judges: tuple[str, ...] = ()  # classifier specs that judge the results, never the loss


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
    """Checks the options; returns the modes to run (max, min)."""
    check_engine_options(job.out, job.sampler, job.optim, job.batch_size, job.runtime)
    check_neuron_or_direction(job.neuron, job.direction_file)
    if job.direction_mode not in ("max", "min", "both"):
        raise DiginError(f"--direction-mode must be max, min or both, got '{job.direction_mode}'")
    check_number("--object-error-ratio", job.object_error_ratio, low=1)
    check_number("--drop-threshold", job.drop_threshold, low=0, high=1)
    check_number("--w-latent", job.weight_latent, low=0)
    check_number("--w-pixel", job.weight_pixel, low=0)
    check_real_image_options(job.real, job.sampler)
    check_judge_options(job.judges, None)
    if job.from_other_class:
        if job.class_name is None:
            raise DiginError("--from-other-class needs --class: the class the neuron might trigger")
        if job.direction_mode == "min":
            raise DiginError("--from-other-class maximizes the neuron; drop --direction-mode min")
        return ["max"]
    return ["max", "min"] if job.direction_mode == "both" else [job.direction_mode]


def run_neuron_cf(job: NeuronCfJob, progress: Progress | None = None) -> dict[str, Any]:
    """Neuron counterfactuals of real images: keep the object, change what the neuron sees (paper section 6)."""
    progress = progress or NoProgress()
    started = time.perf_counter()
    # 1. Check the options and list the work before anything heavy is loaded.
    job = with_family_defaults(job)
    modes = _check_neuron_cf(job)
    items = work_items(job.inputs, job.csv_file, job.source_class if job.from_other_class else job.class_name, [], need_target=False)
    fixed_class: list[int] = []  # --class, resolved before the heavy loads
    judges: list[Judges] = []

    def check(classifier: Classifier) -> None:
        if job.class_name is not None:
            fixed_class.append(resolve_class(classifier, job.class_name))
        # The classes known up front (--class, the CSV's); a predicted one is matched when judged.
        known = set(fixed_class) | {resolve_class(classifier, item.source) for item in items if item.source}
        judges.append(load_judges(job.judges, classifier, sorted(known)))  # before the diffusion model

    # 2. The classifier, the engine (and SAM-HQ, the captioner) once; the neuron or direction.
    session = open_session(job.classifier, job.runtime, job.real, job.sampler, job.optim, check=check)
    run = NeuronCfRun(job, session, modes, fixed_class[0] if fixed_class else None, progress, judges[0])
    # 3. The resumable loop over the images, batched.
    prepare = lambda items: session.prepare(items, job.real, job.sampler, record_p2p=False)  # noqa: E731
    records = run_items(items, run.folder, lambda item: [run.label], prepare, run.run_batch, job.batch_size)
    result = run_result(run.folder, records, started)
    judged = [r for r in records if (r.get("verdict") or {}).get("flagged") is not None]
    result["flagged"] = sum(r["verdict"]["flagged"] for r in judged)
    result["judged"] = len(judged)
    return result


class NeuronCfRun:
    """What the batches of one neuron-cf run share, and how a batch is optimized and written."""

    def __init__(self, job: NeuronCfJob, session: Session, modes: list[str], fixed_class: int | None,
                 progress: Progress, judges: Judges) -> None:  # fmt: skip
        self.job, self.session, self.modes, self.fixed_class, self.progress = job, session, modes, fixed_class, progress
        engine = session.engine
        self.feature_map = FeatureMap(session.classifier, job.layer)
        self.direction = neuron_target(self.feature_map, self.feature_map.width(), job.neuron, job.direction_file, engine.device)
        self.label = target_label(job.neuron, job.direction_file)
        specific = {
            "classifier": session.classifier.spec,
            "inputs": str(job.inputs),
            "layer": job.layer,
            "neuron": job.neuron,
            "direction_file": str(job.direction_file) if job.direction_file else None,
            "modes": modes,
            "from_other_class": job.from_other_class,
            "weight_latent": job.weight_latent,
            "weight_pixel": job.weight_pixel,
            "hold_object": job.hold_object,
            "real": job.real.record(),
            "judges": judges.specs,
        }
        config = run_config(job.runtime, specific, engine.components, job.sampler, session.optim)
        self.folder = open_run_folder(job.out, "neuron-cf", config, engine.device, job.runtime)
        self.folder.annotator = judges

    def objective(self, class_indices: list[int], distance, maximize: bool = True) -> NeuronCounterfactual:
        neuron = NeuronObjective(self.feature_map, self.job.neuron, self.direction, maximize=maximize)
        return NeuronCounterfactual(neuron, class_indices, distance)

    def run_batch(self, tasks: list[Task]) -> list[dict[str, Any]]:
        """Every mode optimizes the whole batch at once; each image keeps its own object."""
        t0 = time.perf_counter()
        job, engine = self.job, self.session.engine
        # 1. The class judged: the image's own (from --class, the CSV or the prediction), or with
        #    --from-other-class the class the neuron might trigger.
        prepared = [task.prepared for task in tasks]
        class_indices = [self.fixed_class if job.from_other_class else p.source_index for p in prepared]
        batch = batch_inputs(engine, prepared, True, job.weight_latent, job.weight_pixel)  # the object stays
        # 2. Each object's core: held with --hold-object, and where the verdict judges "kept".
        cores = torch.stack([object_core(p.mask.pixels[0]) for p in prepared])  # (B, 1, H, W)
        hold = None
        if job.hold_object:
            # The object stays as reconstructed: its core's latent cells follow the reconstruction's
            # trajectory, and the reconstruction is laid over each image by the soft object mask.
            hold = HoldRegion(latent_cells(cores, batch.z_T.shape[-1]).to(engine.device), batch.distance.keep_pixels)
        prompt_emb = engine.encode_text([p.caption for p in prepared])  # (B, L, D)
        # 3. The originals' figures, then each mode's optimization of the whole batch.
        with torch.no_grad():
            original = self.objective(class_indices, batch.distance)(plain_input(engine, batch.images)).metrics  # name -> (B,)
        names = ", ".join(p.name for p in prepared)
        names = names if len(names) <= 40 else f"{len(prepared)} images"
        results = {}
        for mode in self.modes:
            objective = self.objective(class_indices, batch.distance, maximize=mode == "max")
            self.progress.start(f"{names}: {mode} {self.label}", self.session.optim.steps)
            try:
                with finite_losses():
                    results[mode] = engine.optimize(objective, batch.z_T, prompt_emb, batch.null_embs, job.sampler,
                                                    self.session.optim, on_step=self.progress.step, hold=hold)  # fmt: skip
            finally:
                self.progress.finish()
        # 4. Every image's verdict, files and record.
        share = (time.perf_counter() - t0) / len(tasks)  # each image's share of the batch
        return [
            self._item_record(task, class_indices[b], {k: float(v[b]) for k, v in original.items()}, results, b, cores[b], share)
            for b, task in enumerate(tasks)
        ]

    def _measure(self, task: Task, results: dict[str, OptimizationResult], b: int, core: torch.Tensor) -> dict[str, Any]:
        """Each mode's kept iterate of item b, by mode name (maximized, minimized): its figures,
        and how well the object (its core) and the background stayed."""
        prepared = task.prepared
        measured = {}
        for mode in self.modes:
            image = results[mode].best_images[b]  # (3, H, W)
            measured[MODE_NAMES[mode]] = {
                **rounded(results[mode].best(b)),
                "object_psnr_db": round(masked_psnr(image, prepared.image[0], core), 3),
                "background_psnr_db": round(masked_psnr(image, prepared.image[0], 1 - prepared.mask.pixels[0]), 3),
            }
        return measured

    def _judge(self, task: Task, original: dict[str, float], measured: dict[str, Any], core: torch.Tensor):
        """The spurious-feature verdict (when minimized) and, with --from-other-class, whether
        maximizing the neuron triggers the class."""
        job, prepared = self.job, task.prepared
        verdict = triggers = None
        if "minimized" in measured and not job.from_other_class:
            minimized = measured["minimized"]
            reconstruction_core_psnr = masked_psnr(prepared.reconstruction[0], prepared.image[0], core)
            verdict = spurious_verdict(original["p_class"], minimized["p_class"], minimized["object_psnr_db"],
                                       reconstruction_core_psnr, job.drop_threshold, job.object_error_ratio)  # fmt: skip
        if job.from_other_class:
            after = measured["maximized"]["p_class"]
            triggers = {"triggers_class": bool(after >= 0.5 > original["p_class"]), "p_class_before": round(original["p_class"], 6),
                        "p_class_after": after}  # fmt: skip
        return verdict, triggers

    def _item_record(self, task: Task, class_index: int, original: dict[str, float], results: dict, b: int,
                     core: torch.Tensor, share: float) -> dict[str, Any]:  # fmt: skip
        """Verdict, files and record of item b of a batch; `after`, `start`, `best_step` and
        `history` hold one entry per mode (maximized, minimized)."""
        prepared = task.prepared
        class_name = self.session.classifier.class_names[class_index]
        measured = self._measure(task, results, b, core)
        verdict, triggers = self._judge(task, original, measured, core)
        files = self._save_images(task, class_name, original, results, measured, b, verdict, task.name)
        by_mode = lambda value: {MODE_NAMES[mode]: value(results[mode]) for mode in self.modes}  # noqa: E731
        return item_record(
            "neuron-cf", task.name, {"file": str(task.item.path)}, classes={"class": class_name},
            before=rounded(original), after=measured, best_step=by_mode(lambda r: r.best_steps[b]),
            history=by_mode(lambda r: item_history(r, b)), files=files, seconds=prepared.seconds + share,
            verdict=verdict, from_other_class=triggers, start=by_mode(lambda r: rounded(r.initial(b))),
            class_index=class_index, caption=prepared.caption, mask_source=prepared.mask.source,
            inversion=inversion_record(prepared), reconstruction_psnr_db=round(prepared.reconstruction_psnr, 3),
            batch_size=len(results[self.modes[0]].best_steps),
        )  # fmt: skip

    def _save_images(self, task: Task, class_name: str, original: dict[str, float], results: dict, measured: dict,
                     b: int, verdict: dict | None, base: str) -> dict[str, str]:  # fmt: skip
        """The original, each mode's kept image, the mask overlay and the labelled sheet."""
        out, prepared = self.job.out, task.prepared
        files = {"original": f"{base}_original.png", "reconstruction": f"{base}_reconstruction.png", "mask": f"{base}_mask.png",
                 "sheet": f"{base}_sheet.png", "object_mask": f"{base}_object-mask.png"}  # fmt: skip
        save_png(prepared.image[0], out / files["original"])
        save_png(prepared.reconstruction[0], out / files["reconstruction"])
        save_png(prepared.mask.pixels[0].expand(3, -1, -1), out / files["object_mask"])
        overlay = mask_overlay(prepared.image[0], prepared.mask.pixels[0])
        save_png(overlay, out / files["mask"])
        panels = [(prepared.image[0], ["original", f"act {original['activation']:.3f}", f"p({class_name}) {original['p_class']:.3f}"])]
        for mode in self.modes:
            name = MODE_NAMES[mode]
            files[name] = f"{base}_{name}.png"
            save_png(results[mode].best_images[b], out / files[name])
            m = measured[name]
            panels.append((results[mode].best_images[b], [name, f"act {m['activation']:.3f}", f"p({class_name}) {m['p_class']:.3f}"]))
        panels.append((overlay, [f"mask ({prepared.mask.source})", "kept"]))
        title = f"{prepared.name}: {self.label} of {self.session.classifier.spec}, class '{class_name}'"
        if verdict is not None:
            title += f" - {verdict['text']}"
        save_png(labelled_sheet(panels, title=title), out / files["sheet"])
        return files
