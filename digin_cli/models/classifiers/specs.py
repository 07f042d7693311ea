"""Classifier spec strings ``KIND:NAME[,key=value...]``: parsing, option checks, option values."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from digin_cli.errors import DiginError
from digin_cli.models.classifiers.base import Classifier

# ImageNet statistics: the torchscript defaults (most exported ImageNet models use them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ACCEPTED_FORMS = (
    "timm:NAME[,checkpoint=PATH][,num_classes=N][,act_layer=NAME][,classes=FILE][,size=N][,mean=r;g;b][,std=r;g;b]",
    "openclip:ARCH/PRETRAINED[,classes=FILE][,mean=r;g;b][,std=r;g;b]",
    "torchscript:PATH,classes=FILE[,size=224][,mean=r;g;b][,std=r;g;b]",
)
OPTION_KEYS = {
    "timm": {"checkpoint", "num_classes", "act_layer", "classes", "size", "mean", "std"},
    "openclip": {"classes", "mean", "std"},
    "torchscript": {"classes", "size", "mean", "std"},
}

# prefix -> loader(full spec, device); filled by the modules that define built-in models.
# prefix -> loader(full spec, device); filled by the modules that define built-in models.
BUILTIN_CLASSIFIER_LOADERS: dict[str, Callable[[str, torch.device], Classifier]] = {}


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``KIND:NAME[,key=value...]`` -> (kind, name, options). Raises DiginError when malformed."""
    kind, sep, rest = spec.partition(":")
    parts = rest.split(",")
    name = parts[0].strip()
    if not sep or not kind.strip() or not name:
        raise DiginError(f"malformed classifier spec '{spec}'; accepted forms: {accepted_forms()}")
    options: dict[str, str] = {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise DiginError(
                f"malformed option '{part}' in classifier spec '{spec}': options are key=value, "
                f"separated by commas; accepted forms: {accepted_forms()}"
            )
        if key in options:
            raise DiginError(f"option '{key}' given twice in classifier spec '{spec}'")
        options[key] = value
    return kind.strip(), name, options


def accepted_forms() -> str:
    builtin = [f"{prefix}:NAME" for prefix in sorted(BUILTIN_CLASSIFIER_LOADERS)]
    return " | ".join(list(ACCEPTED_FORMS) + builtin)


def check_options(spec: str, kind: str, options: dict[str, str]) -> None:
    unknown = sorted(set(options) - OPTION_KEYS[kind])
    if unknown:
        allowed = ", ".join(sorted(OPTION_KEYS[kind]))
        raise DiginError(f"unknown option {', '.join(map(repr, unknown))} in '{spec}'; {kind}: accepts {allowed}")


def existing_file(path: str, what: str, spec: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise DiginError(f"{what} file not found: {resolved} (from '{spec}'); check the path")
    return resolved


def read_class_names(path: str, spec: str) -> list[str]:
    file = existing_file(path, "classes", spec)
    names = [" ".join(line.split()) for line in file.read_text(encoding="utf-8").splitlines()]
    names = [name for name in names if name]  # blank lines (e.g. a trailing one) are not classes
    if not names:
        raise DiginError(f"classes file {file} is empty; write one class name per line")
    return names


def check_class_count(names: list[str], num_outputs: int, classes_path: str, spec: str) -> None:
    if len(names) != num_outputs:
        raise DiginError(
            f"classes file {Path(classes_path).expanduser()} has {len(names)} names but {spec} has "
            f"{num_outputs} outputs; write exactly one class name per output, in output order"
        )


def parse_floats(value: str, key: str, spec: str) -> tuple[float, float, float]:
    try:
        numbers = tuple(float(v) for v in value.split(";"))
    except ValueError:
        numbers = ()
    if len(numbers) != 3:
        raise DiginError(f"{key}='{value}' in '{spec}' must be three numbers r;g;b, e.g. {key}=0.5;0.5;0.5")
    return numbers  # type: ignore[return-value]


def parse_size(value: str, spec: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", value)
    if not match or int(match[1]) == 0 or (match[2] and int(match[2]) == 0):
        raise DiginError(f"size='{value}' in '{spec}' must be a positive integer or HxW, e.g. size=224")
    return int(match[1]), int(match[2] or match[1])


def pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
