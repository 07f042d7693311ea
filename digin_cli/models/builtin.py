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
from pathlib import Path

import torch
import torch.nn.functional as F

from digin_cli.errors import DiginError
from digin_cli.io import cache_dir
from digin_cli.models.classifiers import BUILTIN_CLASSIFIER_LOADERS, Classifier, load_classifier
from digin_cli.models.diffusion import BUILTIN_DIFFUSION_MODELS

TINY_CLASSES = ["circle", "square", "triangle", "star"]
TINY_CLASSIFIERS = {"f": 1, "g": 2}  # name -> init seed
TINY_CLASSIFIER_SIZE = 64  # the tiny pipeline's resolution: no upsampling to timm's default 160
TINY_VERSION = "v6"  # bump when the recipe below changes, so old caches are not reused


def clip_tokenizer_files(folder: Path) -> None:
    """Write the real CLIP BPE vocabulary (shipped inside open_clip) as vocab.json + merges.txt.

    open_clip names the special tokens <start_of_text>/<end_of_text>; Stable Diffusion's
    tokenizer calls them <|startoftext|>/<|endoftext|> (ids 49406/49407), so rename them.
    """
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): index for token, index in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for (a, b), _ in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def sd_v1_scheduler():
    """Stable Diffusion v1's noise schedule and DDIM settings."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def clip_text_encoder(hidden_size: int, intermediate_size: int, num_layers: int = 2, num_heads: int = 4):
    """A small CLIP text transformer over the real CLIP vocabulary (49408 tokens, 77 positions)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def clip_tokenizer():
    """Stable Diffusion's CLIPTokenizer, built from the vocabulary that ships inside open_clip."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as vocab_dir:
        clip_tokenizer_files(Path(vocab_dir))
        return CLIPTokenizer.from_pretrained(vocab_dir, model_max_length=77)


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline without safety checker, ready for save_pretrained."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# digin's defaults for the small built-in pipelines, read by load_diffusion from digin.json.
# - inversion_lr: their UNets respond weakly to the null embedding: null-text inversion at
#   the reference lr 1e-2 reached 8.7 dB on a shapes scene, at 0.1 24.4 dB (the VAE's bound).
# - prompt_lr: their text embeddings are 64 wide, SD 1.x's 768. Adam moves every
#   coordinate by about lr per step, so the same lr moves the cross-attention logits (sums
#   over the width) roughly 12x less. Maximizing the grass neuron of
#   shapes:background-biased from sand/water scenes, 20 steps: at 1e-2 the activation went
#   0.04 -> 0.31 (still sand); at 5e-2 (prompt and null) 0.04 -> 1.62 (grass, the neuron's on-grass mean is 1.67).
# - null_lr stays at the reference 1e-2: null-text deltas sit on inverted null embeddings
#   in uvce / neuron-cf, and larger steps there undo the inversion: at 5e-2 the
#   independent oracle-2 agreed with 5 of 8 uvce bench counterfactuals, at 1e-2 with 7.
SMALL_MODEL_SETTINGS = {"inversion_lr": 0.1, "prompt_lr": 0.05, "null_lr": 0.01}


def write_model_settings(folder: Path) -> None:
    from digin_cli.models.diffusion import SETTINGS_FILE

    (Path(folder) / SETTINGS_FILE).write_text(json.dumps(SMALL_MODEL_SETTINGS, indent=2) + "\n")


def build_tiny_pipeline(folder: Path, seed: int = 0) -> None:
    """A small Stable-Diffusion-format pipeline (64x64 images, 16x16x4 latents), random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )
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


def load_shapes_classifier(spec: str, device: torch.device | str) -> Classifier:
    name = spec.split(":", 1)[1]
    meta = shapes_classifier_meta(name)
    folder = SHAPES_WEIGHTS / "classifiers" / name
    triple = lambda values: ";".join(str(v) for v in values)  # noqa: E731
    classifier = load_classifier(
        f"timm:{meta['arch']},checkpoint={folder / 'model.safetensors'},"
        f"classes={SHAPES_WEIGHTS / 'classifiers' / 'classes.txt'},size={meta['input_size']},"
        f"mean={triple(meta['mean'])},std={triple(meta['std'])}",
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
