"""What a neuron task reads from a classifier: one neuron of a feature map, or a feature
direction loaded from a file (``--direction``); shared by `neuron` and `neuron-cf`."""

from __future__ import annotations

from pathlib import Path

import torch

from digin_cli.errors import DiginError
from digin_cli.io import load_vector_file
from digin_cli.models.classifiers import Classifier, resolve_class
from digin_cli.objectives import FeatureMap
from digin_cli.tasks.runtime import slug


def class_head(classifier: Classifier, class_name: str, needed_for: str) -> tuple[int, str, torch.Tensor]:
    """The class (index, name) and its row of the last linear layer, w_k (D,); one line when
    the classifier has no linear last layer (`needed_for` says what wanted it)."""
    head = classifier.head_weight()
    if head is None:
        raise DiginError(f"{classifier.spec} has no linear last layer; {needed_for} needs one (timm and openclip models have it)")
    class_index = resolve_class(classifier, class_name)
    return class_index, classifier.class_names[class_index], head[class_index].detach().float()


def check_neuron_or_direction(neuron: int | None, direction_file: Path | None) -> None:
    if (neuron is None) == (direction_file is None):
        raise DiginError("give exactly one of --neuron N and --direction FILE")


def target_label(neuron: int | None, direction_file: Path | None) -> str:
    """How file names call the target: n<index> for a neuron, the direction file's slug."""
    return f"n{neuron}" if direction_file is None else slug(direction_file.stem)


def load_direction(path: Path, width: int) -> torch.Tensor:
    """A feature-space direction from .npy or .pt: (D,) float32."""
    if not path.is_file():
        raise DiginError(f"direction file {path} does not exist; give a .npy or .pt vector of length {width}")
    try:
        vector = load_vector_file(path)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user problem
        raise DiginError(f"could not read direction file {path} ({type(error).__name__}); save a 1-D .npy or .pt") from None
    if not isinstance(vector, torch.Tensor) or vector.squeeze().dim() != 1 or vector.numel() != width:
        shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
        raise DiginError(f"direction in {path} has shape {shape}; it must be a vector of length {width}")
    return vector.squeeze().float()


def neuron_target(
    feature_map: FeatureMap, width: int, neuron: int | None, direction_file: Path | None, device
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
