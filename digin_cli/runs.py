"""Jobs: what one subcommand does, from validated options to files on disk.

A job loads models (``models``), hands an objective to the engine (``engine``),
writes what comes back (``io``) and tells a progress reporter what happens. It
prints nothing itself; the CLI owns the terminal.
"""

from __future__ import annotations

import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch

from digin_cli import __version__
from digin_cli.engine import (
    GuidedDDIM,
    OptimConfig,
    OptimizationResult,
    SamplerConfig,
    StepReport,
    initial_latents,
)
from digin_cli.errors import DiginError
from digin_cli.io import labelled_sheet, save_png, write_json
from digin_cli.models import DEFAULT_MODEL, Classifier, load_classifier, load_diffusion, resolve_class
from digin_cli.objectives import Disagreement

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RuntimeOptions:
    model: str = DEFAULT_MODEL
    device: str = "auto"  # auto | cpu | cuda | mps (cuda:N accepted)
    dtype: str = "fp32"  # UNet autocast dtype: bf16 on CUDA or CPU, fp16 on CUDA
    compile: bool = False  # torch.compile the UNet


class Progress(Protocol):
    """How a job reports progress; the CLI implements it with rich, tests with a list."""

    def start(self, label: str, total_steps: int) -> None: ...

    def step(self, report: StepReport) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    def start(self, label: str, total_steps: int) -> None:
        pass

    def step(self, report: StepReport) -> None:
        pass

    def finish(self) -> None:
        pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            # One process per GPU under accelerate launch / torchrun: each takes its own.
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DiginError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiginError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DiginError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DiginError(f"unsupported device '{name}'; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise DiginError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}")
    # bf16 autocast also runs on CPUs (x1.9 for an SD-sized UNet on the README's CPU, slower
    # for the 1M-parameter shapes UNet); fp16 autocast is for CUDA.
    allowed = ("cuda", "cpu") if name == "bf16" else ("cuda",)
    if name != "fp32" and device.type not in allowed:
        hint = "--dtype bf16 or fp32" if device.type == "cpu" else "--dtype fp32"
        raise DiginError(f"--dtype {name} (UNet autocast) needs a {' or '.join(d.upper() for d in allowed)} device; on {device.type} use {hint}")
    return DTYPES[name]


def versions() -> dict[str, str]:
    import diffusers
    import open_clip
    import timm
    import transformers

    return {
        "digin": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "open_clip": open_clip.__version__,
    }


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "class"


def check_common(out: Path, sampler: SamplerConfig, optim: OptimConfig, batch_size: int) -> None:
    """Validate cheap options before anything heavy is loaded or any file is written."""
    if out.exists() and not out.is_dir():
        raise DiginError(f"--out {out} exists and is not a folder; give a folder path")
    if sampler.num_steps < 1:
        raise DiginError("--ddim-steps must be at least 1")
    if optim.steps < 0:
        raise DiginError("--steps must be 0 or more")
    if not 1 <= optim.loss_steps <= sampler.num_steps:
        raise DiginError(
            f"--loss-steps must be between 1 and --ddim-steps ({sampler.num_steps}), got {optim.loss_steps}"
        )
    if optim.num_cutouts < 1:
        raise DiginError("--cutouts must be at least 1")
    for option, lr in (("--lr-latent", optim.lr_latent), ("--lr-prompt", optim.lr_prompt), ("--lr-null", optim.lr_null)):
        if lr is not None and not lr > 0:
            raise DiginError(f"{option} must be a positive learning rate, got {lr}")
    if batch_size < 1:
        raise DiginError("--batch-size must be at least 1")


# -- disagree -------------------------------------------------------------------


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
    check_common(job.out, job.sampler, job.optim, job.batch_size)
    if "{}" not in job.prompt_template:
        raise DiginError(f"--prompt-template must contain {{}} where the class name goes, got '{job.prompt_template}'")
    if not job.seeds:
        raise DiginError("--num-images must be at least 1")
    device = resolve_device(job.runtime.device)
    unet_dtype = resolve_dtype(job.runtime.dtype, device)

    f = load_classifier(job.classifier_f, device)
    g = load_classifier(job.classifier_g, device)
    _check_pair(f, g)
    class_index = resolve_class(f, job.class_name)
    class_name = f.class_names[class_index]
    prompt = job.prompt_template.format(class_name)
    components = load_diffusion(job.runtime.model)
    engine = GuidedDDIM(components, device=device, unet_dtype=unet_dtype, compile_unet=job.runtime.compile)
    objective = Disagreement(f, g, class_index)
    optim = job.optim.resolved(components, max(max(f.input_size), max(g.input_size)))

    record = new_record(
        "disagree",
        device,
        job,
        components,
        optim,
        {
            "classifier_f": job.classifier_f,
            "classifier_g": job.classifier_g,
            "class_name": class_name,
            "class_index": class_index,
            "prompt_template": job.prompt_template,
            "prompt": prompt,
        },
    )

    def labels(title: str, metrics: dict[str, float]) -> list[str]:
        return [title, f"p_f {metrics['p_f']:.3f}", f"p_g {metrics['p_g']:.3f}"]

    sheet_title = f"'{class_name}'  f={job.classifier_f}  g={job.classifier_g}"
    optimize_seeds(
        engine, objective, prompt, job.seeds, job.batch_size, job.sampler, optim, progress,
        ItemWriter(job.out, slug(class_name), sheet_title, labels, record, job.out / "disagree.json", started),
    )  # fmt: skip
    return record


# -- shared by the jobs that optimize from seeds ---------------------------------------


def new_record(
    command: str, device: torch.device, job, components, optim: OptimConfig, specific: dict[str, Any]
) -> dict[str, Any]:
    """The run record: what ran where, with the whole config, before any image is added.

    `job` is any job with runtime, seeds, batch_size and sampler; `specific` holds the
    command's own settings.
    """
    config = {
        "model": job.runtime.model,
        "dtype": job.runtime.dtype,
        "compile": job.runtime.compile,
        **specific,
        "seeds": job.seeds,
        "batch_size": job.batch_size,
        "resolution": components.resolution,
        "sampler": asdict(job.sampler),
        "optim": asdict(optim),
    }
    return {
        "command": command,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "device": str(device),
        "config": config,
        "images": [],
        "seconds": 0.0,
    }


@dataclass
class ItemWriter:
    """Writes each optimized item (PNGs, sheet, its JSON entry) and keeps the run record current."""

    out: Path
    stem: str  # file name prefix, e.g. the class slug
    title: str  # sheet title; the seed is appended
    labels: Any  # (panel title, metrics) -> label lines under the image
    record: dict[str, Any]
    record_path: Path
    started: float

    def write(self, result: OptimizationResult, item: int, seed: int, prompt: str) -> None:
        stem = f"{self.stem}_seed{seed}"
        files = {"initial": f"{stem}_init.png", "optimized": f"{stem}_optimized.png", "sheet": f"{stem}_sheet.png"}
        before, after = result.initial(item), result.best(item)
        best_step = result.best_steps[item]
        save_png(result.initial_images[item], self.out / files["initial"])
        save_png(result.best_images[item], self.out / files["optimized"])
        sheet = labelled_sheet(
            [
                (result.initial_images[item], self.labels("SD init", before)),
                (result.best_images[item], self.labels(f"optimized (step {best_step})", after)),
            ],
            title=f"{self.title}  seed {seed}",
        )
        save_png(sheet, self.out / files["sheet"])
        history = [
            {"step": step, **{name: round(values[item], 6) for name, values in entry.items()}}
            for step, entry in enumerate(result.history)
        ]
        self.record["images"].append(
            {
                "seed": seed,
                "prompt": prompt,
                "files": files,
                "initial": {k: round(v, 6) for k, v in before.items()},
                "optimized": {k: round(v, 6) for k, v in after.items()},
                "best_step": best_step,
                "history": history,
                # Items of one batch are optimized together; each gets the batch time divided evenly.
                "seconds": round(result.seconds / len(result.best_steps), 3),
            }
        )

    def flush(self) -> None:
        self.record["seconds"] = round(time.perf_counter() - self.started, 3)
        # Rewritten after every batch: a long run that stops keeps a valid record of what is done.
        write_json(self.record, self.record_path)
        self.record["json"] = str(self.record_path)


def optimize_seeds(
    engine: GuidedDDIM,
    objective,
    prompt: str,
    seeds: list[int],
    batch_size: int,
    sampler: SamplerConfig,
    optim: OptimConfig,
    progress: Progress,
    writer: ItemWriter,
) -> None:
    """Optimize one image per seed from `prompt`, `batch_size` at a time, writing as it goes."""
    prompt_emb = engine.encode_text([prompt])  # (1, L, D)
    null_emb = engine.encode_text([""])  # (1, L, D)
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        batch = len(chunk)
        progress.start(f"seed {chunk[0]}" if batch == 1 else f"seeds {chunk[0]}-{chunk[-1]}", optim.steps)
        result = engine.optimize(
            objective,
            initial_latents(engine.components, chunk),
            prompt_emb.expand(batch, -1, -1),
            null_emb.expand(batch, -1, -1),
            sampler,
            optim,
            on_step=progress.step,
        )
        progress.finish()
        for item, seed in enumerate(chunk):
            writer.write(result, item, seed, prompt)
        writer.flush()


# -- neuron ---------------------------------------------------------------------------


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


def load_direction(path: Path, width: int) -> torch.Tensor:
    """A feature-space direction from .npy or .pt: (D,) float32."""
    if not path.is_file():
        raise DiginError(f"direction file {path} does not exist; give a .npy or .pt vector of length {width}")
    try:
        if path.suffix == ".npy":
            import numpy as np

            vector = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            vector = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user problem
        raise DiginError(f"could not read direction file {path} ({type(error).__name__}); save a 1-D .npy or .pt") from None
    if not isinstance(vector, torch.Tensor) or vector.squeeze().dim() != 1 or vector.numel() != width:
        shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
        raise DiginError(f"direction in {path} has shape {shape}; it must be a vector of length {width}")
    return vector.squeeze().float()


def neuron_target(
    feature_map, width: int, neuron: int | None, direction_file: Path | None, device
) -> torch.Tensor | None:
    """Check a neuron index against the feature map's width, or load the direction file.

    Returns the direction (D,) on `device`, or None for a single neuron."""
    if neuron is not None and not 0 <= neuron < width:
        where = f"layer '{feature_map.layer}'" if feature_map.layer else "the last layer's input"
        spec = feature_map.classifier.spec
        raise DiginError(f"neuron {neuron} is out of range: {where} of {spec} has {width} neurons (0-{width - 1})")
    if direction_file is None:
        return None
    return load_direction(direction_file, width).to(device)


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
    null = engine.encode_text([""]).expand(len(seeds), -1, -1)
    z_T = initial_latents(engine.components, seeds)
    for prompt in prompts:
        images = engine.sample(z_T, engine.encode_text([prompt]).expand(len(seeds), -1, -1), null, sampler)
        value, _ = objective.activation(images.unsqueeze(1))  # (N,)
        scores[prompt] = round(float(value.mean()), 6)
    return max(scores, key=scores.get), scores


def run_neuron(job: NeuronJob, progress: Progress | None = None) -> dict[str, Any]:
    """What a neuron (or feature direction) of a classifier looks for (paper section 6)."""
    from digin_cli.objectives import FeatureMap, NeuronObjective

    progress = progress or NoProgress()
    started = time.perf_counter()
    check_common(job.out, job.sampler, job.optim, job.batch_size)
    if (job.neuron is None) == (job.direction_file is None):
        raise DiginError("give exactly one of --neuron N and --direction FILE")
    if "{}" not in job.prompt_template:
        raise DiginError(f"--prompt-template must contain {{}} where the class name goes, got '{job.prompt_template}'")
    if not job.seeds:
        raise DiginError("--num-images must be at least 1")
    if job.select_samples < 1:
        raise DiginError("--select-samples must be at least 1")
    device = resolve_device(job.runtime.device)
    unet_dtype = resolve_dtype(job.runtime.dtype, device)

    classifier = load_classifier(job.classifier, device)
    feature_map = FeatureMap(classifier, job.layer)
    width = feature_map.width()
    direction = neuron_target(feature_map, width, job.neuron, job.direction_file, device)
    objective = NeuronObjective(feature_map, neuron=job.neuron, direction=direction, maximize=job.maximize)

    prompts = list(job.prompts)
    if not prompts:
        head = classifier.head_weight() if job.layer is None else None
        if head is None:
            raise DiginError(
                "no --prompt given and no last layer to propose prompts from (with --layer, or for this "
                "classifier); give one or more --prompt"
            )
        weights = head[:, job.neuron] if direction is None else head @ direction.to(head)  # (C,)
        # Also when minimizing: start where the neuron fires and see what turns it off.
        prompts = propose_prompts(classifier, weights, job.prompt_template, job.num_candidates)
    components = load_diffusion(job.runtime.model)
    engine = GuidedDDIM(components, device=device, unet_dtype=unet_dtype, compile_unet=job.runtime.compile)
    optim = job.optim.resolved(components, max(classifier.input_size))

    selection_seeds = [10_000 + i for i in range(job.select_samples)]  # apart from the run's own seeds
    if len(prompts) > 1:
        prompt, scores = select_prompt(engine, objective, prompts, selection_seeds, job.sampler)
    else:
        prompt, scores = prompts[0], {}
    target = f"neuron {job.neuron}" if direction is None else f"direction {job.direction_file.name}"
    record = new_record(
        "neuron",
        device,
        job,
        components,
        optim,
        {
            "classifier": job.classifier,
            "layer": job.layer or "pre-logits",
            "layer_width": width,
            "neuron": job.neuron,
            "direction_file": str(job.direction_file) if job.direction_file else None,
            "mode": "maximize" if job.maximize else "minimize",
            "candidate_prompts": prompts,
            "selection_seeds": selection_seeds if scores else [],
            "selection_scores": scores,
            "prompt": prompt,
        },
    )

    def labels(title: str, metrics: dict[str, float]) -> list[str]:
        top = classifier.class_names[int(metrics["top_class"])]
        return [title, f"activation {metrics['activation']:.3f}", f"top: {top} {metrics['top_p']:.2f}"]

    mode = "max" if job.maximize else "min"
    stem = f"{'n' + str(job.neuron) if direction is None else slug(job.direction_file.stem)}_{mode}"
    sheet_title = f"{classifier.spec} {target} ({mode}imize)  '{prompt}'"
    optimize_seeds(
        engine, objective, prompt, job.seeds, job.batch_size, job.sampler, optim, progress,
        ItemWriter(job.out, stem, sheet_title, labels, record, job.out / "neuron.json", started),
    )  # fmt: skip
    for entry in record["images"]:  # the class names behind the indices, for readers of the JSON
        for key in ("initial", "optimized"):
            entry[key]["top_class_name"] = classifier.class_names[int(entry[key]["top_class"])]
    write_json(record, job.out / "neuron.json")
    return record


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
    device = resolve_device(job.runtime.device)
    classifier = load_classifier(job.classifier, device)
    head = classifier.head_weight()
    if head is None:
        raise DiginError(f"{classifier.spec} has no linear last layer to attribute its logits to")
    class_index = resolve_class(classifier, job.class_name)
    class_name = classifier.class_names[class_index]
    prompt = job.prompt_template.format(class_name)
    components = load_diffusion(job.runtime.model)
    engine = GuidedDDIM(components, device=device, unet_dtype=resolve_dtype(job.runtime.dtype, device))
    seeds = list(range(job.seed, job.seed + job.samples))
    images = engine.sample(
        initial_latents(components, seeds),
        engine.encode_text([prompt]).expand(len(seeds), -1, -1),
        engine.encode_text([""]).expand(len(seeds), -1, -1),
        job.sampler,
    )
    features, logits = classifier.features_and_logits(images)  # (N, D), (N, C)
    mean_activation = features.float().mean(0)  # (D,)
    weight = head[class_index].float()  # (D,)
    contribution = weight * mean_activation  # (D,): each neuron's share of the class logit
    order = contribution.argsort(descending=True)[: job.top].tolist()
    return {
        "classifier": job.classifier,
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
