"""`digin neuron`: what a neuron (or a feature direction) of a classifier looks for (paper
section 6); and `digin neurons`: which penultimate neurons drive a class."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from digin_cli.engine import GuidedDDIM, OptimConfig, SamplerConfig, initial_latents
from digin_cli.errors import DiginError
from digin_cli.models import Classifier, load_classifier
from digin_cli.objectives import FeatureMap, NeuronObjective
from digin_cli.tasks.neuron_target import check_neuron_or_direction, class_head, neuron_target, target_label
from digin_cli.tasks.runtime import (
    NoProgress,
    Progress,
    RuntimeOptions,
    check_engine_options,
    check_prompt_template,
    open_engine,
    with_family_defaults,
    resolve_runtime,
)
from digin_cli.tasks.judges import check_judge_options, load_judges
from digin_cli.tasks.records import rounded, run_result
from digin_cli.tasks.seed_runs import ItemWriter, check_seeds, open_seed_run, optimize_seeds


@dataclass
class NeuronJob:
    classifier: str
    out: Path
    seeds: list[int]
    neuron: int | None = None
    direction_file: Path | None = None  # .npy or .pt vector in feature space
    layer: str | None = None  # None = the input of the last linear layer
    maximize: bool = True
    prompts: list[str] = field(default_factory=list)  # candidates; none = proposed from the last layer
    num_candidates: int = 3  # proposed prompts when none are given
    select_samples: int = 8  # images per candidate prompt when choosing the start (reference: 8)
    prompt_template: str = "a photograph of a {}"
    batch_size: int = 1
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    judges: tuple[str, ...] = ()  # classifier specs that judge the results, never the loss


def propose_prompts(classifier: Classifier, neuron_weights: torch.Tensor, template: str, count: int) -> list[str]:
    """The classes whose last-layer weight on the neuron (or direction) is largest, as prompts.

    neuron_weights: (C,) the head's weight on the neuron, or W @ direction.
    """
    top = neuron_weights.topk(min(count, neuron_weights.numel())).indices.tolist()
    return [template.format(classifier.class_names[c]) for c in top]


@torch.no_grad()
def select_prompt(
    engine: GuidedDDIM,
    objective,
    prompts: list[str],
    seeds: list[int],
    sampler: SamplerConfig,
) -> tuple[str, dict[str, float]]:
    """Sample `seeds` images per prompt and return the prompt with the highest mean activation."""
    scores: dict[str, float] = {}
    null = engine.null_embedding(len(seeds))
    z_T = initial_latents(engine.components, seeds)
    for prompt in prompts:
        images = engine.sample(z_T, engine.encode_text([prompt]).expand(len(seeds), -1, -1), null, sampler)
        value, _ = objective.activation(images.unsqueeze(1))  # (N,)
        scores[prompt] = round(float(value.mean()), 6)
    return max(scores, key=scores.get), scores


def _check_neuron(job: NeuronJob) -> None:
    check_engine_options(job.out, job.sampler, job.optim, job.batch_size, job.runtime)
    check_neuron_or_direction(job.neuron, job.direction_file)
    check_prompt_template(job.prompt_template)
    check_seeds(job.seeds)
    if job.select_samples < 1:
        raise DiginError("--select-samples must be at least 1")
    if job.num_candidates < 1:
        raise DiginError("--candidates must be at least 1")


def _candidate_prompts(job: NeuronJob, classifier: Classifier, direction: torch.Tensor | None) -> list[str]:
    """The user's prompts, else "a photograph of a <class>" for the classes the last layer
    weighs most on the neuron (also when minimizing: start where the neuron fires and see
    what turns it off)."""
    if job.prompts:
        return list(job.prompts)
    head = classifier.head_weight() if job.layer is None else None
    if head is None:
        raise DiginError(
            "no --prompt given and no last layer to propose prompts from (with --layer, or for this "
            "classifier); give one or more --prompt"
        )
    weights = head[:, job.neuron] if direction is None else head @ direction.to(head)  # (C,)
    return propose_prompts(classifier, weights, job.prompt_template, job.num_candidates)


def run_neuron(job: NeuronJob, progress: Progress | None = None) -> dict[str, Any]:
    """What a neuron (or feature direction) of a classifier looks for (paper section 6)."""
    progress = progress or NoProgress()
    started = time.perf_counter()
    # 1. Check the options before anything heavy is loaded.
    job = with_family_defaults(job)
    _check_neuron(job)
    check_judge_options(job.judges, None)
    device, unet_dtype = resolve_runtime(job.runtime)
    # 2. The classifier, the neuron (or direction) and the objective.
    classifier = load_classifier(job.classifier, device)
    feature_map = FeatureMap(classifier, job.layer)
    width = feature_map.width()
    direction = neuron_target(feature_map, width, job.neuron, job.direction_file, device)
    objective = NeuronObjective(feature_map, neuron=job.neuron, direction=direction, maximize=job.maximize)
    prompts = _candidate_prompts(job, classifier, direction)
    judges = load_judges(job.judges, classifier)
    # 3. The diffusion model; the start prompt with the highest mean activation.
    engine = open_engine(job.runtime, device, unet_dtype, job.sampler)
    optim = job.optim.resolved(engine.components, max(classifier.input_size))
    selection_seeds = [10_000 + i for i in range(job.select_samples)]  # apart from the run's own seeds
    if len(prompts) > 1:
        prompt, scores = select_prompt(engine, objective, prompts, selection_seeds, job.sampler)
    else:
        prompt, scores = prompts[0], {}
    # 4. The run folder (resumed when it holds this run), then every seed, written as it is done.
    specific = {
        "classifier": classifier.spec,
        "layer": job.layer or "pre-logits",
        "layer_width": width,
        "neuron": job.neuron,
        "direction_file": str(job.direction_file) if job.direction_file else None,
        "mode": "maximize" if job.maximize else "minimize",
        "candidate_prompts": prompts,
        "selection_seeds": selection_seeds if scores else [],
        "selection_scores": scores,
        "prompt": prompt,
        "judges": judges.specs,
    }
    folder = open_seed_run("neuron", job, specific, engine.components, optim, device)
    folder.annotator = judges

    def labels(title: str, metrics: dict[str, float]) -> list[str]:
        top = classifier.class_names[int(metrics["top_class"])]
        return [title, f"activation {metrics['activation']:.3f}", f"top: {top} {metrics['top_p']:.2f}"]

    def figures(metrics: dict[str, float]) -> dict[str, Any]:
        # The class name behind the top class index, for readers of the record.
        return {**rounded(metrics), "top_class_name": classifier.class_names[int(metrics["top_class"])]}

    mode = "max" if job.maximize else "min"
    target = f"neuron {job.neuron}" if direction is None else f"direction {job.direction_file.name}"
    sheet_title = f"{classifier.spec} {target} ({mode}imize)  '{prompt}'"
    stem = f"{target_label(job.neuron, job.direction_file)}_{mode}"
    writer = ItemWriter(folder, "neuron", stem, sheet_title, labels, classes={}, figures=figures)
    records = optimize_seeds(engine, objective, prompt, job.seeds, job.batch_size, job.sampler, optim, progress, writer)
    return run_result(folder, records, started)


@dataclass
class NeuronSearchJob:
    classifier: str
    class_name: str
    top: int = 10
    samples: int = 8
    seed: int = 0
    prompt_template: str = "a photograph of a {}"
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


@torch.no_grad()
def find_neurons(job: NeuronSearchJob) -> dict[str, Any]:
    """Penultimate neurons that drive a class: contribution = weight x mean activation over generated images."""
    # 1. Check the options before anything heavy is loaded.
    if job.samples < 1 or job.top < 1:
        raise DiginError("--samples and --top must be at least 1")
    check_prompt_template(job.prompt_template)
    job = with_family_defaults(job)  # also checks the model path
    device, unet_dtype = resolve_runtime(job.runtime)
    # 2. The classifier, its last layer and the class.
    classifier = load_classifier(job.classifier, device)
    class_index, class_name, weight = class_head(classifier, job.class_name, "attributing a logit to its neurons")
    prompt = job.prompt_template.format(class_name)
    # 3. Images of the class, and each neuron's share of its logit.
    engine = open_engine(job.runtime, device, unet_dtype, job.sampler)
    seeds = list(range(job.seed, job.seed + job.samples))
    images = engine.sample(
        initial_latents(engine.components, seeds),
        engine.encode_text([prompt]).expand(len(seeds), -1, -1),
        engine.null_embedding(len(seeds)),
        job.sampler,
    )
    features, logits = classifier.features_and_logits(images)  # (N, D), (N, C)
    mean_activation = features.float().mean(0)  # (D,)
    contribution = weight * mean_activation  # (D,): each neuron's share of the class logit
    order = contribution.argsort(descending=True)[: job.top].tolist()
    return {
        "classifier": classifier.spec,
        "class_name": class_name,
        "class_index": class_index,
        "prompt": prompt,
        "seeds": seeds,
        "mean_confidence": round(float(logits.softmax(-1)[:, class_index].mean()), 6),
        "neurons": [
            {
                "neuron": n,
                "contribution": round(float(contribution[n]), 6),
                "weight": round(float(weight[n]), 6),
                "mean_activation": round(float(mean_activation[n]), 6),
            }
            for n in order
        ],
    }
