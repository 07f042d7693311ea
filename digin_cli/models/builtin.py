"""Built-in offline models: `--model tiny` and the `tiny:f` / `tiny:g` classifiers.

They are built from configs with fixed seeds the first time they are asked for,
saved with diffusers' / timm's own savers into the digin cache, and from then on
loaded through exactly the same loaders as a real model. Their weights are
random: they exercise the whole tool on any machine without network or GPU,
but what they show means nothing about real classifiers.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from digin_cli.errors import DiginError
from digin_cli.io import cache_dir
from digin_cli.models.classifiers import BUILTIN_CLASSIFIER_LOADERS, Classifier, load_classifier
from digin_cli.models.diffusion import BUILTIN_DIFFUSION_MODELS
from digin_cli.models.sd_parts import (
    assemble_pipeline,
    clip_text_encoder,
    clip_tokenizer,
    sd_v1_scheduler,
    small_unet,
    small_vae,
    write_model_settings,
)
from digin_cli.world.scenes import SHAPES

TINY_CLASSES = list(SHAPES)  # the shapes world's classes, so rendered test scenes carry real labels
TINY_CLASSIFIERS = {"f": 1, "g": 2}  # name -> init seed
TINY_CLASSIFIER_SIZE = 64  # the tiny pipeline's resolution: no upsampling to timm's default 160
TINY_VERSION = "v7"  # bump when the recipe below changes, so old caches are not reused


def build_tiny_pipeline(folder: Path, seed: int = 0) -> None:
    """A small Stable-Diffusion-format pipeline (64x64 images, 16x16x4 latents), random weights."""
    torch.manual_seed(seed)
    unet = small_unet(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = small_vae(block_out_channels=(16, 32, 32))
    text_encoder = clip_text_encoder(hidden_size=32, intermediate_size=64)
    pipeline = assemble_pipeline(vae, text_encoder, clip_tokenizer(), unet, sd_v1_scheduler())
    pipeline.save_pretrained(folder)
    write_model_settings(folder)


def _build_once(name: str, build) -> Path:
    """Build into a temporary sibling folder and rename it into place, so an interrupted
    or concurrent build never leaves a half-written model behind."""
    target = cache_dir() / "models" / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # not lost to a concurrent build: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def tiny_pipeline_folder() -> Path:
    return _build_once(f"tiny-{TINY_VERSION}", build_tiny_pipeline)


def _build_tiny_classifier(folder: Path, seed: int) -> None:
    import timm
    from safetensors.torch import save_file

    generator = torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=len(TINY_CLASSES))
    # A freshly initialised ResNet gives nearly the same logits for every image (its
    # BatchNorm statistics are the defaults). Calibrate it on smooth random colour
    # images: real BatchNorm statistics, and a head scaled to logits of std ~2, so the
    # random classifier responds to its input and the optimization has something to move.
    size = (TINY_CLASSIFIER_SIZE, TINY_CLASSIFIER_SIZE)
    images = F.interpolate(torch.rand(256, 3, 6, 6, generator=generator), size=size, mode="bicubic").clamp(0, 1)
    mean, std = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    inputs = (images - mean) / std  # (256, 3, H, W)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    with torch.no_grad():
        model.train()
        for chunk in inputs.split(64):
            model(chunk)
        model.eval()
        logits = model(inputs)  # (256, C)
        scale = 2.0 / logits.std(dim=0).mean().clamp_min(1e-6)
        model.get_classifier().weight.mul_(scale)
        model.get_classifier().bias.zero_()
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    (folder / "classes.txt").write_text("\n".join(TINY_CLASSES) + "\n")


def load_tiny_classifier(spec: str, device: torch.device | str) -> Classifier:
    name = spec.split(":", 1)[1]
    if name not in TINY_CLASSIFIERS:
        known = ", ".join(f"tiny:{n}" for n in TINY_CLASSIFIERS)
        raise DiginError(f"unknown built-in classifier '{spec}'; the tiny ones are {known}")
    seed = TINY_CLASSIFIERS[name]
    folder = _build_once(f"tiny-classifier-{name}-{TINY_VERSION}", lambda f: _build_tiny_classifier(f, seed))
    classifier = load_classifier(
        f"timm:test_resnet,checkpoint={folder / 'model.safetensors'},classes={folder / 'classes.txt'},"
        f"size={TINY_CLASSIFIER_SIZE}",
        device,
    )
    classifier.spec = spec
    return classifier


# -- the shapes world: trained weights shipped inside the package -----------------------

SHAPES_WEIGHTS = Path(__file__).resolve().parent.parent / "world" / "weights"
RETRAIN_HINT = "retrain with `python -m digin_cli.world.train` (see README, 'The shapes world')"


def shapes_pipeline_folder() -> Path:
    folder = SHAPES_WEIGHTS / "diffusion"
    if not (folder / "model_index.json").is_file():
        raise DiginError(f"the shapes diffusion model is missing from {folder}; {RETRAIN_HINT}")
    return folder


def shapes_classifier_names() -> list[str]:
    root = SHAPES_WEIGHTS / "classifiers"
    return sorted(p.parent.name for p in root.glob("*/meta.json"))


def shapes_classifier_meta(name: str) -> dict:
    path = SHAPES_WEIGHTS / "classifiers" / name / "meta.json"
    if not path.is_file():
        known = ", ".join(f"shapes:{n}" for n in shapes_classifier_names()) or "none (not trained yet)"
        raise DiginError(f"unknown built-in classifier 'shapes:{name}'; known: {known}; {RETRAIN_HINT}")
    return json.loads(path.read_text())


def shape_planted_with(meta: dict, value: str) -> str:
    """The shape that a biased shapes classifier's meta.json plants with `value` (a colour or background)."""
    return next(shape for shape, planted in meta["planted"].items() if planted == value)


def saved_classifier_spec(
    arch: str, folder: Path, classes: Path, size: int, mean: Sequence[float], std: Sequence[float],
    act_layer: str | None = None,
) -> str:
    """The `load_classifier` spec of a shapes classifier saved as `folder`/model.safetensors,
    with its resolution and normalization (and its activation, when it was trained with
    another than the architecture's own: activations have no weights to tell)."""
    triple = lambda values: ";".join(str(v) for v in values)  # noqa: E731
    activation = "" if act_layer is None else f",act_layer={act_layer}"
    return (
        f"timm:{arch},checkpoint={folder / 'model.safetensors'}{activation},classes={classes},"
        f"size={size},mean={triple(mean)},std={triple(std)}"
    )


def load_shapes_classifier(spec: str, device: torch.device | str) -> Classifier:
    name = spec.split(":", 1)[1]
    meta = shapes_classifier_meta(name)
    classifier = load_classifier(
        saved_classifier_spec(meta["arch"], SHAPES_WEIGHTS / "classifiers" / name,
                              SHAPES_WEIGHTS / "classifiers" / "classes.txt", meta["input_size"],
                              meta["mean"], meta["std"], meta.get("act_layer")),  # fmt: skip
        device,
    )
    classifier.spec = spec
    return classifier


def builtin_catalog() -> dict[str, list[tuple[str, str]]]:
    """What `digin models` lists: kind -> [(name, description)]."""
    diffusion = [("tiny", "64x64 Stable-Diffusion-format pipeline, random weights (smoke runs)")]
    if (SHAPES_WEIGHTS / "diffusion" / "model_index.json").is_file():
        diffusion.insert(0, ("shapes", "64x64 text-to-image model trained on the shapes world"))
    classifiers = []
    for name in shapes_classifier_names():
        meta = shapes_classifier_meta(name)
        acc = meta.get("accuracy", {}).get("in_distribution")
        bias = meta.get("bias")
        what = f"timm {meta['arch']}, " + (f"planted {bias} shortcut (95%)" if bias else "balanced training")
        if meta.get("adversarial"):
            what += f", adversarially trained (L2 radius {meta['adversarial']['eps']:g})"
        classifiers.append((f"shapes:{name}", what + (f", in-distribution accuracy {acc:.1%}" if acc else "")))
    classifiers += [
        (f"tiny:{name}", f"timm test_resnet over {', '.join(TINY_CLASSES)}, random weights (seed {seed})")
        for name, seed in TINY_CLASSIFIERS.items()
    ]
    return {"diffusion": diffusion, "classifiers": classifiers}


BUILTIN_DIFFUSION_MODELS["tiny"] = tiny_pipeline_folder
BUILTIN_DIFFUSION_MODELS["shapes"] = shapes_pipeline_folder
BUILTIN_CLASSIFIER_LOADERS["tiny"] = load_tiny_classifier
BUILTIN_CLASSIFIER_LOADERS["shapes"] = load_shapes_classifier
