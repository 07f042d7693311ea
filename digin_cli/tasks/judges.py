"""Claims and independent judges: does anyone but the guiding classifier see what a result claims?

Every finished record states its **claim**, the finding the run presents (``claimed``):

- disagree: f sees the class and g does not (p_f >= 0.5 and p_g <= 0.2 on the kept image);
- uvce: the counterfactual flipped (the classifier's top class is the target);
- neuron-cf: the neuron was flagged as a likely harmful spurious feature (or, with
  --from-other-class, maximizing it triggers the class);
- neuron: no claim (None): what a neuron looks for is shown, not asserted.

A **judge** (``--judge SPEC``, repeatable) is any classifier that never enters the loss. It
looks at the start and at the kept image, plain (no cutouts), read back from the PNG files
the run wrote, so its verdict is about the very images a user sees. Per judge the record
gets its top class and its probability of the claimed class before and after, and whether
it agrees with the item's claim:

- disagree: its top class on the kept image is the class;
- uvce: its top class on the counterfactual is the target;
- neuron-cf: it sees what the verdict says of the object. A flag says that lowering the
  feature drops the guide's confidence while the object stays, so the judge agrees when its
  top class on the minimized image is still the class; it need not lose confidence itself,
  since a judge free of the guide's shortcut should not (the drop is the guide's, and only
  the guide can measure it). A clearance or an inconclusive verdict (the object lost)
  likewise: the judge agrees when it sees the class exactly when the record kept the
  object. With --from-other-class a trigger says the guide sees the class although the
  object is another one: the judge agrees when its top class on the maximized image is
  not the class;
- neuron: nothing to agree with; its top classes are recorded.

``confirmed`` is true when the item claims a finding and every judge agrees with it, None
when the run has no judges or the command claims nothing. A judge with another label space is matched by class name;
a class it does not know stops the run in one line before the diffusion model loads.

Judges are not part of a run's fingerprint (they change no image): a rerun with other
judges judges the finished items again from their files, and optimizes nothing twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digin_cli.errors import DiginError
from digin_cli.io import read_rgb
from digin_cli.models import Classifier, load_classifier, resolve_class
from digin_cli.report.pages import DISAGREE_P_F, DISAGREE_P_G

FAIL_ON = ("claimed", "confirmed")  # --fail-on: exit status 3 when an item is such a finding
FINDING_EXIT_CODE = 3


@dataclass(frozen=True)
class ItemClaim:
    """What one record claims and which of its images a judge looks at."""

    claimed: bool | None  # None: the command claims nothing (neuron)
    class_index: int | None  # the claimed class in the guide's label space
    before: str  # the start's file key
    after: dict[str, str]  # kept image(s): name -> file key (neuron-cf: maximized, minimized)


def item_claim(record: dict[str, Any], config: dict[str, Any]) -> ItemClaim:
    """The claim of a finished record of any command (`config`: the run's config)."""
    command, after = record["command"], record.get("after") or {}
    if command == "disagree":
        claimed = after["p_f"] >= DISAGREE_P_F and after["p_g"] <= DISAGREE_P_G
        # A class scan's records name their own class (tasks/scan.py); a one-class run's config does.
        class_index = record["class_index"] if "class_index" in record else config["class_index"]
        return ItemClaim(claimed, class_index, "initial", {"after": "optimized"})
    if command == "uvce":
        return ItemClaim(bool(record["flipped"]), record["target_index"], "original", {"after": "counterfactual"})
    if command == "neuron-cf":
        verdict, triggers = record.get("verdict"), record.get("from_other_class")
        claimed = verdict["flagged"] if verdict else triggers["triggers_class"] if triggers else None
        modes = {mode: mode for mode in ("maximized", "minimized") if mode in after}
        return ItemClaim(claimed, record["class_index"], "original", modes)
    return ItemClaim(None, None, "initial", {"after": "optimized"})


@dataclass
class Judge:
    """One judging classifier and how the guide's classes are named in its label space."""

    classifier: Classifier
    same_labels: bool  # the guide's label space: indices carry over

    @property
    def spec(self) -> str:
        return self.classifier.spec

    def index_of(self, guide: Classifier, class_index: int) -> int:
        """The guide's class `class_index` in this judge's label space (by name where they differ)."""
        if self.same_labels:
            return class_index
        name = guide.class_names[class_index]
        try:
            return resolve_class(self.classifier, name)
        except DiginError as error:
            raise DiginError(f"--judge {self.spec} does not know the class '{name}' ({error}); "
                             "judge with a classifier over the same classes") from None  # fmt: skip

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, C) class probabilities, one plain view each."""
        device = next(self.classifier.buffers()).device
        return self.classifier(images.to(device)).float().softmax(dim=-1).cpu()


class Judges:
    """The judges of a run, and how they annotate its records (`RunFolder.annotator`)."""

    def __init__(self, judges: Sequence[Judge], guide: Classifier) -> None:
        self.judges = list(judges)
        self.guide = guide

    @property
    def specs(self) -> list[str]:
        return [judge.spec for judge in self.judges]

    @classmethod
    def load(cls, specs: Iterable[str | Classifier], guide: Classifier, device: torch.device,
             classes: Iterable[int] = ()) -> Judges:  # fmt: skip
        """Load each judge (a spec, or a classifier already loaded) onto `device` and check that it knows every class in `classes`
        (guide indices). Loading draws no random numbers from the run's generators: a
        judge's own initialization cannot change what the optimization does."""
        judges = []
        for spec in dict.fromkeys(specs):
            name = spec.spec if isinstance(spec, Classifier) else spec
            if name == guide.spec or spec is guide:
                raise DiginError(f"--judge {name} is the classifier being explained; a judge must be another model")
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                try:
                    classifier = load_classifier(spec, device)
                except DiginError as error:
                    raise DiginError(f"--judge {spec}: {error}") from None
            judges.append(Judge(classifier, classifier.class_names == guide.class_names))
        panel = cls(judges, guide)
        for index in classes:
            for judge in panel.judges:
                judge.index_of(guide, index)
        return panel

    # -- the annotator protocol of RunFolder ----------------------------------------------

    def stale(self, record: dict[str, Any]) -> bool:
        """A finished record judged by other judges than this run's (or not yet claimed)."""
        return "claimed" not in record or sorted(record.get("judges") or {}) != sorted(self.specs)

    def __call__(self, record: dict[str, Any], out: Path, config: dict[str, Any]) -> dict[str, Any]:
        """The finished `record` (its files in `out`, `config` its run's) with its claim, its
        judges' views and whether they confirm it."""
        claim = item_claim(record, config)
        files = record.get("files") or {}
        judged = {judge.spec: self._judge(judge, record, claim, files, out) for judge in self.judges}
        confirmed = None
        if self.judges and claim.claimed is not None:
            confirmed = bool(claim.claimed) and all(verdict["agrees"] for verdict in judged.values())
        return {**record, "claimed": claim.claimed, "judges": judged, "confirmed": confirmed,
                "judges_agreeing": sum(bool(v["agrees"]) for v in judged.values())}  # fmt: skip

    def _judge(self, judge: Judge, record: dict[str, Any], claim: ItemClaim, files: dict[str, str],
               out: Path) -> dict[str, Any]:  # fmt: skip
        """One judge's view of one record: its top class and p(claimed class) per image."""
        keys = {"before": claim.before, **claim.after}
        images = torch.stack([_read_image(out / files[key]) for key in keys.values()])  # (N, 3, H, W)
        probs = judge.probabilities(images)  # (N, C)
        index = None
        if claim.class_index is not None:
            try:
                index = judge.index_of(self.guide, claim.class_index)
            except DiginError as error:  # a class known only now (an image's predicted one)
                return {"error": str(error), "agrees": None if claim.claimed is None else False}
        seen = {}
        for row, name in enumerate(keys):
            top = int(probs[row].argmax())
            seen[name] = {"top_class": top, "top_class_name": judge.classifier.class_names[top]}
            if index is not None:
                seen[name]["p_claimed"] = round(float(probs[row, index]), 6)
        return {**seen, "agrees": _agrees(record, seen, index)}


def _agrees(record: dict[str, Any], seen: dict[str, dict[str, Any]], index: int | None) -> bool | None:
    """Whether a judge that saw `seen` agrees with the record's claim (None: nothing claimed)."""
    command = record["command"]
    if index is None:
        return None
    if command in ("disagree", "uvce"):
        return seen["after"]["top_class"] == index
    verdict, triggers = record.get("verdict"), record.get("from_other_class")
    if verdict:  # the object as the judge sees it, against the object as the record kept it
        return (seen["minimized"]["top_class"] == index) == verdict["object_kept"]
    if triggers:  # the class the guide was made to see, which the judge should not see
        return (seen["maximized"]["top_class"] != index) == triggers["triggers_class"]
    return None


def _read_image(path: Path) -> torch.Tensor:
    """A PNG the run wrote -> (3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.array(read_rgb(path))).permute(2, 0, 1).float() / 255.0


def load_judges(specs: Sequence[str | Classifier], guide: Classifier, classes: Iterable[int] = ()) -> Judges:
    """The run's judges on the guide's device, checked against the classes known up front."""
    return Judges.load(specs, guide, next(guide.buffers()).device, classes)


def findings(records: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The finished records that are a `kind` ("claimed" or "confirmed") finding."""
    return [r for r in records if r.get("status") == "ok" and r.get(kind) is True]


def check_judge_options(specs: Sequence[str | Classifier], fail_on: str | None) -> None:
    """--judge and --fail-on, before anything loads."""
    for spec in specs:
        if isinstance(spec, str) and not spec.strip():
            raise DiginError("--judge needs a classifier spec, e.g. --judge shapes:oracle-2")
    if fail_on is not None and fail_on not in FAIL_ON:
        raise DiginError(f"--fail-on must be one of {', '.join(FAIL_ON)}, not '{fail_on}'")
    if fail_on == "confirmed" and not specs:
        raise DiginError("--fail-on confirmed needs at least one --judge (a finding is confirmed by judges)")
