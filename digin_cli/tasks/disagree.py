"""`digin disagree`: images that classifier f assigns to a class and classifier g does not (paper section 4).

One class is the paper's run; several (or all of f's) are a class scan (tasks/scan.py): the
same items per class, an optional screen first, and a ranking of the classes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digin_cli.engine import OptimConfig, SamplerConfig
from digin_cli.errors import DiginError
from digin_cli.models import Classifier, load_classifier
from digin_cli.objectives import Disagreement
from digin_cli.tasks.runtime import (
    NoProgress,
    Shard,
    Progress,
    RuntimeOptions,
    check_engine_options,
    check_prompt_template,
    open_engine,
    with_family_defaults,
    resolve_runtime,
    process_state,
    slug,
)
from digin_cli.tasks.guards import check_cone, load_cone
from digin_cli.tasks.judges import check_judge_options, load_judges
from digin_cli.tasks.records import RunFolder, run_result
from digin_cli.tasks.scan import (ScanClass, ScanSummary, check_scan_options, chosen_classes, requested_classes,
                                  resolve_classes, screen_classes)  # fmt: skip
from digin_cli.tasks.seed_runs import ItemWriter, check_seeds, open_seed_run, optimize_seeds


@dataclass
class DisagreeJob:
    classifier_f: str
    classifier_g: str
    class_name: str | Sequence[str]  # a class (name or index), several (a scan), or "all": every class of f
    out: Path
    seeds: list[int]
    prompt_template: str = "a photograph of a {}"  # the paper's initial prompt
    batch_size: int = 1
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    judges: tuple[str, ...] = ()  # classifier specs that judge the results, never the loss
    cone: str | None = None  # "SPEC[:DEGREES]": the guide's gradient kept within a cone around SPEC's
    classes_file: Path | None = None  # --classes FILE: more classes, one name or index a line
    screen: int | None = None  # --screen K: score every class by K unoptimized samples first
    top: int | None = None  # --top N: then optimize the N classes the screen scores highest


@dataclass
class Setup:
    """What every class of a run shares once loaded: the classifiers, the engine and the guards."""

    f: Classifier
    g: Classifier
    engine: object  # GuidedDDIM
    optim: OptimConfig
    cone: object  # ConeGuide or None
    judges: object  # Judges


def _check_pair(f: Classifier, g: Classifier) -> None:
    if f.num_classes != g.num_classes:
        raise DiginError(
            f"the classifiers do not share a label space: {f.spec} has {f.num_classes} classes, "
            f"{g.spec} has {g.num_classes}; compare classifiers over the same classes"
        )


def run_disagree(job: DisagreeJob, progress: Progress | None = None) -> dict[str, Any]:
    """Generate images that f classifies as the class and g does not (paper section 4); with
    several classes (or --screen), a class scan ranked by its findings (tasks/scan.py)."""
    progress = progress or NoProgress()
    started = time.perf_counter()
    # 1. Check the options before anything heavy is loaded (also read --classes FILE).
    job = with_family_defaults(job)
    check_engine_options(job.out, job.sampler, job.optim, job.batch_size, job.runtime)
    check_prompt_template(job.prompt_template)
    check_seeds(job.seeds)
    check_judge_options(job.judges, None)
    check_cone(job.cone, job.judges)
    check_scan_options(job.screen, job.top)
    requested = requested_classes(job.class_name, job.classes_file)
    device, unet_dtype = resolve_runtime(job.runtime)
    # 2. The classifiers and the classes, then the diffusion model.
    f = load_classifier(job.classifier_f, device)
    g = load_classifier(job.classifier_g, device)
    _check_pair(f, g)
    classes = resolve_classes(f, requested, job.prompt_template)
    indices = [cls.index for cls in classes]
    judges = load_judges(job.judges, f, indices)
    cone = load_cone(job.cone, f, indices)
    engine = open_engine(job.runtime, device, unet_dtype, job.sampler)
    optim = job.optim.resolved(engine.components, max(max(f.input_size), max(g.input_size)))
    setup = Setup(f, g, engine, optim, cone, judges)
    # 3. The run folder (resumed when it holds this run), then every item, written as it is done.
    if len(classes) == 1 and job.screen is None:
        return _run_one_class(job, setup, classes[0], device, progress, started)
    return _run_scan(job, setup, classes, device, progress, started)


def _run_one_class(job: DisagreeJob, setup: Setup, cls: ScanClass, device, progress: Progress,
                   started: float) -> dict[str, Any]:  # fmt: skip
    """The paper's run: one class, its seeds; the config and records as before the scan existed."""
    specific = {
        "classifier_f": setup.f.spec,
        "classifier_g": setup.g.spec,
        "class_name": cls.name,
        "class_index": cls.index,
        "prompt_template": job.prompt_template,
        "prompt": cls.prompt,
        "judges": setup.judges.specs,
        **({"cone": setup.cone.record()} if setup.cone else {}),  # absent without: earlier run folders resume
    }
    folder = open_seed_run("disagree", job, specific, setup.engine.components, setup.optim, device)
    folder.annotator = setup.judges
    records = _optimize_class(job, setup, folder, cls, slug(cls.name), job.seeds, progress)
    return run_result(folder, records, started)


def _optimize_class(job: DisagreeJob, setup: Setup, folder: RunFolder, cls: ScanClass, stem: str, seeds: list[int],
                    progress: Progress, shard: Shard | None = None, summary_items: list[str] | None = None,
                    details: dict[str, Any] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Optimize `seeds` of one class into `folder`, its items named `<stem>_seed<S>`."""
    f, g = setup.f, setup.g

    def labels(title: str, metrics: dict[str, float]) -> list[str]:
        return [title, f"p_f {metrics['p_f']:.3f}", f"p_g {metrics['p_g']:.3f}"]

    sheet_title = f"'{cls.name}'  f={f.spec}  g={g.spec}"
    writer = ItemWriter(folder, "disagree", stem, sheet_title, labels, classes={"class": cls.name}, details=details or {})
    return optimize_seeds(setup.engine, Disagreement(f, g, cls.index), cls.prompt, seeds, job.batch_size, job.sampler,
                          setup.optim, progress, writer, shard=shard, cone=setup.cone.cone(f, cls.index) if setup.cone else None,
                          summary_items=summary_items)  # fmt: skip


def _run_scan(job: DisagreeJob, setup: Setup, classes: list[ScanClass], device, progress: Progress,
              started: float) -> dict[str, Any]:  # fmt: skip
    """A class scan: the screen (with --screen), then every seed of every chosen class,
    then the ranking, in the header and the summary (tasks/scan.py)."""
    # 1. The run folder; the class list and the screen choose items and are not fingerprinted.
    specific = {
        "classifier_f": setup.f.spec,
        "classifier_g": setup.g.spec,
        "classes": [cls.record() for cls in classes],
        "prompt_template": job.prompt_template,
        "judges": setup.judges.specs,
        **({"cone": setup.cone.record()} if setup.cone else {}),
        "scan": {"screen": job.screen, "top": job.top},
    }
    folder = open_seed_run("disagree", job, specific, setup.engine.components, setup.optim, device)
    folder.annotator = setup.judges
    # 2. The screen, by the main process alone (the others then read its figures back).
    screening, screen_seeds = None, []
    if job.screen is not None:
        screen_seeds = list(range(job.seeds[0], job.seeds[0] + job.screen))  # the optimization's first starts
        with process_state().main_process_first():
            screening = screen_classes(setup.engine, setup.f, setup.g, classes, screen_seeds, job.sampler, folder, progress)
    chosen = chosen_classes(classes, screening, job.top)
    folder.summarizer = ScanSummary(classes, chosen, screening, screen_seeds, job.top, bool(setup.judges.specs))
    # 3. Every (class, seed) of the chosen classes; the processes of a launch share them.
    pairs = [(cls, seed) for cls in chosen for seed in job.seeds]
    names = [f"{cls.stem}_seed{seed}" for cls, seed in pairs]
    mine = Shard.current().take(pairs)
    for cls in chosen:
        seeds = [seed for owner, seed in mine if owner.index == cls.index]
        if seeds:
            _optimize_class(job, setup, folder, cls, cls.stem, seeds, progress, shard=Shard(), summary_items=names,
                            details={"class_index": cls.index})  # fmt: skip
    records = folder.rebuild_summary(names)
    return {**run_result(folder, records, started), "ranking": folder.header.get("ranking", [])}
