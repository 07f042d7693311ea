"""Frozen image classifiers behind one interface: images in [0, 1] in, logits out.

A classifier is named by a spec string ``KIND:NAME[,key=value...]``:

- ``timm:NAME`` -- a timm model with its pretrained weights, loaded by timm itself
  (so the Hugging Face cache and ``HF_HUB_OFFLINE`` behave as timm users expect).
  ``checkpoint=PATH`` loads local weights (.safetensors / .pth) through timm's own
  ``pretrained_cfg_overlay`` mechanism; ``num_classes=N`` (inferred from the
  checkpoint when omitted), ``classes=FILE`` (one name per line) and ``size=N``,
  ``mean=r;g;b``, ``std=r;g;b`` (for weights trained at another resolution or
  normalization than the architecture's default) are optional.
- ``openclip:ARCH/PRETRAINED`` -- a zero-shot CLIP classifier (paper: ViT-B-16 /
  laion2b_s34b_b88k): class weights are open_clip's own averaged, L2-normalized
  text embeddings of the class names in the OpenAI ImageNet templates; logits are
  100 x cosine similarity. PRETRAINED is an open_clip tag or a local checkpoint
  file. The class-weight matrix is cached on disk, because building it runs the
  text tower 80 times per class. ``classes=FILE``, ``mean=r;g;b``, ``std=r;g;b``.
- ``torchscript:PATH,classes=FILE[,size=224][,mean=r;g;b][,std=r;g;b]``.
- other prefixes (``tiny:``, ``shapes:``) dispatch to loaders registered in
  ``BUILTIN_CLASSIFIER_LOADERS`` by the modules that define those models.

Every user-fixable problem raises ``DiginError`` with a one-line message that
says what was wrong and how to fix it.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from digin_cli.errors import DiginError
from digin_cli.io import cache_dir

logger = logging.getLogger(__name__)

# ImageNet statistics: the torchscript defaults (most exported ImageNet models use them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The paper's zero-shot logits are 100 x cosine (CLIP's trained logit_scale saturates
# at 100, but a checkpoint's own value may differ; the fixed value keeps runs comparable).
ZERO_SHOT_LOGIT_SCALE = 100.0

# Bump when the zero-shot cache file layout or key recipe changes.
_ZERO_SHOT_CACHE_VERSION = "1"

ACCEPTED_FORMS = (
    "timm:NAME[,checkpoint=PATH][,num_classes=N][,classes=FILE][,size=N][,mean=r;g;b][,std=r;g;b]",
    "openclip:ARCH/PRETRAINED[,classes=FILE][,mean=r;g;b][,std=r;g;b]",
    "torchscript:PATH,classes=FILE[,size=224][,mean=r;g;b][,std=r;g;b]",
)
_OPTION_KEYS = {
    "timm": {"checkpoint", "num_classes", "classes", "size", "mean", "std"},
    "openclip": {"classes", "mean", "std"},
    "torchscript": {"classes", "size", "mean", "std"},
}

# prefix -> loader(full spec, device); filled by the modules that define built-in models.
BUILTIN_CLASSIFIER_LOADERS: dict[str, Callable[[str, torch.device], Classifier]] = {}


class Classifier(nn.Module):
    """A frozen image classifier taking images in [0, 1].

    Wraps a module whose ``forward`` maps normalized images to logits. Modules with
    timm's interface (``forward_features`` + ``forward_head(..., pre_logits=True)``)
    also expose ``features``: the input of the last linear layer, which is where the
    paper's neurons live.
    """

    mean: torch.Tensor  # (1, 3, 1, 1)
    std: torch.Tensor  # (1, 3, 1, 1)

    def __init__(
        self,
        model: nn.Module,
        *,
        spec: str,
        class_names: Sequence[str],
        input_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        class_synonyms: Sequence[Sequence[str]] | None = None,
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise DiginError(f"{spec}: mean and std need 3 values (r;g;b), got mean={tuple(mean)} std={tuple(std)}")
        self.model = model
        self.spec = spec
        self.class_names = list(class_names)
        # Extra accepted spellings per class for resolve_class (e.g. WordNet synonyms).
        self.class_synonyms = [tuple(s) for s in class_synonyms] if class_synonyms else [()] * len(self.class_names)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train(self, mode: bool = True) -> Classifier:
        # Frozen means frozen: batch-norm statistics and dropout must never switch to
        # training behaviour, even when a parent module is put in train mode.
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1], any H, W -> (N, 3, h, w) resized and normalized, differentiably."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != self.input_size:
            # antialias: downscaling 512 px images to 224 without it aliases badly.
            images = F.interpolate(images, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        return (images - self.mean) / self.std  # (N, 3, h, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> logits (N, C)."""
        return self.model(self.preprocess(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, D), the input of the classifier's last linear layer."""
        forward_features = getattr(self.model, "forward_features", None)
        forward_head = getattr(self.model, "forward_head", None)
        if not (callable(forward_features) and callable(forward_head)):
            raise DiginError(
                f"features are not available for {self.spec}: the model does not expose timm's "
                "forward_features/forward_head; use a timm: or openclip: classifier for neuron tasks"
            )
        x = self.preprocess(images)
        return forward_head(forward_features(x), pre_logits=True)

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass: ((N, D) the last layer's input, (N, C) logits)."""
        features = self.features(images)
        return features, self.head(features)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """The last layer alone: (N, D) features -> (N, C) logits."""
        if isinstance(self.model, ZeroShotCLIP):
            return self.model.forward_head(features)
        get_classifier = getattr(self.model, "get_classifier", None)
        if not callable(get_classifier):
            raise DiginError(f"{self.spec} does not expose its last layer (timm's get_classifier)")
        return get_classifier()(features)

    def head_weight(self) -> torch.Tensor | None:
        """(C, D): the last linear layer, mapping features() to logits; None if there is none."""
        if isinstance(self.model, ZeroShotCLIP):
            return ZERO_SHOT_LOGIT_SCALE * self.model.class_weights.T
        get_classifier = getattr(self.model, "get_classifier", None)
        head = get_classifier() if callable(get_classifier) else None
        return head.weight if isinstance(head, nn.Linear) else None


    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, num_classes={self.num_classes}, input_size={self.input_size}"


class ZeroShotCLIP(nn.Module):
    """open_clip image tower + fixed text-derived class weights, with timm's interface."""

    class_weights: torch.Tensor  # (D, C) columns L2-normalized

    def __init__(self, clip: nn.Module, class_weights: torch.Tensor) -> None:
        super().__init__()
        self.clip = clip
        self.register_buffer("class_weights", class_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) normalized -> (N, D) L2-normalized image embedding."""
        return self.clip.encode_image(x, normalize=True)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return features
        return ZERO_SHOT_LOGIT_SCALE * features @ self.class_weights.to(features.dtype)  # (N, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------- specs


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``KIND:NAME[,key=value...]`` -> (kind, name, options). Raises DiginError when malformed."""
    kind, sep, rest = spec.partition(":")
    parts = rest.split(",")
    name = parts[0].strip()
    if not sep or not kind.strip() or not name:
        raise DiginError(f"malformed classifier spec '{spec}'; accepted forms: {_accepted_forms()}")
    options: dict[str, str] = {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise DiginError(
                f"malformed option '{part}' in classifier spec '{spec}': options are key=value, "
                f"separated by commas; accepted forms: {_accepted_forms()}"
            )
        if key in options:
            raise DiginError(f"option '{key}' given twice in classifier spec '{spec}'")
        options[key] = value
    return kind.strip(), name, options


def _accepted_forms() -> str:
    builtin = [f"{prefix}:NAME" for prefix in sorted(BUILTIN_CLASSIFIER_LOADERS)]
    return " | ".join(list(ACCEPTED_FORMS) + builtin)


def _check_options(spec: str, kind: str, options: dict[str, str]) -> None:
    unknown = sorted(set(options) - _OPTION_KEYS[kind])
    if unknown:
        allowed = ", ".join(sorted(_OPTION_KEYS[kind]))
        raise DiginError(f"unknown option {', '.join(map(repr, unknown))} in '{spec}'; {kind}: accepts {allowed}")


def _existing_file(path: str, what: str, spec: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise DiginError(f"{what} file not found: {resolved} (from '{spec}'); check the path")
    return resolved


def _read_class_names(path: str, spec: str) -> list[str]:
    file = _existing_file(path, "classes", spec)
    names = [" ".join(line.split()) for line in file.read_text(encoding="utf-8").splitlines()]
    names = [name for name in names if name]  # blank lines (e.g. a trailing one) are not classes
    if not names:
        raise DiginError(f"classes file {file} is empty; write one class name per line")
    return names


def _check_class_count(names: list[str], num_outputs: int, classes_path: str, spec: str) -> None:
    if len(names) != num_outputs:
        raise DiginError(
            f"classes file {Path(classes_path).expanduser()} has {len(names)} names but {spec} has "
            f"{num_outputs} outputs; write exactly one class name per output, in output order"
        )


def _parse_floats(value: str, key: str, spec: str) -> tuple[float, float, float]:
    try:
        numbers = tuple(float(v) for v in value.split(";"))
    except ValueError:
        numbers = ()
    if len(numbers) != 3:
        raise DiginError(f"{key}='{value}' in '{spec}' must be three numbers r;g;b, e.g. {key}=0.5;0.5;0.5")
    return numbers  # type: ignore[return-value]


def _parse_size(value: str, spec: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", value)
    if not match or int(match[1]) == 0 or (match[2] and int(match[2]) == 0):
        raise DiginError(f"size='{value}' in '{spec}' must be a positive integer or HxW, e.g. size=224")
    return int(match[1]), int(match[2] or match[1])


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


# --------------------------------------------------------------------------- class names


def _imagenet_names() -> tuple[list[str], list[tuple[str, ...]]]:
    """Clean display names (open_clip's) + WordNet synonyms (timm's) for the 1000 ImageNet classes."""
    from open_clip import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    descriptions = ImageNetInfo().label_descriptions()  # ["tabby, tabby cat", ...]
    synonyms = [tuple(s.strip() for s in d.split(",") if s.strip()) for d in descriptions]
    return list(IMAGENET_CLASSNAMES), synonyms


def _timm_class_names(model: nn.Module) -> tuple[list[str], list[tuple[str, ...]] | None]:
    from timm.data import ImageNetInfo, infer_imagenet_subset

    num_classes = model.num_classes
    if num_classes == 1000:
        return _imagenet_names()
    subset = infer_imagenet_subset(model)
    if subset is not None:  # ImageNet-12k / 22k heads: the first WordNet lemma is the display name
        descriptions = ImageNetInfo(subset).label_descriptions()
        synonyms = [tuple(s.strip() for s in d.split(",") if s.strip()) for d in descriptions]
        return [s[0] for s in synonyms], synonyms
    cfg = getattr(model, "pretrained_cfg", None) or {}
    labels = cfg.get("label_descriptions") or cfg.get("label_names")
    if isinstance(labels, dict):  # label_descriptions: {label_name: description}
        labels = list(labels.values())
    if labels and len(labels) == num_classes:
        return [str(label) for label in labels], None
    return [f"class {i}" for i in range(num_classes)], None


# --------------------------------------------------------------------------- timm


def _checkpoint_head_rows(path: Path, classifier_key: str) -> int | None:
    """Rows of the checkpoint's classifier weight, read without loading every tensor."""
    key = classifier_key + ".weight"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                if name.removeprefix("module.").removeprefix("_orig_mod.") == key:
                    return int(handle.get_slice(name).get_shape()[0])
        return None
    try:  # mmap: only the one tensor we look at is read from disk
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        return None
    # Same nesting rules as timm's load_state_dict.
    for nested in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(checkpoint.get(nested), dict):
            checkpoint = checkpoint[nested]
            break
    for name, tensor in checkpoint.items():
        if name.removeprefix("module.").removeprefix("_orig_mod.") == key and hasattr(tensor, "shape"):
            return int(tensor.shape[0])
    return None


def _infer_num_classes(name: str, checkpoint: Path) -> int | None:
    """The checkpoint's head size, so a fine-tuned head is loaded instead of silently dropped."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)  # None for hf-hub names
    except RuntimeError:  # an invalid tag: create_model reports it with a better message
        return None
    classifier = getattr(cfg, "classifier", None)
    if not classifier:
        return None
    if isinstance(classifier, (tuple, list)):  # distilled models: (head, head_dist) share a size
        classifier = classifier[0]
    try:
        rows = _checkpoint_head_rows(checkpoint, classifier)
    except Exception as error:  # noqa: BLE001 - any unreadable file is a user problem
        raise DiginError(
            f"could not read checkpoint {checkpoint} ({type(error).__name__}: {_first_line(error)}); "
            "pass a .safetensors or .pth state dict"
        ) from error
    if rows is not None and cfg.label_offset and rows - cfg.label_offset == cfg.num_classes:
        rows = cfg.num_classes  # e.g. 1001-way TF heads: timm drops the background row itself
    return rows


def _load_timm(spec: str, name: str, options: dict[str, str], device: torch.device) -> Classifier:
    import timm
    from timm.models import split_model_name_tag

    arch = split_model_name_tag(name)[0]
    if ":" not in name and not timm.is_model(arch):  # "hf-hub:..." names are resolved by timm
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f"close matches: {', '.join(close)}" if close else "see `timm.list_models()` for the names"
        raise DiginError(f"unknown timm model '{arch}' in '{spec}'; {hint}")

    kwargs: dict = {}
    checkpoint = None
    num_classes = None
    if "num_classes" in options:
        if not options["num_classes"].isdigit() or int(options["num_classes"]) < 1:
            raise DiginError(f"num_classes='{options['num_classes']}' in '{spec}' must be a positive integer")
        num_classes = int(options["num_classes"])
    if "checkpoint" in options:
        checkpoint = _existing_file(options["checkpoint"], "checkpoint", spec)
        if num_classes is None:
            num_classes = _infer_num_classes(name, checkpoint)
        overlay: dict = {"file": str(checkpoint)}
        if num_classes is not None:
            # Both are needed: timm builds the head from create_model's num_classes but
            # silently drops (and randomly re-initializes) a checkpoint head whose size
            # differs from pretrained_cfg's num_classes.
            overlay["num_classes"] = num_classes
            kwargs["num_classes"] = num_classes
        kwargs["pretrained_cfg_overlay"] = overlay
    elif num_classes is not None:
        raise DiginError(
            f"num_classes= in '{spec}' only applies together with checkpoint=PATH; timm would give "
            "the pretrained model a random head of that size"
        )

    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except OSError as error:  # hub cache miss offline, HTTP errors, URL errors
        raise DiginError(
            f"pretrained weights for timm model '{name}' are not available ({_first_line(error)}); "
            "download them once with network access (run the same command online), "
            "or pass local weights with checkpoint=PATH"
        ) from error
    except RuntimeError as error:
        message = _first_line(error)
        if message.startswith("Unknown model"):
            raise DiginError(f"unknown timm model '{name}' in '{spec}'; see `timm.list_models()`") from error
        if "Invalid pretrained tag" in message:
            tags = timm.list_pretrained(f"{arch}.*")
            raise DiginError(
                f"unknown pretrained tag in '{name}' for timm model {arch}; known: {', '.join(tags[:8]) or 'none'}"
            ) from error
        if "No pretrained weights exist" in message:
            raise DiginError(
                f"timm has no pretrained weights for '{name}'; pass local weights with checkpoint=PATH"
            ) from error
        if "loading state_dict" in message or "size mismatch" in str(error):
            detail = " ".join(str(error).split())[:300]
            raise DiginError(
                f"checkpoint {checkpoint} does not fit timm model '{name}' ({detail}); name the "
                "architecture the checkpoint was trained with (and num_classes=N if its head size differs)"
            ) from error
        raise

    if "classes" in options:
        class_names, synonyms = _read_class_names(options["classes"], spec), None
        _check_class_count(class_names, model.num_classes, options["classes"], spec)
    else:
        class_names, synonyms = _timm_class_names(model)

    data_config = timm.data.resolve_model_data_config(model)  # input_size is (C, H, W)
    # A checkpoint trained at another resolution or normalization says so in the spec.
    size = _parse_size(options["size"], spec) if "size" in options else tuple(data_config["input_size"][-2:])
    mean = _parse_floats(options["mean"], "mean", spec) if "mean" in options else data_config["mean"]
    std = _parse_floats(options["std"], "std", spec) if "std" in options else data_config["std"]
    return Classifier(
        model,
        spec=spec,
        class_names=class_names,
        class_synonyms=synonyms,
        input_size=size,
        mean=mean,
        std=std,
    ).to(device)


# --------------------------------------------------------------------------- open_clip


def _file_fingerprint(path: Path) -> str:
    # Size + mtime instead of a content hash: hashing a 600 MB checkpoint on every load
    # would cost more than it saves; a re-saved file gets a new mtime anyway.
    stat = path.stat()
    return f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def zero_shot_cache_path(arch: str, weights_id: str, class_names: Sequence[str], templates: Sequence) -> Path:
    """Where the class-weight matrix for this (model, weights, classes, templates) is cached."""
    import open_clip

    template_texts = [t if isinstance(t, str) else t("{}") for t in templates]
    key = "\n".join(
        [_ZERO_SHOT_CACHE_VERSION, open_clip.__version__, arch, weights_id, "\x1f".join(class_names)]
        + ["\x1f".join(template_texts)]
    )
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
    return cache_dir() / "zeroshot" / f"{arch}-{digest}.pt"


def _zero_shot_weights(
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


def _load_openclip(spec: str, name: str, options: dict[str, str], device: torch.device) -> Classifier:
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
    elif Path(pretrained).expanduser().is_file():
        pretrained = str(Path(pretrained).expanduser())
        weights_id = _file_fingerprint(Path(pretrained))
    else:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise DiginError(
            f"'{pretrained}' in '{spec}' is neither a pretrained tag of {arch} nor an existing file; "
            f"tags: {', '.join(tags) or 'none'}; or give a checkpoint path"
        )

    overrides = {}
    if "mean" in options:
        overrides["image_mean"] = _parse_floats(options["mean"], "mean", spec)
    if "std" in options:
        overrides["image_std"] = _parse_floats(options["std"], "std", spec)
    try:
        clip, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device, **overrides)
    except RuntimeError as error:
        if "Failed to download" in str(error):  # open_clip wraps hub/URL errors this way
            raise DiginError(
                f"pretrained weights '{pretrained}' for open_clip {arch} are not available "
                f"({_first_line(error)}); download them once with network access, "
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
        class_names, synonyms = _read_class_names(options["classes"], spec), None
    else:
        class_names, synonyms = _imagenet_names()
    weights = _zero_shot_weights(clip, arch, weights_id, class_names, device)  # (D, C)

    preprocess = open_clip.get_model_preprocess_cfg(clip)
    return Classifier(
        ZeroShotCLIP(clip, weights),
        spec=spec,
        class_names=class_names,
        class_synonyms=synonyms,
        input_size=_pair(preprocess["size"]),
        mean=preprocess["mean"],
        std=preprocess["std"],
    ).to(device)


# --------------------------------------------------------------------------- torchscript


def _load_torchscript(spec: str, name: str, options: dict[str, str], device: torch.device) -> Classifier:
    if "classes" not in options:
        raise DiginError(
            f"'{spec}' needs a classes file: torchscript:PATH,classes=FILE (one class name per line, "
            "in output order)"
        )
    path = _existing_file(name, "TorchScript model", spec)
    class_names = _read_class_names(options["classes"], spec)
    size = _parse_size(options["size"], spec) if "size" in options else (224, 224)
    mean = _parse_floats(options["mean"], "mean", spec) if "mean" in options else IMAGENET_MEAN
    std = _parse_floats(options["std"], "std", spec) if "std" in options else IMAGENET_STD
    try:
        with warnings.catch_warnings():
            # torch.jit.load is deprecated in favour of torch.export, but it is the
            # format users have; the warning would only be noise on every run.
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location=device)
    except RuntimeError as error:
        raise DiginError(
            f"could not load {path} as a TorchScript model ({_first_line(error)}); "
            "save one with torch.jit.script(model).save(PATH)"
        ) from error

    # The number of outputs is only known by running the model once.
    with torch.no_grad():
        probe = model(torch.zeros(1, 3, *size, device=device))  # (1, C)
    if not isinstance(probe, torch.Tensor) or probe.ndim != 2:
        shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
        raise DiginError(f"TorchScript model {path} must return logits of shape (N, C), got {shape}")
    _check_class_count(class_names, probe.shape[1], options["classes"], spec)
    return Classifier(model, spec=spec, class_names=class_names, input_size=size, mean=mean, std=std).to(device)


# --------------------------------------------------------------------------- public API

_LOADERS: dict[str, Callable[[str, str, dict[str, str], torch.device], Classifier]] = {
    "timm": _load_timm,
    "openclip": _load_openclip,
    "torchscript": _load_torchscript,
}


def load_classifier(spec: str, device: torch.device | str = "cpu") -> Classifier:
    """Load the frozen classifier named by ``spec`` onto ``device`` (see the module docstring)."""
    device = torch.device(device)
    kind = spec.partition(":")[0].strip()
    if kind in BUILTIN_CLASSIFIER_LOADERS and kind not in _LOADERS:
        classifier = BUILTIN_CLASSIFIER_LOADERS[kind](spec, device)
    else:
        kind, name, options = parse_spec(spec)
        if kind not in _LOADERS:
            raise DiginError(f"unknown classifier kind '{kind}' in '{spec}'; accepted forms: {_accepted_forms()}")
        _check_options(spec, kind, options)
        classifier = _LOADERS[kind](spec, name, options, device)
    classifier.requires_grad_(False)
    classifier.eval()
    return classifier


def _normalize_name(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def resolve_class(classifier: Classifier, name_or_index: str) -> int:
    """A class index from an index string or a (case/whitespace-insensitive) class name or synonym."""
    text = name_or_index.strip()
    last = classifier.num_classes - 1
    if re.fullmatch(r"[+-]?\d+", text):
        index = int(text)
        if not 0 <= index <= last:
            raise DiginError(f"class index {index} is out of range for {classifier.spec}; use 0-{last}")
        return index

    wanted = _normalize_name(text)
    synonyms = classifier.class_synonyms or [()] * classifier.num_classes
    # Display names first, synonyms second: a synonym never shadows another class's own
    # name (ImageNet's "cardigan" is the sweater, although it is also a corgi synonym).
    by_name = [i for i, name in enumerate(classifier.class_names) if _normalize_name(name) == wanted]
    by_synonym = [i for i, names in enumerate(synonyms) if wanted in {_normalize_name(s) for s in names}]
    for hits in (by_name, by_synonym):
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            listed = ", ".join(f"{i} ('{classifier.class_names[i]}')" for i in hits)
            raise DiginError(
                f"class name '{text}' is ambiguous for {classifier.spec}: it names classes {listed}; "
                "give the index instead"
            )

    candidates: dict[str, str] = {}  # normalized -> as displayed
    for i in range(classifier.num_classes):
        for name in (classifier.class_names[i], *synonyms[i]):
            candidates.setdefault(_normalize_name(name), name)
    close = difflib.get_close_matches(wanted, list(candidates), n=5)
    hint = "close matches: " + ", ".join(f"'{candidates[c]}'" for c in close) if close else "no close matches"
    raise DiginError(
        f"unknown class '{text}' for {classifier.spec}; {hint} (give a class name or an index 0-{last})"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
