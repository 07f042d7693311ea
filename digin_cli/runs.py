"""Jobs: what one subcommand does, from validated options to files on disk.

A job loads models (``models``), hands an objective to the engine (``engine``),
writes what comes back (``io``) and tells a progress reporter what happens. It
prints nothing itself; the CLI owns the terminal.
"""

from __future__ import annotations

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
    dtype: str = "fp32"  # UNet autocast dtype on CUDA; fp32 everywhere else


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
            return torch.device("cuda")
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
    if name != "fp32" and device.type != "cuda":
        raise DiginError(f"--dtype {name} (UNet autocast) needs a CUDA device; on {device.type} use --dtype fp32")
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
    engine = GuidedDDIM(components, device=device, unet_dtype=unet_dtype)
    objective = Disagreement(f, g, class_index)
    optim = job.optim
    if optim.view_size is None:
        optim = OptimConfig(**{**asdict(optim), "view_size": max(max(f.input_size), max(g.input_size))})

    record: dict[str, Any] = {
        "command": "disagree",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "device": str(device),
        "config": {
            "model": job.runtime.model,
            "dtype": job.runtime.dtype,
            "classifier_f": job.classifier_f,
            "classifier_g": job.classifier_g,
            "class_name": class_name,
            "class_index": class_index,
            "prompt_template": job.prompt_template,
            "prompt": prompt,
            "seeds": job.seeds,
            "batch_size": job.batch_size,
            "resolution": components.resolution,
            "sampler": asdict(job.sampler),
            "optim": asdict(optim),
        },
        "images": [],
        "seconds": 0.0,
    }
    record_path = job.out / "disagree.json"
    prompt_emb = engine.encode_text([prompt])  # (1, L, D)
    null_emb = engine.encode_text([""])  # (1, L, D)
    stem = slug(class_name)
    for start in range(0, len(job.seeds), job.batch_size):
        seeds = job.seeds[start : start + job.batch_size]
        batch = len(seeds)
        label = f"seed {seeds[0]}" if batch == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
        progress.start(label, optim.steps)
        result = engine.optimize(
            objective,
            initial_latents(components, seeds),
            prompt_emb.expand(batch, -1, -1),
            null_emb.expand(batch, -1, -1),
            job.sampler,
            optim,
            on_step=progress.step,
        )
        progress.finish()
        for item, seed in enumerate(seeds):
            record["images"].append(
                _write_disagree_item(job, result, item, seed, f"{stem}_seed{seed}", class_name, prompt)
            )
        record["seconds"] = round(time.perf_counter() - started, 3)
        # Rewritten after every batch: a long run that stops keeps a valid record of what is done.
        write_json(record, record_path)
    record["json"] = str(record_path)
    return record


def _write_disagree_item(
    job: DisagreeJob, result: OptimizationResult, item: int, seed: int, stem: str, class_name: str, prompt: str
) -> dict[str, Any]:
    files = {"initial": f"{stem}_init.png", "optimized": f"{stem}_optimized.png", "sheet": f"{stem}_sheet.png"}
    before, after = result.initial(item), result.best(item)
    best_step = result.best_steps[item]
    save_png(result.initial_images[item], job.out / files["initial"])
    save_png(result.best_images[item], job.out / files["optimized"])
    sheet = labelled_sheet(
        [
            (result.initial_images[item], ["SD init", f"p_f {before['p_f']:.3f}", f"p_g {before['p_g']:.3f}"]),
            (
                result.best_images[item],
                [f"optimized (step {best_step})", f"p_f {after['p_f']:.3f}", f"p_g {after['p_g']:.3f}"],
            ),
        ],
        title=f"'{class_name}'  f={job.classifier_f}  g={job.classifier_g}  seed {seed}",
    )
    save_png(sheet, job.out / files["sheet"])
    history = [
        {"step": step, **{name: round(values[item], 6) for name, values in entry.items()}}
        for step, entry in enumerate(result.history)
    ]
    return {
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
