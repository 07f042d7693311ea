"""Objectives: values handed to the engine, never branches inside it.

An objective maps what the sampler produced for a batch of B items to one loss
per item (to be minimized) plus named per-item scalars to report. The engine
decides which images the objective sees: while optimizing, several augmented
classifier views per item (random cutouts + noise); for reporting, one plain
view per item.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from digin_cli.models.classifiers import Classifier


@dataclass
class ObjectiveInput:
    images: torch.Tensor  # (B, 3, H, W) decoded image in [0, 1]
    latents: torch.Tensor  # (B, C, h, w) the VAE latent that was decoded
    views: torch.Tensor  # (B, V, 3, S, S) what classifiers look at, in [0, 1] (+ noise)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # (B,) per-item loss, minimized
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,)


class Objective(Protocol):
    def __call__(self, inputs: ObjectiveInput) -> ObjectiveOutput: ...


def class_probability(classifier: Classifier, views: torch.Tensor, class_index: int) -> torch.Tensor:
    """Softmax confidence in one class, averaged over each item's views.

    views: (B, V, 3, S, S) -> (B,)
    """
    batch, num_views = views.shape[:2]
    logits = classifier(views.flatten(0, 1))  # (B*V, C)
    probs = logits.float().softmax(dim=-1)[:, class_index]  # (B*V,)
    return probs.view(batch, num_views).mean(dim=1)


@dataclass
class Disagreement:
    """Make f see class y while g does not: minimize -(p_f(y) - p_g(y)) (paper eq. 3)."""

    classifier_f: Classifier
    classifier_g: Classifier
    class_index: int

    def __call__(self, inputs: ObjectiveInput) -> ObjectiveOutput:
        p_f = class_probability(self.classifier_f, inputs.views, self.class_index)  # (B,)
        p_g = class_probability(self.classifier_g, inputs.views, self.class_index)  # (B,)
        return ObjectiveOutput(loss=-(p_f - p_g), metrics={"p_f": p_f, "p_g": p_g})
