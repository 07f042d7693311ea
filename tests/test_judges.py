"""Judges: independent classifiers that see each result and never its loss; claims,
confirmations, --fail-on's exit status, and a rerun that judges again without optimizing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import digin_cli as digin
from digin_cli.cli import app
from digin_cli.models.builtin import SHAPES_WEIGHTS, saved_classifier_spec, shapes_classifier_meta
from digin_cli.models.classifiers import Classifier
from digin_cli.tasks.judges import Judge, Judges

runner = CliRunner()
CLASSES = SHAPES_WEIGHTS / "classifiers" / "classes.txt"
SHAPE_NAMES = CLASSES.read_text().split()
# Two seeds of triangles that the oracle claims at once (p_f 0.999, p_g < 0.01 from the start).
DISAGREE = ["disagree", "--model", "shapes", "-f", "shapes:oracle", "-g", "shapes:color-biased", "--class", "triangle",
            "-n", "2", "--steps", "2", "--cutouts", "2", "--device", "cpu", "--quiet"]  # fmt: skip


def oracle_copy() -> str:
    """shapes:oracle's own weights under another spec: a judge that sees exactly what the guide sees."""
    meta = shapes_classifier_meta("oracle")
    return saved_classifier_spec(meta["arch"], SHAPES_WEIGHTS / "classifiers" / "oracle", CLASSES, meta["input_size"],
                                 meta["mean"], meta["std"], meta.get("act_layer"))  # fmt: skip


class Constant(nn.Module):
    """Logits that always make `winner` the top class."""

    def __init__(self, count: int, winner: int) -> None:
        super().__init__()
        self.register_buffer("logits", torch.full((count,), -5.0).index_fill(0, torch.tensor(winner), 5.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1) + 0 * x.mean()


def contrarian_spec(tmp_path: Path, winner: str = "circle", classes: list[str] | None = None) -> str:
    """A TorchScript judge whose top class is always `winner`."""
    classes = classes or SHAPE_NAMES
    path, names = tmp_path / "contrarian.pt", tmp_path / "contrarian-classes.txt"
    torch.jit.script(Constant(len(classes), classes.index(winner))).save(str(path))
    names.write_text("\n".join(classes) + "\n")
    return f"torchscript:{path},classes={names},size=64"


def records(out: Path) -> list[dict]:
    return [json.loads((out / f"{line['item']}.json").read_text())
            for line in map(json.loads, (out / "summary.jsonl").read_text().splitlines())]  # fmt: skip


def test_a_judge_changes_no_image_and_never_gets_a_gradient(tmp_path):
    judge = digin.load_classifier("shapes:oracle-2", "cpu")
    options = dict(model="shapes", num_images=1, steps=2, cutouts=2, device="cpu", progress=False)
    plain = digin.disagree("shapes:oracle", "shapes:color-biased", "triangle", out=tmp_path / "plain", **options)
    judged = digin.disagree("shapes:oracle", "shapes:color-biased", "triangle", judge=judge, out=tmp_path / "judged",
                            **options)  # fmt: skip
    for key in ("initial", "optimized"):
        name = plain[0].record["files"][key]
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "judged" / name).read_bytes(), key
    assert plain[0].history == judged[0].history
    assert all(p.grad is None and not p.requires_grad for p in judge.parameters())
    assert set(judged[0].judges) == {"shapes:oracle-2"} and plain[0].confirmed is None
    verdict = judged[0].judges["shapes:oracle-2"]
    assert verdict["after"]["top_class_name"] in SHAPE_NAMES and 0 <= verdict["after"]["p_claimed"] <= 1
    # What the judge says is about the PNG a user sees: the same judge on that file agrees.
    image = torch.from_numpy(np.array(judged[0].after_image)).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        p = judge(image[None]).softmax(-1)[0]
    assert verdict["after"]["p_claimed"] == pytest.approx(float(p[SHAPE_NAMES.index("triangle")]), abs=1e-6)
    assert judged[0].confirmed == (judged[0].claimed and verdict["after"]["top_class_name"] == "triangle")


def test_a_copy_of_the_guide_confirms_every_claim_and_a_contrarian_none(tmp_path):
    copy = runner.invoke(app, [*DISAGREE, "--judge", oracle_copy(), "--fail-on", "confirmed", "--out", str(tmp_path / "copy")])
    assert copy.exit_code == 3, copy.output  # a confirmed finding: the CI gate trips
    found = records(tmp_path / "copy")
    assert sum(r["claimed"] for r in found) >= 1
    assert all(r["confirmed"] == r["claimed"] for r in found)
    header = json.loads((tmp_path / "copy" / "run.json").read_text())
    assert header["items"]["confirmed"] == header["items"]["claimed"] == sum(r["claimed"] for r in found)
    contrarian = runner.invoke(app, [*DISAGREE, "--judge", contrarian_spec(tmp_path), "--fail-on", "confirmed",
                                     "--out", str(tmp_path / "contrarian")])  # fmt: skip
    assert contrarian.exit_code == 0, contrarian.output  # claims, but none confirmed: the gate stays open
    found = records(tmp_path / "contrarian")
    assert sum(r["claimed"] for r in found) >= 1 and not any(r["confirmed"] for r in found)
    assert all(next(iter(r["judges"].values()))["after"]["top_class_name"] == "circle" for r in found)
    assert "0 confirmed by every judge" in contrarian.output
    # --fail-on claimed needs no judge; a run that claims nothing (neuron) passes the gate.
    assert runner.invoke(app, [*DISAGREE, "--fail-on", "claimed", "--out", str(tmp_path / "plain")]).exit_code == 3
    neuron = ["neuron", "--model", "tiny", "--classifier", "tiny:f", "--neuron", "0", "--prompt", "a circle", "--steps", "1",
              "--ddim-steps", "3", "--loss-steps", "1", "--cutouts", "2", "--device", "cpu", "--quiet", "--judge", "tiny:g",
              "--fail-on", "claimed", "--out", str(tmp_path / "neuron")]  # fmt: skip
    result = runner.invoke(app, neuron)
    assert result.exit_code == 0, result.output
    record = records(tmp_path / "neuron")[0]
    assert record["claimed"] is None and record["confirmed"] is None
    assert set(record["judges"]["tiny:g"]) == {"before", "after", "agrees"}


def test_a_rerun_with_other_judges_judges_again_and_optimizes_nothing(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, [*DISAGREE, "--out", str(out)]).exit_code == 0
    first = records(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert all(r["judges"] == {} and r["confirmed"] is None for r in first)
    result = runner.invoke(app, [*DISAGREE, "--judge", oracle_copy(), "--out", str(out)])
    assert result.exit_code == 0, result.output
    again = records(out)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == stamps, "no image was made again"
    for old, new in zip(first, again):
        assert new["history"] == old["history"] and new["seconds"] == old["seconds"]
        assert list(new["judges"]) == [oracle_copy()] and new["confirmed"] == new["claimed"]


def test_judge_errors_are_one_line_before_anything_loads(tmp_path):
    out = tmp_path / "never"
    no_triangle = [name for name in SHAPE_NAMES if name != "triangle"]
    cases = {
        ("--judge", "shapes:nonexistent"): "--judge shapes:nonexistent: unknown built-in classifier",
        ("--judge", "shapes:oracle"): "is the classifier being explained",
        ("--judge", contrarian_spec(tmp_path, "circle", no_triangle)): "does not know the class 'triangle'",
        ("--fail-on", "confirmed"): "--fail-on confirmed needs at least one --judge",
        ("--fail-on", "always"): "--fail-on must be one of claimed, confirmed",
        ("--judge", " "): "--judge needs a classifier spec",
    }
    for extra, message in cases.items():
        result = runner.invoke(app, [*DISAGREE, *extra, "--out", str(out)])
        assert result.exit_code == 1, (extra, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], (extra, result.output)
        assert not out.exists(), extra


class Brightness(nn.Module):
    """Class 0's logit grows with the image's brightness: bright images are class 0, dark ones class 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3))  # (N,) of normalized pixels
        return torch.stack([8 * mean, torch.zeros_like(mean), -8 * torch.ones_like(mean)], dim=1)  # (N, 3)


def test_each_commands_claim_and_how_a_judge_agrees(tmp_path):
    names = ["bright", "dark", "other"]
    make = lambda module: Classifier(module, spec=f"test:{type(module).__name__}", class_names=names, input_size=(8, 8),
                                     mean=(0.5,) * 3, std=(0.5,) * 3)  # noqa: E731  # fmt: skip
    judges = Judges([Judge(make(Brightness()), same_labels=True)], make(Constant(3, 2)))
    for name, value in (("white", 255), ("black", 0)):
        Image.new("RGB", (8, 8), (value,) * 3).save(tmp_path / f"{name}.png")
    config = {"class_index": 0}
    neuron_cf = lambda flagged, before, after: {"command": "neuron-cf", "status": "ok", "class_index": 0,  # noqa: E731
        "after": {"minimized": {}}, "files": {"original": before, "minimized": after}, "from_other_class": None,
        "verdict": {"flagged": flagged, "object_kept": True, "drop_threshold": 0.3}}  # fmt: skip
    trigger = lambda triggers, after: {"command": "neuron-cf", "status": "ok", "class_index": 0,  # noqa: E731
        "after": {"maximized": {}}, "files": {"original": "black.png", "maximized": after}, "verdict": None,
        "from_other_class": {"triggers_class": triggers}}  # fmt: skip
    uvce = lambda target, after: {"command": "uvce", "status": "ok", "flipped": True, "target_index": target,  # noqa: E731
                                  "after": {}, "files": {"original": "black.png", "counterfactual": after}}  # fmt: skip
    cases = [
        # neuron-cf: a flag says the object stayed while the guide's confidence dropped. The
        # judge still sees "bright" on the minimized image (it does not share the guide's
        # shortcut, so it need not drop): it agrees.
        (neuron_cf(True, "white.png", "white.png"), True, True),
        (neuron_cf(True, "white.png", "black.png"), True, False),  # the judge sees the object gone: not confirmed
        (neuron_cf(False, "white.png", "white.png"), False, False),  # agrees that nothing is flagged, but no claim
        # With --from-other-class: the guide was made to see "bright" on another class's image.
        # The judge seeing "dark" there confirms the trigger is the guide's alone.
        (trigger(True, "black.png"), True, True),
        (trigger(True, "white.png"), True, False),  # the judge sees "bright" too: the image really changed
        (uvce(0, "white.png"), True, True),  # the judge's top class on the counterfactual is the target
        (uvce(1, "white.png"), True, False),
        ({"command": "disagree", "status": "ok", "after": {"p_f": 0.9, "p_g": 0.1},
          "files": {"initial": "black.png", "optimized": "white.png"}}, True, True),  # fmt: skip
        ({"command": "disagree", "status": "ok", "after": {"p_f": 0.9, "p_g": 0.3},
          "files": {"initial": "black.png", "optimized": "white.png"}}, False, False),  # fmt: skip
    ]
    for record, claimed, confirmed in cases:
        judged = judges(record, tmp_path, config)
        assert (judged["claimed"], judged["confirmed"]) == (claimed, confirmed), record
    agreeing = judges(neuron_cf(False, "white.png", "white.png"), tmp_path, config)
    assert agreeing["judges"]["test:Brightness"]["agrees"] is True and agreeing["judges_agreeing"] == 1
