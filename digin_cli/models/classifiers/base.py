"""The classifier interface: a frozen module taking images in [0, 1], with timm's feature and head access."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from digin_cli.errors import DiginError

# The paper's zero-shot logits are 100 x cosine (CLIP's trained logit_scale saturates
# at 100, but a checkpoint's own value may differ; the fixed value keeps runs comparable).
ZERO_SHOT_LOGIT_SCALE = 100.0


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
