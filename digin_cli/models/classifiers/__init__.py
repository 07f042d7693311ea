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

from collections.abc import Callable

import torch

from digin_cli.errors import DiginError
from digin_cli.models.classifiers.base import ZERO_SHOT_LOGIT_SCALE, Classifier, ZeroShotCLIP
from digin_cli.models.classifiers.class_names import resolve_class
from digin_cli.models.classifiers.openclip_loader import load_openclip, zero_shot_cache_path
from digin_cli.models.classifiers.specs import BUILTIN_CLASSIFIER_LOADERS, accepted_forms, check_options, parse_spec
from digin_cli.models.classifiers.timm_loader import load_timm
from digin_cli.models.classifiers.torchscript_loader import load_torchscript

LOADERS: dict[str, Callable[[str, str, dict[str, str], torch.device], Classifier]] = {
    "timm": load_timm,
    "openclip": load_openclip,
    "torchscript": load_torchscript,
}


def load_classifier(spec: str | Classifier, device: torch.device | str = "cpu") -> Classifier:
    """Load the frozen classifier named by ``spec`` onto ``device`` (see the module docstring);
    a classifier already loaded is moved there."""
    device = torch.device(device)
    if isinstance(spec, Classifier):
        return spec.to(device)
    kind = spec.partition(":")[0].strip()
    if kind in BUILTIN_CLASSIFIER_LOADERS and kind not in LOADERS:
        classifier = BUILTIN_CLASSIFIER_LOADERS[kind](spec, device)
    else:
        kind, name, options = parse_spec(spec)
        if kind not in LOADERS:
            raise DiginError(f"unknown classifier kind '{kind}' in '{spec}'; accepted forms: {accepted_forms()}")
        check_options(spec, kind, options)
        classifier = LOADERS[kind](spec, name, options, device)
    classifier.requires_grad_(False)
    classifier.eval()
    if device.type == "cpu" and kind != "torchscript":
        # oneDNN's CPU convolutions run faster on channels-last weights (timm's scripts offer
        # --channels-last for the same reason): the shapes classifier's forward and backward
        # on 192 views of 64 px took 0.095 s instead of 0.138 s (median of 3, 2 cores). A
        # scripted model keeps the layout it was saved with.
        classifier.to(memory_format=torch.channels_last)
    return classifier


__all__ = [
    "BUILTIN_CLASSIFIER_LOADERS",
    "ZERO_SHOT_LOGIT_SCALE",
    "Classifier",
    "ZeroShotCLIP",
    "load_classifier",
    "parse_spec",
    "resolve_class",
    "zero_shot_cache_path",
]
