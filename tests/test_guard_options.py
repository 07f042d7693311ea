"""The guards as a user sets them: --keep, --noise-reg, --augment and --cone through the CLI
on the shapes world (their maths is tested in test_guards.py), and their bad values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from digin_cli.cli import app

runner = CliRunner()
RUN = ["disagree", "--model", "shapes", "-f", "shapes:oracle", "-g", "shapes:color-biased", "--class", "circle",
       "-n", "2", "--steps", "4", "--cutouts", "2", "--device", "cpu", "--quiet"]  # fmt: skip


def histories(out: Path) -> list[list[dict]]:
    lines = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    return [json.loads((out / f"{line['item']}.json").read_text()) for line in lines]


def run(tmp_path: Path, name: str, *extra: str) -> list[dict]:
    result = runner.invoke(app, [*RUN, *extra, "--out", str(tmp_path / name)])
    assert result.exit_code == 0, result.output
    return histories(tmp_path / name)


def test_keep_first_claim_keeps_the_first_iterate_whose_claim_holds(tmp_path):
    margin = 0.05
    for record in run(tmp_path, "first", "--keep", "first-claim", "--claim-margin", str(margin)):
        holds = [h["step"] for h in record["history"] if min(h["p_f"] - 0.5, 0.2 - h["p_g"]) >= margin - 1e-6]
        best_loss = min(record["history"], key=lambda h: h["loss"])["step"]
        assert record["best_step"] == (holds[0] if holds else best_loss), record["item"]
    for record in run(tmp_path, "best"):
        assert record["best_step"] == min(record["history"], key=lambda h: h["loss"])["step"]


@pytest.mark.parametrize("extra, recorded", [(("--noise-reg", "10"), {"noise_reg": 10.0}), (("--augment", "eot"), {"augment": "eot"})])
def test_a_guard_changes_the_optimization_but_not_its_start(tmp_path, extra, recorded):
    plain = run(tmp_path, "plain")
    guarded = run(tmp_path, "guarded", *extra)
    again = run(tmp_path, "again", *extra)
    assert [r["history"] for r in guarded] == [r["history"] for r in again], "seeded: the same run twice is the same"
    for p, g in zip(plain, guarded):
        assert p["history"][0] == g["history"][0], "the start is the same"
        assert p["history"][1:] != g["history"][1:], "the updates are not"
    config = json.loads((tmp_path / "guarded" / "run.json").read_text())["config"]["optim"]
    assert {key: config[key] for key in recorded} == recorded


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--noise-reg", "-1"), "--noise-reg must be a finite weight >= 0"),
        (("--noise-reg", "nan"), "--noise-reg must be a finite weight >= 0"),
        (("--keep", "last"), "--keep must be one of best-loss, first-claim"),
        (("--augment", "mixup"), "--augment must be one of cutouts, eot"),
        (("--claim-margin", "-0.1"), "--claim-margin must be >= 0"),
    ],
)
def test_bad_guard_values_are_one_line_before_anything_loads(tmp_path, extra, message):
    out = tmp_path / "never"
    result = runner.invoke(app, [*RUN, *extra, "--out", str(out)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"Error: {message}"), result.output
    assert not out.exists()


def test_cone_shapes_the_updates_and_is_recorded(tmp_path):
    plain = run(tmp_path, "plain")
    coned = run(tmp_path, "cone", "--cone", "shapes:oracle-2:10")
    assert json.loads((tmp_path / "cone" / "run.json").read_text())["config"]["cone"] == {"spec": "shapes:oracle-2", "degrees": 10.0}
    assert "cone" not in json.loads((tmp_path / "plain" / "run.json").read_text())["config"]
    for p, c in zip(plain, coned):
        assert p["history"][0] == c["history"][0] and p["history"][1:] != c["history"][1:]


def test_uvce_takes_the_cone_and_ranks_its_starts_by_the_guarded_loss(tmp_path):
    image = Path(__file__).resolve().parent.parent / "sample_images" / "chelsea.png"
    args = ["uvce", str(image), "--classifier", "tiny:f", "--target", "circle", "--source-class", "bar", "--model", "tiny",
            "--ddim-steps", "10", "--steps", "1", "--loss-steps", "1", "--cutouts", "2", "--device", "cpu", "--quiet",
            "--cone", "tiny:g:45", "--out", str(tmp_path / "uvce")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "uvce" / "run.json").read_text())["config"]
    assert config["cone"] == {"spec": "tiny:g", "degrees": 45.0} and config["p2p_search"] == "guarded views"
    record = histories(tmp_path / "uvce")[0]
    search = record["p2p"]["start_loss_by_inject_steps"]
    assert len(search) == 3 and record["p2p"]["inject_steps"] == int(min(search, key=search.get))


@pytest.mark.parametrize(
    "cone, message",
    [
        ("shapes:oracle-2:0", "--cone's half-angle must be in (0, 90] degrees"),
        ("shapes:oracle-2:91", "--cone's half-angle must be in (0, 90] degrees"),
        ("robust", "--cone needs a classifier spec"),
        ("shapes:nonexistent:30", "--cone shapes:nonexistent: unknown built-in classifier"),
        ("shapes:oracle", "is the classifier being explained"),
    ],
)
def test_bad_cones_are_one_line_before_anything_loads(tmp_path, cone, message):
    out = tmp_path / "never"
    result = runner.invoke(app, [*RUN, "--cone", cone, "--out", str(out)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()
    judged = runner.invoke(app, [*RUN, "--cone", "shapes:oracle-2", "--judge", "shapes:oracle-2", "--out", str(out)])
    assert judged.exit_code == 1 and "a judge must never shape the result" in judged.output
