"""Objectives: values handed to the engine, never branches inside it.

An objective maps what the sampler produced for a batch of B items to one loss
per item (to be minimized) plus named per-item scalars to report. The engine
decides which images the objective sees: while optimizing, several augmented
classifier views per item (random cutouts + noise); for reporting, one plain
view per item.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

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
    # (B,) how far the objective's claim about the item holds on these views: >= m where
    # it holds with margin m (OptimConfig.claim_margin), negative where it does not. None:
    # the objective makes no claim (a neuron is maximized, nothing is asserted). Kept out
    # of `metrics` so the records' history stays what it was.
    claim: torch.Tensor | None = None


class Objective(Protocol):
    def __call__(self, inputs: ObjectiveInput) -> ObjectiveOutput: ...


def per_item(index: int | list[int] | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """A class index for every item of a batch: an int (the same class for all), a list or a
    tensor of B indices -> (B,) long."""
    if isinstance(index, torch.Tensor) and index.device.type != "cpu":
        indices = index.long()
    else:
        values = index.tolist() if isinstance(index, torch.Tensor) else index
        indices = _indices_on(tuple(values) if isinstance(values, (list, tuple)) else int(values), torch.device(device))
    return indices.expand(batch) if indices.dim() == 0 else indices


@functools.lru_cache(maxsize=256)
def _indices_on(values: tuple[int, ...] | int, device: torch.device) -> torch.Tensor:
    """Class indices on `device`, made once: a host-to-device copy at every objective call
    (every view pass of every loss step) would stall a GPU. Shared: never changed in place."""
    return torch.tensor(values, dtype=torch.long, device=device)


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
    """Make f see class y while g does not: minimize -(p_f(y) - p_g(y)) (paper eq. 3).

    The claim (the benchmark's rule): p_f >= claim_p_f and p_g <= claim_p_g; its margin is
    the smaller of the two distances to those thresholds."""

    classifier_f: Classifier
    classifier_g: Classifier
    class_index: int
    claim_p_f: float = 0.5
    claim_p_g: float = 0.2

    def __call__(self, inputs: ObjectiveInput) -> ObjectiveOutput:
        p_f = class_probability(self.classifier_f, inputs.views, self.class_index)  # (B,)
        p_g = class_probability(self.classifier_g, inputs.views, self.class_index)  # (B,)
        claim = torch.minimum(p_f - self.claim_p_f, self.claim_p_g - p_g)  # (B,)
        return ObjectiveOutput(loss=-(p_f - p_g), metrics={"p_f": p_f, "p_g": p_g}, claim=claim)


@dataclass
class ClassLoss:
    """-log p(class) of one classifier, averaged over each item's views: the reference of a
    cone projection (engine/guards.py, Cone), whose gradient says where a second (robust)
    classifier sees more of the class.

    class_index: one class for the whole batch, or one per item (B,)."""

    classifier: Classifier
    class_index: int | list[int] | torch.Tensor

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        """views (B, V, 3, S, S) -> (B,)."""
        batch, num_views = views.shape[:2]
        log_probs = self.classifier(views.flatten(0, 1)).float().log_softmax(dim=-1).view(batch, num_views, -1)  # (B, V, C)
        index = per_item(self.class_index, batch, log_probs.device)  # (B,)
        return -log_probs.gather(2, index.view(batch, 1, 1).expand(batch, num_views, 1))[..., 0].mean(dim=1)


class FeatureMap:
    """phi: the activations a neuron objective reads, plus the classifier's logits.

    Default: the input of the last linear layer (`Classifier.features`). With `layer`,
    the output of that named module, captured by a forward hook during the ordinary
    forward pass; conv maps (N, C, H, W) and token maps (N, T, C) are averaged over
    space / tokens, so each channel is one neuron.
    """

    def __init__(self, classifier: Classifier, layer: str | None = None) -> None:
        from digin_cli.errors import DiginError

        self.classifier = classifier
        self.layer = layer
        self._module = None
        if layer is not None:
            names = dict(classifier.model.named_modules())
            if layer not in names or layer == "":
                import difflib

                close = difflib.get_close_matches(layer, [n for n in names if n], n=5)
                hint = f"close matches: {', '.join(close)}" if close else "list them with model.named_modules()"
                raise DiginError(f"{classifier.spec} has no layer '{layer}'; {hint}")
            self._module = names[layer]

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) in [0, 1] -> (activations (N, D), logits (N, C))."""
        if self._module is None:
            return self.classifier.features_and_logits(images)
        captured: list[torch.Tensor] = []
        handle = self._module.register_forward_hook(lambda _m, _i, output: captured.append(output))
        try:
            logits = self.classifier(images)
        finally:
            handle.remove()
        output = captured[-1]
        if isinstance(output, (tuple, list)):
            output = output[0]
        if output.dim() == 4:  # (N, C, H, W): channel-wise spatial mean
            output = output.mean(dim=(2, 3))
        elif output.dim() == 3:  # (N, T, C): mean over tokens
            output = output.mean(dim=1)
        return output.float(), logits

    @torch.no_grad()
    def width(self) -> int:
        size = self.classifier.input_size
        probe = torch.full((1, 3, *size), 0.5, device=self.classifier.mean.device)
        return self(probe)[0].shape[1]


class _RedirectedReLU(torch.autograd.Function):
    """ReLU in the forward pass. In the backward pass, an item that would get no gradient at
    all through this layer (every unit that the loss reaches is off) gets the part of the
    gradient that raises its negative inputs instead: the "redirected ReLU" of Olah et al.,
    Feature Visualization (Distill, 2017). Without it, maximizing a neuron that is exactly
    0 on the starting image (a spatial mean of ReLU outputs, all negative) never moves."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors  # (N, ...)
        plain = grad * (x > 0)
        # grad is d(loss)/d(output): a positive value would push an off unit further down.
        redirected = torch.where((x <= 0) & (grad > 0), torch.zeros_like(grad), grad)
        dead = plain.flatten(1).abs().amax(dim=1) == 0  # (N,) items with no plain gradient here
        return torch.where(dead.view(-1, *[1] * (x.dim() - 1)), redirected, plain)


@contextmanager
def redirected_relus(model: nn.Module) -> Iterator[None]:
    """Every nn.ReLU inside `model` uses _RedirectedReLU while the context is open. Forward
    values are unchanged, so reported activations stay exact."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    for relu in relus:
        relu.forward = _RedirectedReLU.apply  # instance attribute shadows nn.ReLU.forward
    try:
        yield
    finally:
        for relu in relus:
            del relu.forward


@dataclass
class NeuronObjective:
    """Maximize (or minimize) one neuron, or the projection on a feature direction.

    loss = -sign * a, with a = phi(x)_n or <phi(x), direction>; sign = +1 maximizes.
    Reports the activation, the classifier's top class and its confidence. While
    maximizing with gradients on, the classifier's ReLUs pass redirected gradients (see
    _RedirectedReLU), so a neuron that starts at exactly 0 can still be raised.
    """

    feature_map: FeatureMap
    neuron: int | None = None
    direction: torch.Tensor | None = None  # (D,) in feature space
    maximize: bool = True
    redirect_relu: bool = True

    def activation(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V, 3, S, S) -> (activation (B,), probabilities (B, C)), both averaged over views."""
        batch, num_views = views.shape[:2]
        redirect = self.redirect_relu and self.maximize and torch.is_grad_enabled()
        with redirected_relus(self.feature_map.classifier) if redirect else nullcontext():
            features, logits = self.feature_map(views.flatten(0, 1))  # (B*V, D), (B*V, C)
        if self.direction is not None:
            value = features @ self.direction.to(features)  # (B*V,)
        else:
            value = features[:, self.neuron]
        probs = logits.float().softmax(dim=-1)
        return value.view(batch, num_views).mean(1), probs.view(batch, num_views, -1).mean(1)

    def __call__(self, inputs: ObjectiveInput) -> ObjectiveOutput:
        value, probs = self.activation(inputs.views)
        top_p, top_class = probs.max(dim=-1)
        sign = 1.0 if self.maximize else -1.0
        return ObjectiveOutput(
            loss=-sign * value,
            metrics={"activation": value, "top_class": top_class.float(), "top_p": top_p},
        )


@dataclass
class RegionDistance:
    """How far a sample strays from a real image in a region: the distance term of UVCE and
    neuron counterfactuals (paper eq. 5).

    d = w_latent * mean(R_lat * (z0 - E(x))^2) + w_pixel * mean(R_px * (D(z0) - x)^2), where
    R is the region that must stay: the background (1 - mask) for a visual counterfactual,
    the object (mask) for a neuron counterfactual.
    """
    # One original for the whole batch (leading size 1) or one per item (leading size B).
    image: torch.Tensor  # (1 or B, 3, H, W) the original, in [0, 1]
    image_latents: torch.Tensor  # (1 or B, C, h, w) E(x), scaled like the sampler's latents
    keep_pixels: torch.Tensor  # (1 or B, 1, H, W) in [0, 1]: 1 where the image must stay
    keep_latents: torch.Tensor  # (1 or B, 1, h, w) the same on the latent grid
    weight_latent: float = 25.0  # reference w_VAE
    weight_pixel: float = 250.0  # reference w_PX

    def __call__(self, images: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W), latents (B, C, h, w) -> (latent term, pixel term), each (B,)."""
        latent = (self.keep_latents * (latents - self.image_latents).square()).mean(dim=(1, 2, 3))
        pixel = (self.keep_pixels * (images - self.image).square()).mean(dim=(1, 2, 3))
        return self.weight_latent * latent, self.weight_pixel * pixel


@dataclass
class Counterfactual:
    """Universal visual counterfactual: -log p(target) + the background distance (paper sec. 5).

    target_index / source_index: one class for the whole batch, or one per item (B,).
    The claim: the target is the classifier's top class; its margin is p(target) minus the
    largest other class's probability (of the view-averaged probabilities)."""

    classifier: Classifier
    target_index: int | list[int] | torch.Tensor
    source_index: int | list[int] | torch.Tensor
    distance: RegionDistance

    def __call__(self, inputs: ObjectiveInput) -> ObjectiveOutput:
        batch, num_views = inputs.views.shape[:2]
        logits = self.classifier(inputs.views.flatten(0, 1)).float()  # (B*V, C)
        log_probs = logits.log_softmax(dim=-1).view(batch, num_views, -1)  # (B, V, C)
        probs = log_probs.exp().mean(dim=1)  # (B, C)
        target = per_item(self.target_index, batch, logits.device)[:, None]  # (B, 1)
        source = per_item(self.source_index, batch, logits.device)[:, None]  # (B, 1)
        log_p_target = log_probs.gather(2, target[:, None].expand(batch, num_views, 1))[..., 0]  # (B, V)
        d_latent, d_pixel = self.distance(inputs.images, inputs.latents)
        loss = -log_p_target.mean(dim=1) + d_latent + d_pixel
        p_target = probs.gather(1, target)[:, 0]  # (B,)
        runner_up = probs.scatter(1, target, -torch.inf).amax(dim=1)  # (B,) the best other class
        return ObjectiveOutput(
            loss=loss,
            metrics={
                "p_target": p_target,
                "p_source": probs.gather(1, source)[:, 0],
                "top_class": probs.argmax(dim=1).float(),  # of the view-averaged probabilities
                "distance_latent": d_latent,
                "distance_pixel": d_pixel,
            },
            claim=p_target - runner_up,
        )


@dataclass
class NeuronCounterfactual:
    """Neuron counterfactual (paper sec. 6): the neuron objective plus the distance that keeps
    the class object (the region is the mask itself, not its inverse), so only the rest of
    the image may change. Also reports the confidence in the class the neuron is suspected
    to be spurious for."""

    neuron: NeuronObjective
    class_index: int | list[int] | torch.Tensor  # one class, or one per item (B,)
    distance: RegionDistance

    def __call__(self, inputs: ObjectiveInput) -> ObjectiveOutput:
        value, probs = self.neuron.activation(inputs.views)  # (B,), (B, C)
        judged = per_item(self.class_index, probs.shape[0], probs.device)[:, None]  # (B, 1)
        d_latent, d_pixel = self.distance(inputs.images, inputs.latents)
        sign = 1.0 if self.neuron.maximize else -1.0
        return ObjectiveOutput(
            loss=-sign * value + d_latent + d_pixel,
            metrics={
                "activation": value,
                "p_class": probs.gather(1, judged)[:, 0],
                "distance_latent": d_latent,
                "distance_pixel": d_pixel,
            },
        )
