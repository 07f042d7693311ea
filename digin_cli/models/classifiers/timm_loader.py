"""timm classifiers: pretrained through timm's own loader, or local weights through its pretrained_cfg overlay."""

from __future__ import annotations

import difflib
from pathlib import Path

import torch

from digin_cli.errors import DiginError
from digin_cli.models.classifiers.base import Classifier
from digin_cli.models.classifiers.class_names import timm_class_names
from digin_cli.models.classifiers.specs import (
    check_class_count,
    existing_file,
    first_line,
    parse_floats,
    parse_size,
    read_class_names,
)
from digin_cli.models.hub import cached_file, require_hub


def checkpoint_head_rows(path: Path, classifier_key: str) -> int | None:
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


def infer_num_classes(name: str, checkpoint: Path) -> int | None:
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
        rows = checkpoint_head_rows(checkpoint, classifier)
    except Exception as error:  # noqa: BLE001 - any unreadable file is a user problem
        raise DiginError(
            f"could not read checkpoint {checkpoint} ({type(error).__name__}: {first_line(error)}); "
            "pass a .safetensors or .pth state dict"
        ) from error
    if rows is not None and cfg.label_offset and rows - cfg.label_offset == cfg.num_classes:
        rows = cfg.num_classes  # e.g. 1001-way TF heads: timm drops the background row itself
    return rows


def load_timm(spec: str, name: str, options: dict[str, str], device: torch.device) -> Classifier:
    """A timm classifier: 1. check the name, 2. where its weights come from, 3. create it
    through timm, 4. its class names and input statistics."""
    import timm

    arch = _check_name(spec, name)
    kwargs, checkpoint = _weights_kwargs(spec, name, options)
    if checkpoint is None:
        _check_hub_weights(name)
    model = _create(spec, name, arch, kwargs, checkpoint)

    if "classes" in options:
        class_names, synonyms = read_class_names(options["classes"], spec), None
        check_class_count(class_names, model.num_classes, options["classes"], spec)
    else:
        class_names, synonyms = timm_class_names(model)
    data_config = timm.data.resolve_model_data_config(model)  # input_size is (C, H, W)
    # A checkpoint trained at another resolution or normalization says so in the spec.
    size = parse_size(options["size"], spec) if "size" in options else tuple(data_config["input_size"][-2:])
    mean = parse_floats(options["mean"], "mean", spec) if "mean" in options else data_config["mean"]
    std = parse_floats(options["std"], "std", spec) if "std" in options else data_config["std"]
    return Classifier(
        model,
        spec=spec,
        class_names=class_names,
        class_synonyms=synonyms,
        input_size=size,
        mean=mean,
        std=std,
    ).to(device)


def _check_name(spec: str, name: str) -> str:
    """The architecture of a timm model name (tag dropped); unknown names fail with close matches."""
    import timm
    from timm.models import split_model_name_tag

    arch = split_model_name_tag(name)[0]
    if ":" not in name and not timm.is_model(arch):  # "hf-hub:..." names are resolved by timm
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f"close matches: {', '.join(close)}" if close else "see `timm.list_models()` for the names"
        raise DiginError(f"unknown timm model '{arch}' in '{spec}'; {hint}")
    return arch


def _weights_kwargs(spec: str, name: str, options: dict[str, str]) -> tuple[dict, Path | None]:
    """create_model's keyword arguments for the spec's weights, and the local checkpoint if any."""
    kwargs: dict = {}
    checkpoint = None
    num_classes = None
    if "num_classes" in options:
        if not options["num_classes"].isdigit() or int(options["num_classes"]) < 1:
            raise DiginError(f"num_classes='{options['num_classes']}' in '{spec}' must be a positive integer")
        num_classes = int(options["num_classes"])
    if "checkpoint" in options:
        checkpoint = existing_file(options["checkpoint"], "checkpoint", spec)
        if num_classes is None:
            num_classes = infer_num_classes(name, checkpoint)
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
    if "act_layer" in options:
        # A checkpoint trained with another activation than the architecture's default
        # loads without complaint into the default one (activations have no weights), so
        # the spec must say it; timm's create_model takes it for most architectures.
        from timm.layers import get_act_layer

        try:
            get_act_layer(options["act_layer"])
        except KeyError:
            raise DiginError(
                f"unknown act_layer '{options['act_layer']}' in '{spec}'; give a timm activation name "
                "such as relu, leaky_relu, gelu or silu"
            ) from None
        kwargs["act_layer"] = options["act_layer"]
    return kwargs, checkpoint


def _hub_weights(name: str) -> tuple[str | None, tuple[str, ...]]:
    """The hub repo timm fetches `name`'s pretrained weights from (None: not from the hub, or
    a name timm reports itself), and the files that are those weights."""
    from timm.models import get_pretrained_cfg

    files = ("model.safetensors", "pytorch_model.bin")  # timm's own choice, in its order
    if name.startswith("hf-hub:"):
        return name.removeprefix("hf-hub:"), files
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # an invalid tag: create_model says so better
        return None, files
    if cfg is None or not cfg.hf_hub_id:
        return None, files
    return cfg.hf_hub_id, (cfg.hf_hub_filename,) if cfg.hf_hub_filename else files


def _check_hub_weights(name: str) -> None:
    """Weights that are neither in the local cache nor fetchable fail at once (models/hub.py)."""
    repo, files = _hub_weights(name)
    if repo is None:
        return
    repo_id, _, revision = repo.partition("@")  # timm's "id@revision"
    if not any(cached_file(repo_id, file, revision or None) for file in files):
        require_hub(repo_id, f"the pretrained weights of timm model '{name}'",
                    "or pass local weights with checkpoint=PATH", revision or None)  # fmt: skip


def _create(spec: str, name: str, arch: str, kwargs: dict, checkpoint: Path | None):
    """timm.create_model with pretrained weights; timm's errors become one-line DiginErrors."""
    import timm

    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except OSError as error:  # hub cache miss offline, HTTP errors, URL errors
        raise DiginError(
            f"pretrained weights for timm model '{name}' are not available ({first_line(error)}); "
            "download them once with network access (run the same command online), "
            "or pass local weights with checkpoint=PATH"
        ) from error
    except RuntimeError as error:
        message = first_line(error)
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
