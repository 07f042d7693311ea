"""Class names: ImageNet's (with WordNet synonyms), a timm model's own, and resolving a name or index."""

from __future__ import annotations

import difflib
import re

from torch import nn

from digin_cli.errors import DiginError
from digin_cli.models.classifiers.base import Classifier


def imagenet_names() -> tuple[list[str], list[tuple[str, ...]]]:
    """Clean display names (open_clip's) + WordNet synonyms (timm's) for the 1000 ImageNet classes."""
    from open_clip import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    descriptions = ImageNetInfo().label_descriptions()  # ["tabby, tabby cat", ...]
    synonyms = [tuple(s.strip() for s in d.split(",") if s.strip()) for d in descriptions]
    return list(IMAGENET_CLASSNAMES), synonyms


def timm_class_names(model: nn.Module) -> tuple[list[str], list[tuple[str, ...]] | None]:
    from timm.data import ImageNetInfo, infer_imagenet_subset

    num_classes = model.num_classes
    if num_classes == 1000:
        return imagenet_names()
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


def normalize_name(name: str) -> str:
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

    wanted = normalize_name(text)
    synonyms = classifier.class_synonyms or [()] * classifier.num_classes
    # Display names first, synonyms second: a synonym never shadows another class's own
    # name (ImageNet's "cardigan" is the sweater, although it is also a corgi synonym).
    by_name = [i for i, name in enumerate(classifier.class_names) if normalize_name(name) == wanted]
    by_synonym = [i for i, names in enumerate(synonyms) if wanted in {normalize_name(s) for s in names}]
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
            candidates.setdefault(normalize_name(name), name)
    close = difflib.get_close_matches(wanted, list(candidates), n=5)
    hint = "close matches: " + ", ".join(f"'{candidates[c]}'" for c in close) if close else "no close matches"
    raise DiginError(
        f"unknown class '{text}' for {classifier.spec}; {hint} (give a class name or an index 0-{last})"
    )
