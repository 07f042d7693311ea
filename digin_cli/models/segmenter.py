"""SAM-HQ (segment-anything-hq), loaded once per run from a local checkpoint.

The checkpoint is one of the official files (sam_hq_vit_h.pth, sam_hq_vit_l.pth,
sam_hq_vit_b.pth, sam_hq_vit_tiny.pth); the architecture is read from the file name
unless given. The package is optional: `pip install "digin[sam]"`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from digin_cli.errors import DiginError

SAM_HQ_TYPES = ("vit_h", "vit_l", "vit_b", "vit_tiny")


def sam_model_type(checkpoint: Path, model_type: str | None) -> str:
    if model_type:
        if model_type not in SAM_HQ_TYPES:
            raise DiginError(f"unknown SAM-HQ model type '{model_type}'; use one of {', '.join(SAM_HQ_TYPES)}")
        return model_type
    name = checkpoint.name.lower()
    for candidate in sorted(SAM_HQ_TYPES, key=len, reverse=True):  # vit_tiny before vit_t...
        if candidate in name:
            return candidate
    raise DiginError(
        f"cannot tell the SAM-HQ architecture from the file name {checkpoint.name}; "
        f"add --sam-model-type ({', '.join(SAM_HQ_TYPES)})"
    )


def _import_sam_hq():
    """segment_anything_hq, imported without letting it replace timm's own tiny_vit models.

    Its import registers its TinyViT variants under timm's names (tiny_vit_5m_224, ...),
    which would change what `timm:tiny_vit_5m_224` builds later in the same process."""
    try:
        import timm.models._registry as timm_registry
    except ImportError:  # pragma: no cover - a timm without the private registry module
        timm_registry = None
    saved = dict(timm_registry._model_entrypoints) if timm_registry is not None else {}
    try:
        import segment_anything_hq
    except ImportError:
        raise DiginError('--sam-checkpoint needs the segment-anything-hq package: pip install "digin[sam]"') from None
    finally:
        if timm_registry is not None:
            timm_registry._model_entrypoints.update(saved)
    return segment_anything_hq


def load_sam_hq(checkpoint: Path, model_type: str | None = None, device: torch.device | str = "cpu"):
    """A SamPredictor over SAM-HQ weights from `checkpoint`.

    The architecture is built empty and the file loaded here with weights_only=True
    and a key check: the package's own loader loads with strict=False and prints the
    result, so a checkpoint of the wrong kind would pass silently with random weights."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise DiginError(f"SAM-HQ checkpoint {checkpoint} does not exist; download e.g. sam_hq_vit_h.pth and give its path")
    kind = sam_model_type(checkpoint, model_type)
    sam_hq = _import_sam_hq()
    model = sam_hq.sam_model_registry[kind](checkpoint=None)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is one user problem
        raise DiginError(f"could not read SAM-HQ checkpoint {checkpoint} ({type(error).__name__}); is it a .pth state dict?") from None
    if not isinstance(state, dict):
        raise DiginError(f"{checkpoint} is not a SAM-HQ state dict")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError:  # shapes differ: another architecture's weights
        raise DiginError(
            f"{checkpoint.name} does not fit SAM-HQ {kind} (weight shapes differ); check --sam-model-type or the file"
        ) from None
    if result.unexpected_keys or len(result.missing_keys) > 0.05 * len(model.state_dict()):
        raise DiginError(
            f"{checkpoint.name} does not fit SAM-HQ {kind} ({len(result.missing_keys)} missing, "
            f"{len(result.unexpected_keys)} unexpected weights); check --sam-model-type or the file"
        )
    model.to(device).eval()
    return sam_hq.SamPredictor(model)
