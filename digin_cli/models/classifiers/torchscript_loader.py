"""Your own TorchScript classifier and its class names."""

from __future__ import annotations

import warnings

import torch

from digin_cli.errors import DiginError
from digin_cli.models.classifiers.base import Classifier
from digin_cli.models.classifiers.specs import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_class_count,
    existing_file,
    first_line,
    parse_floats,
    parse_size,
    read_class_names,
)


def load_torchscript(spec: str, name: str, options: dict[str, str], device: torch.device) -> Classifier:
    if "classes" not in options:
        raise DiginError(
            f"'{spec}' needs a classes file: torchscript:PATH,classes=FILE (one class name per line, "
            "in output order)"
        )
    path = existing_file(name, "TorchScript model", spec)
    class_names = read_class_names(options["classes"], spec)
    size = parse_size(options["size"], spec) if "size" in options else (224, 224)
    mean = parse_floats(options["mean"], "mean", spec) if "mean" in options else IMAGENET_MEAN
    std = parse_floats(options["std"], "std", spec) if "std" in options else IMAGENET_STD
    try:
        with warnings.catch_warnings():
            # torch.jit.load is deprecated in favour of torch.export, but it is the
            # format users have; the warning would only be noise on every run.
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location=device)
    except RuntimeError as error:
        raise DiginError(
            f"could not load {path} as a TorchScript model ({first_line(error)}); "
            "save one with torch.jit.script(model).save(PATH)"
        ) from error

    # The number of outputs is only known by running the model once.
    with torch.no_grad():
        probe = model(torch.zeros(1, 3, *size, device=device))  # (1, C)
    if not isinstance(probe, torch.Tensor) or probe.ndim != 2:
        shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
        raise DiginError(f"TorchScript model {path} must return logits of shape (N, C), got {shape}")
    check_class_count(class_names, probe.shape[1], options["classes"], spec)
    return Classifier(model, spec=spec, class_names=class_names, input_size=size, mean=mean, std=std).to(device)
