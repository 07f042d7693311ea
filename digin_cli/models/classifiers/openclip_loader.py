"""Zero-shot open_clip classifiers: class weights from open_clip's own helper, cached on disk."""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from digin_cli.errors import DiginError
from digin_cli.io import cache_dir
from digin_cli.models.classifiers.base import Classifier, ZeroShotCLIP
from digin_cli.models.classifiers.class_names import imagenet_names
from digin_cli.models.classifiers.specs import first_line, pair, parse_floats, read_class_names
from digin_cli.models.hub import cached_file, require_hub

logger = logging.getLogger(__name__)

# Bump when the zero-shot cache file layout or key recipe changes.
ZERO_SHOT_CACHE_VERSION = "1"


def file_fingerprint(path: Path) -> str:
    # Size + mtime instead of a content hash: hashing a 600 MB checkpoint on every load
    # would cost more than it saves; a re-saved file gets a new mtime anyway.
    stat = path.stat()
    return f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def zero_shot_cache_path(arch: str, weights_id: str, class_names: Sequence[str], templates: Sequence) -> Path:
    """Where the class-weight matrix for this (model, weights, classes, templates) is cached."""
    import open_clip

    template_texts = [t if isinstance(t, str) else t("{}") for t in templates]
    key = "\n".join(
        [ZERO_SHOT_CACHE_VERSION, open_clip.__version__, arch, weights_id, "\x1f".join(class_names)]
        + ["\x1f".join(template_texts)]
    )
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
    return cache_dir() / "zeroshot" / f"{arch}-{digest}.pt"


def zero_shot_weights(
    clip: nn.Module, arch: str, weights_id: str, class_names: list[str], device: torch.device
) -> torch.Tensor:
    """(D, C) class weights, from the disk cache or built with open_clip's own helper."""
    import open_clip
    from open_clip import OPENAI_IMAGENET_TEMPLATES, build_zero_shot_classifier

    path = zero_shot_cache_path(arch, weights_id, class_names, OPENAI_IMAGENET_TEMPLATES)
    if path.is_file():
        try:
            weights = torch.load(path, map_location=device, weights_only=True)
            if isinstance(weights, torch.Tensor) and weights.shape[-1] == len(class_names):
                return weights
        except Exception as error:  # noqa: BLE001 - a damaged cache entry is rebuilt, not fatal
            logger.warning("ignoring unreadable zero-shot cache %s (%s)", path, error)

    logger.info("building zero-shot weights for %d classes (cached afterwards in %s)", len(class_names), path)
    tokenizer = open_clip.get_tokenizer(arch)
    weights = build_zero_shot_classifier(
        clip, tokenizer, class_names, templates=OPENAI_IMAGENET_TEMPLATES, device=device
    )  # (D, C)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.part")
        torch.save(weights.cpu(), partial)
        os.replace(partial, path)  # atomic: a concurrent reader never sees half a file
    except OSError as error:  # a read-only cache only costs time, never the run
        logger.warning("could not write zero-shot cache %s (%s)", path, error)
    return weights


def _check_hub_weights(arch: str, tag: str) -> None:
    """Pretrained weights that open_clip fetches from the hub, and that are neither in the
    local cache nor fetchable, fail at once (models/hub.py)."""
    import open_clip

    # "org/name/" (open_clip's default file) or "org/name/file"; open_clip tries .safetensors first.
    repo_id, filename = os.path.split(open_clip.get_pretrained_cfg(arch, tag).get("hf_hub", ""))
    if not repo_id:
        return
    filename = filename or "open_clip_pytorch_model.bin"
    safe = "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin" else filename.replace(".bin", ".safetensors")
    if not any(cached_file(repo_id, file) for file in (safe, filename)):
        require_hub(repo_id, f"the pretrained weights '{tag}' of open_clip {arch}",
                    f"or pass a local file: openclip:{arch}//path/to/weights")  # fmt: skip


def load_openclip(spec: str, name: str, options: dict[str, str], device: torch.device) -> Classifier:
    import open_clip

    arch, sep, pretrained = name.partition("/")
    if not sep or not arch or not pretrained:
        raise DiginError(
            f"'{spec}' needs an architecture and weights: openclip:ARCH/PRETRAINED, "
            "e.g. openclip:ViT-B-16/laion2b_s34b_b88k or openclip:ViT-B-16//path/to/weights.pt"
        )
    if arch not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
        hint = f"close matches: {', '.join(close)}" if close else "see `open_clip.list_models()`"
        raise DiginError(f"unknown open_clip architecture '{arch}' in '{spec}'; {hint}")
    if open_clip.is_pretrained_cfg(arch, pretrained):
        weights_id = "tag:" + pretrained.lower().replace("-", "_")  # open_clip's own tag spelling rule
        _check_hub_weights(arch, pretrained)
    elif Path(pretrained).expanduser().is_file():
        pretrained = str(Path(pretrained).expanduser())
        weights_id = file_fingerprint(Path(pretrained))
    else:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise DiginError(
            f"'{pretrained}' in '{spec}' is neither a pretrained tag of {arch} nor an existing file; "
            f"tags: {', '.join(tags) or 'none'}; or give a checkpoint path"
        )

    overrides = {}
    if "mean" in options:
        overrides["image_mean"] = parse_floats(options["mean"], "mean", spec)
    if "std" in options:
        overrides["image_std"] = parse_floats(options["std"], "std", spec)
    try:
        clip, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device, **overrides)
    except RuntimeError as error:
        if "Failed to download" in str(error):  # open_clip wraps hub/URL errors this way
            raise DiginError(
                f"pretrained weights '{pretrained}' for open_clip {arch} are not available "
                f"({first_line(error)}); download them once with network access, "
                f"or pass a local file: openclip:{arch}//path/to/weights"
            ) from error
        if "loading state_dict" in str(error):
            detail = " ".join(str(error).split())[:300]
            raise DiginError(
                f"checkpoint {pretrained} does not fit open_clip architecture '{arch}' ({detail}); "
                "name the architecture the checkpoint was trained with"
            ) from error
        raise
    clip.requires_grad_(False).eval()

    if "classes" in options:
        class_names, synonyms = read_class_names(options["classes"], spec), None
    else:
        class_names, synonyms = imagenet_names()
    weights = zero_shot_weights(clip, arch, weights_id, class_names, device)  # (D, C)

    preprocess = open_clip.get_model_preprocess_cfg(clip)
    return Classifier(
        ZeroShotCLIP(clip, weights),
        spec=spec,
        class_names=class_names,
        class_synonyms=synonyms,
        input_size=pair(preprocess["size"]),
        mean=preprocess["mean"],
        std=preprocess["std"],
    ).to(device)
