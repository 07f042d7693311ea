"""--cone SPEC[:DEGREES]: DVCE's cone projection around a second classifier's gradient.

The guide's gradient with respect to its views is projected, every loss step, onto the cone
of half-angle DEGREES around the gradient of the second classifier's -log p(claimed class)
(engine/guards.py, Cone; objectives.ClassLoss). A robust classifier's gradient points to
changes a person sees (DVCE, Augustin et al. 2022), so steps that only fool the guide are
cut away. The second classifier is matched to the guide's classes by name, as judges are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from digin_cli.engine import Cone
from digin_cli.errors import DiginError
from digin_cli.models import Classifier, load_classifier, resolve_class
from digin_cli.objectives import ClassLoss

DEFAULT_CONE_DEGREES = 30.0  # DVCE's half-angle
_DEGREES = re.compile(r"^(?P<spec>.+?):(?P<degrees>[^:,=/]+)$")


def parse_cone(text: str) -> tuple[str, float]:
    """'SPEC[:DEGREES]' -> (spec, degrees). A spec has colons of its own (shapes:robust,
    timm:...): DEGREES is a last part that reads as a number."""
    match = _DEGREES.match(text.strip())
    spec, degrees = text.strip(), DEFAULT_CONE_DEGREES
    if match:
        try:
            degrees = float(match["degrees"])
            spec = match["spec"]
        except ValueError:
            pass  # the last part is the spec's own (shapes:robust)
    if ":" not in spec:
        raise DiginError(f"--cone needs a classifier spec, e.g. --cone shapes:robust:30; got '{text}'")
    if not 0 < degrees <= 90:
        raise DiginError(f"--cone's half-angle must be in (0, 90] degrees, got {degrees:g} in '{text}'")
    return spec, degrees


@dataclass
class ConeGuide:
    """The loaded second classifier of --cone, and its class for each of the guide's."""

    classifier: Classifier
    degrees: float
    same_labels: bool

    def record(self) -> dict[str, object]:
        return {"spec": self.classifier.spec, "degrees": self.degrees}

    def index_of(self, guide: Classifier, class_index: int) -> int:
        if self.same_labels:
            return class_index
        name = guide.class_names[class_index]
        try:
            return resolve_class(self.classifier, name)
        except DiginError as error:
            raise DiginError(f"--cone {self.classifier.spec} does not know the class '{name}' ({error})") from None

    def cone(self, guide: Classifier, class_indices: Sequence[int] | int) -> Cone:
        """The engine's Cone toward the guide's class (one for the batch, or one per item)."""
        indices = [class_indices] if isinstance(class_indices, int) else list(class_indices)
        mapped = [self.index_of(guide, index) for index in indices]
        return Cone(ClassLoss(self.classifier, mapped[0] if isinstance(class_indices, int) else mapped), self.degrees)


def load_cone(text: str | None, guide: Classifier, classes: Sequence[int] = ()) -> ConeGuide | None:
    """--cone's classifier on the guide's device, checked against the classes known up front."""
    if text is None:
        return None
    spec, degrees = parse_cone(text)
    if spec == guide.spec:
        raise DiginError(f"--cone {spec} is the classifier being explained; the cone needs a second model")
    try:
        classifier = load_classifier(spec, next(guide.buffers()).device)
    except DiginError as error:
        raise DiginError(f"--cone {spec}: {error}") from None
    cone = ConeGuide(classifier, degrees, classifier.class_names == guide.class_names)
    for index in classes:
        cone.index_of(guide, index)
    return cone


def check_cone(text: str | None, judges: Sequence[object] = ()) -> None:
    """--cone's form and angle, before anything loads; a judge must not also guide."""
    if text is None:
        return
    spec, _ = parse_cone(text)
    if spec in judges:
        raise DiginError(f"--judge {spec} is also --cone's model: a judge must never shape the result; judge with another")
