"""The Python API, for notebooks and scripts: ``import digin_cli as digin``.

    sd = digin.load_model("shapes")                          # load once...
    run = digin.disagree("shapes:oracle", "shapes:color-biased", "circle", model=sd, num_images=2)
    run[0].after_image                                       # ...a PIL image; run[0].after["p_f"]
    run = digin.neuron("shapes:background-biased", neuron=38, model=sd, prompts=["a photograph of a red circle on sand"])

One function per task, with the command line's options as keyword arguments and the same
defaults (`--lr-latent` is `lr_latent=`, `--freeze-prompt` is `optimize_prompt=False`).
Each calls the same task as the CLI does (``tasks``), so both stay one code path. With
`out=` the run folder, its records and its report are written there (and a rerun
resumes it, as on the command line); without, the run goes to a temporary folder that is
removed once its images are read back. Models and classifiers may be passed in loaded
(`load_model`, `load_classifier`), so a notebook loads Stable Diffusion once. Errors are
`DiginError` with the CLI's one-line messages; `progress=False` turns the bar off.
`judge=` ("shapes:oracle-2", or several) is --judge: each item's `claimed` and `confirmed`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from digin_cli.components import DiffusionComponents
from digin_cli.errors import DiginError

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"  # the same as models.DEFAULT_MODEL (a test keeps them equal)

# The engine options every optimizing task takes, as keyword arguments (the CLI's names).
SAMPLER_OPTIONS = {"ddim_steps": "num_steps", "guidance": "guidance_scale", "spacing": "timestep_spacing",
                   "resolution": "resolution"}  # fmt: skip
OPTIM_OPTIONS = {
    "steps": "steps", "lr_latent": "lr_latent", "lr_prompt": "lr_prompt", "lr_null": "lr_null",
    "optimize_latent": "optimize_latent", "optimize_prompt": "optimize_prompt", "optimize_null": "optimize_null",
    "loss_steps": "loss_steps", "cutouts": "num_cutouts", "augment": "augment", "keep": "keep",
    "claim_margin": "claim_margin", "noise_reg": "noise_reg",
}  # fmt: skip
REAL_IMAGE_OPTIONS = {"caption": "caption", "captioner": "captioner", "mask": "mask_file",
                      "sam_checkpoint": "sam_checkpoint", "sam_model_type": "sam_model_type"}  # fmt: skip


@dataclass
class Item:
    """One item of a run: its record's figures and its images (PIL, read from its files)."""

    record: dict[str, Any]
    images: dict[str, Image.Image] = field(default_factory=dict)  # the record's files by their keys

    @property
    def name(self) -> str:
        return self.record["item"]

    @property
    def ok(self) -> bool:
        return self.record["status"] == "ok"

    @property
    def before(self) -> dict[str, Any]:
        return self.record["before"]

    @property
    def after(self) -> dict[str, Any]:
        return self.record["after"]

    @property
    def claimed(self) -> bool | None:
        """The finding the item presents holds (None: the command claims nothing)."""
        return self.record.get("claimed")

    @property
    def confirmed(self) -> bool | None:
        """Claimed, and every judge (`judge=`) agrees; None without judges."""
        return self.record.get("confirmed")

    @property
    def judges(self) -> dict[str, Any]:
        """Per judge spec: its top class and p(claimed class) before and after, and `agrees`."""
        return self.record.get("judges") or {}

    @property
    def best_step(self):
        return self.record["best_step"]

    @property
    def history(self):
        return self.record.get("history", [])

    @property
    def before_image(self) -> Image.Image | None:
        """The start: the unoptimized sample, or the original photograph."""
        return self.images.get("initial") or self.images.get("original")

    @property
    def after_image(self) -> Image.Image | None:
        """The kept iterate (for neuron-cf the minimized image, else the maximized one)."""
        for key in ("optimized", "counterfactual", "minimized", "maximized"):
            if key in self.images:
                return self.images[key]
        return None

    @property
    def mask(self) -> Image.Image | None:
        """Real images: the object mask (white = object)."""
        return self.images.get("object_mask")

    @property
    def reconstruction(self) -> Image.Image | None:
        """Real images: the model's reconstruction of the photograph from its inversion."""
        return self.images.get("reconstruction")

    def __repr__(self) -> str:
        return f"Item({self.name!r}, status={self.record['status']!r}, before={self.before}, after={self.after})"


@dataclass
class Run:
    """What a task returns: the run header, the items (in input order), and where the files
    and the report are (None without `out=`)."""

    header: dict[str, Any]
    items: list[Item]
    out: Path | None = None

    @property
    def report(self) -> Path | None:
        return None if self.out is None else self.out / "index.html"

    @property
    def ranking(self) -> list[dict[str, Any]]:
        """A class scan's classes, ranked (tasks/scan.py, RANKING_RULE): per class its rank,
        counts (items, claimed, confirmed), best item and image, best margin and screening
        score; [] for a one-class run."""
        return self.header.get("ranking") or []

    @property
    def screening(self) -> list[dict[str, Any]] | None:
        """With screen=: every class's screening figures (p_f, p_g per seed, score), highest score first."""
        return (self.header.get("scan") or {}).get("screening")

    def __getitem__(self, index: int) -> Item:
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def _repr_html_(self) -> str:  # Jupyter shows the run as a small table of images and figures
        import base64
        import io

        def inline(image: Image.Image | None) -> str:
            if image is None:
                return ""
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}" width="128">'

        rows = "".join(
            f"<tr><td>{item.name}</td><td>{inline(item.before_image)}</td><td>{inline(item.after_image)}</td>"
            f"<td><code>{item.before}</code><br><code>{item.after}</code></td></tr>"
            for item in self.items
        )
        return f"<table><tr><th>item</th><th>before</th><th>after</th><th>figures</th></tr>{rows}</table>"


def load_model(model: str = DEFAULT_MODEL, *, lora: str | list[str] | None = None, revision: str | None = None,
               variant: str | None = None) -> DiffusionComponents:  # fmt: skip
    """A diffusion model (hub id, diffusers folder or built-in name), loaded once to pass as
    `model=`; `lora` ("PATH_OR_ID[:SCALE]", or several) fused in, `revision` and `variant` as
    --lora, --revision and --variant."""
    from digin_cli.models import load_diffusion

    loras = (lora,) if isinstance(lora, str) else tuple(lora or ())
    return load_diffusion(model, revision=revision, variant=variant, loras=loras)


def load_classifier(spec: str, device: str = "cpu"):
    """A classifier by its spec (as --classifier takes it), loaded once to pass to the tasks."""
    from digin_cli.models import load_classifier as load

    return load(spec, device)


def _engine(options: dict[str, Any], seed: int):
    """The engine options among the keyword arguments -> (SamplerConfig, OptimConfig); others are an error."""
    from digin_cli.engine import OptimConfig, SamplerConfig

    unknown = sorted(set(options) - set(SAMPLER_OPTIONS) - set(OPTIM_OPTIONS))
    if unknown:
        known = ", ".join([*SAMPLER_OPTIONS, *OPTIM_OPTIONS])
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; the engine options are {known}")
    # What is not given is the model family's default, as on the command line.
    sampler = SamplerConfig(**{"num_steps": None, "guidance_scale": None,
                               **{SAMPLER_OPTIONS[k]: v for k, v in options.items() if k in SAMPLER_OPTIONS}})  # fmt: skip
    optim = OptimConfig(seed=seed, **{"loss_steps": None, **{OPTIM_OPTIONS[k]: v for k, v in options.items() if k in OPTIM_OPTIONS}})
    return sampler, optim


def _runtime(model, device: str, dtype: str, compile: bool, overwrite: bool):  # noqa: A002
    from digin_cli.tasks.runtime import RuntimeOptions

    return RuntimeOptions(model=model, device=device, dtype=dtype, compile=compile, overwrite=overwrite)


def _real(real_options: dict[str, Any], p2p_fraction: float | Sequence[float] | None = None):
    from digin_cli.tasks.real_images import RealImageOptions

    values = {REAL_IMAGE_OPTIONS[k]: (Path(v) if k in ("mask", "sam_checkpoint") and v is not None else v)
              for k, v in real_options.items()}  # fmt: skip
    if p2p_fraction is not None:
        values["p2p_fractions"] = (p2p_fraction,) if isinstance(p2p_fraction, (int, float)) else tuple(p2p_fraction)
    return RealImageOptions(**values)


def _judges(judge) -> tuple:
    """`judge=`: a spec or a loaded classifier, or several (--judge, repeated)."""
    return tuple(judge) if isinstance(judge, (list, tuple)) else (judge,) if judge is not None else ()


def _split(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    real = {k: v for k, v in options.items() if k in REAL_IMAGE_OPTIONS}
    return real, {k: v for k, v in options.items() if k not in REAL_IMAGE_OPTIONS}


def _run(task, make_job, out: str | Path | None, progress: bool) -> Run:
    """Run `task(make_job(folder), progress)` into `out` (else a temporary folder) and read back its images."""
    from digin_cli.tasks.runtime import NoProgress

    bar = _progress() if progress else NoProgress()
    scratch = tempfile.TemporaryDirectory(prefix="digin-") if out is None else nullcontext()
    with scratch as where:
        folder = Path(out) if out is not None else Path(where) / "run"
        try:
            result = task(make_job(folder), bar)
        finally:
            getattr(bar, "close", lambda: None)()
        items = [Item(record, _read_images(folder, record)) for record in result["items"]]
        return Run(result["header"], items, folder if out is not None else None)


def _read_images(folder: Path, record: dict[str, Any]) -> dict[str, Image.Image]:
    images = {}
    for key, name in (record.get("files") or {}).items():
        with Image.open(folder / name) as image:
            images[key] = image.copy()
    return images


def _progress():
    """rich's progress bar, which also draws in Jupyter."""
    from rich.console import Console

    from digin_cli.progress import RichProgress

    return RichProgress(Console(stderr=True))


# -- the tasks -----------------------------------------------------------------------------


def disagree(classifier_f, classifier_g, class_name: str | Sequence[str], *, classes_file: str | Path | None = None,
             screen: int | None = None, top: int | None = None, num_images: int = 1, seed: int = 0,
             prompt_template: str = "a photograph of a {}", batch_size: int = 1, model=DEFAULT_MODEL,
             device: str = "auto", dtype: str = "fp32", compile: bool = False, cone: str | None = None, judge: str | Sequence[str] | None = None, out: str | Path | None = None,  # noqa: A002
             overwrite: bool = False, progress: bool = True, **engine_options) -> Run:  # fmt: skip
    """Images that classifier f assigns to `class_name` and classifier g does not (`digin disagree`).
    Several classes (a list, `classes_file=`, or "all": every class of f) are a class scan:
    `num_images` seeds a class, optionally screened first (`screen=K, top=N`: --screen, --top);
    the run's `ranking` ranks the classes."""
    from digin_cli.tasks.disagree import DisagreeJob, run_disagree

    sampler, optim = _engine(engine_options, seed)
    return _run(run_disagree, lambda folder: DisagreeJob(
        classifier_f=classifier_f, classifier_g=classifier_g, class_name=class_name, out=folder,
        seeds=list(range(seed, seed + num_images)), prompt_template=prompt_template, batch_size=batch_size,
        runtime=_runtime(model, device, dtype, compile, overwrite), sampler=sampler, optim=optim, judges=_judges(judge),
        cone=cone, classes_file=Path(classes_file) if classes_file is not None else None, screen=screen, top=top),
        out, progress)  # fmt: skip


def neuron(classifier, *, neuron: int | None = None, direction: str | Path | None = None, layer: str | None = None,
           minimize: bool = False, prompts: list[str] | None = None, select_samples: int = 8, candidates: int = 3,
           num_images: int = 1, seed: int = 0, prompt_template: str = "a photograph of a {}", batch_size: int = 1,
           model=DEFAULT_MODEL, device: str = "auto", dtype: str = "fp32", compile: bool = False,  # noqa: A002
           judge: str | Sequence[str] | None = None, out: str | Path | None = None, overwrite: bool = False, progress: bool = True, **engine_options) -> Run:  # fmt: skip
    """What a neuron (or a feature direction) of a classifier looks for (`digin neuron`)."""
    from digin_cli.tasks.neuron import NeuronJob, run_neuron

    sampler, optim = _engine(engine_options, seed)
    return _run(run_neuron, lambda folder: NeuronJob(
        classifier=classifier, out=folder, seeds=list(range(seed, seed + num_images)), neuron=neuron,
        direction_file=Path(direction) if direction is not None else None, layer=layer, maximize=not minimize,
        prompts=list(prompts or []), num_candidates=candidates, select_samples=select_samples,
        prompt_template=prompt_template, batch_size=batch_size, runtime=_runtime(model, device, dtype, compile, overwrite),
        sampler=sampler, optim=optim, judges=_judges(judge)), out, progress)  # fmt: skip


def uvce(inputs: str | Path, classifier, *, target: str | list[str] | None = None, source_class: str | None = None,
         csv: str | Path | None = None, p2p_fraction: float | Sequence[float] = (0.3, 0.4, 0.5), w_latent: float = 25.0,
         w_pixel: float = 250.0, seed: int = 0, batch_size: int = 1, model=DEFAULT_MODEL, device: str = "auto", dtype: str = "fp32",
         cone: str | None = None, judge: str | Sequence[str] | None = None, out: str | Path | None = None, overwrite: bool = False, progress: bool = True, **options) -> Run:  # fmt: skip
    """Visual counterfactuals of real images (`digin uvce`); real-image options: caption, captioner,
    mask, sam_checkpoint, sam_model_type."""
    from digin_cli.tasks.uvce import UvceJob, run_uvce

    real, engine_options = _split(options)
    sampler, optim = _engine(engine_options, seed)
    targets = [target] if isinstance(target, str) else list(target or [])
    return _run(run_uvce, lambda folder: UvceJob(
        classifier=classifier, inputs=Path(inputs), targets=targets, out=folder, source_class=source_class,
        csv_file=Path(csv) if csv is not None else None, weight_latent=w_latent, weight_pixel=w_pixel,
        batch_size=batch_size, real=_real(real, p2p_fraction), runtime=_runtime(model, device, dtype, False, overwrite),
        sampler=sampler, optim=optim, judges=_judges(judge), cone=cone), out, progress)  # fmt: skip


def neuron_cf(inputs: str | Path, classifier, *, neuron: int | None = None, direction: str | Path | None = None,
              layer: str | None = None, class_name: str | None = None, direction_mode: str = "both",
              from_other_class: bool = False, source_class: str | None = None, csv: str | Path | None = None,
              drop_threshold: float = 0.3, object_error_ratio: float = 2.0, hold_object: bool = True,
              w_latent: float = 25.0, w_pixel: float = 250.0, seed: int = 0, batch_size: int = 1, model=DEFAULT_MODEL,
              device: str = "auto", dtype: str = "fp32", compile: bool = False, judge: str | Sequence[str] | None = None, out: str | Path | None = None,  # noqa: A002
              overwrite: bool = False, progress: bool = True, **options) -> Run:  # fmt: skip
    """Neuron counterfactuals of real images and the spurious-feature verdict (`digin neuron-cf`)."""
    from digin_cli.tasks.neuron_cf import NeuronCfJob, run_neuron_cf

    real, engine_options = _split(options)
    sampler, optim = _engine(engine_options, seed)
    return _run(run_neuron_cf, lambda folder: NeuronCfJob(
        classifier=classifier, inputs=Path(inputs), out=folder, neuron=neuron,
        direction_file=Path(direction) if direction is not None else None, layer=layer, class_name=class_name,
        source_class=source_class, csv_file=Path(csv) if csv is not None else None, direction_mode=direction_mode,
        from_other_class=from_other_class, drop_threshold=drop_threshold, object_error_ratio=object_error_ratio,
        hold_object=hold_object, weight_latent=w_latent, weight_pixel=w_pixel, batch_size=batch_size, real=_real(real),
        runtime=_runtime(model, device, dtype, compile, overwrite), sampler=sampler, optim=optim, judges=_judges(judge)),
        out, progress)  # fmt: skip


def directions(folder: str | Path, classifier, class_name: str, *, components: int = 10, top_images: int = 8,
               batch_size: int = 32, device: str = "auto", out: str | Path) -> dict[str, Any]:  # fmt: skip
    """A class's feature directions by neural PCA (`digin directions`): the record of
    `directions.json`; each component's `direction_file` in `out` is what `neuron(...,
    direction=)` and `neuron_cf(..., direction=)` take."""
    from digin_cli.tasks.directions import DirectionsJob, run_directions
    from digin_cli.tasks.runtime import RuntimeOptions

    job = DirectionsJob(classifier=classifier, class_name=class_name, folder=Path(folder), out=Path(out),
                        components=components, top_images=top_images, batch_size=batch_size,
                        runtime=RuntimeOptions(device=device))  # fmt: skip
    record = run_directions(job)
    return {**record, "out": str(out)}


__all__ = ["DiginError", "Item", "Run", "directions", "disagree", "load_classifier", "load_model", "neuron", "neuron_cf", "uvce"]
