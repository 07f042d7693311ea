"""`digin disagree`: images that classifier f assigns to a class and classifier g does not (paper section 4)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digin_cli.engine import OptimConfig, SamplerConfig
from digin_cli.errors import DiginError
from digin_cli.models import Classifier, load_classifier, resolve_class
from digin_cli.objectives import Disagreement
from digin_cli.tasks.runtime import (
    NoProgress,
    Progress,
    RuntimeOptions,
    check_engine_options,
    check_prompt_template,
    open_engine,
    with_family_defaults,
    resolve_runtime,
    slug,
)
from digin_cli.tasks.guards import check_cone, load_cone
from digin_cli.tasks.judges import check_judge_options, load_judges
from digin_cli.tasks.records import run_result
from digin_cli.tasks.seed_runs import ItemWriter, check_seeds, open_seed_run, optimize_seeds


@dataclass
class DisagreeJob:
    classifier_f: str
    classifier_g: str
    class_name: str
    out: Path
    seeds: list[int]
    prompt_template: str = "a photograph of a {}"  # the paper's initial prompt
    batch_size: int = 1
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    judges: tuple[str, ...] = ()  # classifier specs that judge the results, never the loss
    cone: str | None = None  # "SPEC[:DEGREES]": the guide's gradient kept within a cone around SPEC's


def _check_pair(f: Classifier, g: Classifier) -> None:
    if f.num_classes != g.num_classes:
        raise DiginError(
            f"the classifiers do not share a label space: {f.spec} has {f.num_classes} classes, "
            f"{g.spec} has {g.num_classes}; compare classifiers over the same classes"
        )


def run_disagree(job: DisagreeJob, progress: Progress | None = None) -> dict[str, Any]:
    """Generate images that f classifies as the class and g does not (paper section 4)."""
    progress = progress or NoProgress()
    started = time.perf_counter()
    # 1. Check the options before anything heavy is loaded.
    job = with_family_defaults(job)
    check_engine_options(job.out, job.sampler, job.optim, job.batch_size, job.runtime)
    check_prompt_template(job.prompt_template)
    check_seeds(job.seeds)
    check_judge_options(job.judges, None)
    check_cone(job.cone, job.judges)
    device, unet_dtype = resolve_runtime(job.runtime)
    # 2. The classifiers and the class, then the diffusion model.
    f = load_classifier(job.classifier_f, device)
    g = load_classifier(job.classifier_g, device)
    _check_pair(f, g)
    class_index = resolve_class(f, job.class_name)
    class_name = f.class_names[class_index]
    prompt = job.prompt_template.format(class_name)
    judges = load_judges(job.judges, f, [class_index])
    cone = load_cone(job.cone, f, [class_index])
    engine = open_engine(job.runtime, device, unet_dtype, job.sampler)
    objective = Disagreement(f, g, class_index)
    optim = job.optim.resolved(engine.components, max(max(f.input_size), max(g.input_size)))
    # 3. The run folder (resumed when it holds this run), then every seed, written as it is done.
    specific = {
        "classifier_f": f.spec,
        "classifier_g": g.spec,
        "class_name": class_name,
        "class_index": class_index,
        "prompt_template": job.prompt_template,
        "prompt": prompt,
        "judges": judges.specs,
        **({"cone": cone.record()} if cone else {}),  # absent without: earlier run folders resume
    }
    folder = open_seed_run("disagree", job, specific, engine.components, optim, device)
    folder.annotator = judges

    def labels(title: str, metrics: dict[str, float]) -> list[str]:
        return [title, f"p_f {metrics['p_f']:.3f}", f"p_g {metrics['p_g']:.3f}"]

    sheet_title = f"'{class_name}'  f={f.spec}  g={g.spec}"
    writer = ItemWriter(folder, "disagree", slug(class_name), sheet_title, labels, classes={"class": class_name})
    records = optimize_seeds(engine, objective, prompt, job.seeds, job.batch_size, job.sampler, optim, progress, writer,
                             cone=cone.cone(f, class_index) if cone else None)  # fmt: skip
    return run_result(folder, records, started)
