"""`digin disagree` over many classes on the shapes world: the ranking, resuming, the screen,
--fail-on, bad input, and the report's ranking view in headless Chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from digin_cli.cli import app
from digin_cli.tasks.scan import rank_key

runner = CliRunner()
SHAPES = ["circle", "bar", "triangle", "star"]
FAST = ["--steps", "1", "--ddim-steps", "4", "--num-images", "2", "--cutouts", "2", "--device", "cpu", "--quiet"]


def scan(out: Path, *extra: str) -> list[str]:
    return ["disagree", "--model", "shapes", "-f", "shapes:oracle", "-g", "shapes:color-biased", "--out", str(out), *FAST, *extra]


def records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*_seed*.json")}


def mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix in (".png", ".json") and p.name != "run.json"}


@pytest.fixture(scope="module")
def full_scan(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scan") / "all"
    result = runner.invoke(app, scan(out, "--class", "all"))
    assert result.exit_code == 0, result.output
    return out


def test_every_class_once_in_rank_order(full_scan):
    header = json.loads((full_scan / "run.json").read_text())
    ranking = header["ranking"]
    assert sorted(entry["class"] for entry in ranking) == sorted(SHAPES)
    assert [entry["rank"] for entry in ranking] == [1, 2, 3, 4]
    done = records(full_scan)
    assert len(done) == 8
    for entry in ranking:  # each entry's figures are its records'
        mine = [r for r in done.values() if r["classes"]["class"] == entry["class"]]
        assert entry["items"] == 2 and entry["claimed"] == sum(r["claimed"] for r in mine)
        claimed = [r for r in mine if r["claimed"]] or mine
        margins = {r["item"]: r["after"]["p_f"] - r["after"]["p_g"] for r in claimed}
        assert entry["best_item"] == max(margins, key=margins.get)
        assert entry["best_margin"] == pytest.approx(max(margins.values()), abs=1e-6)
    keys = [(-e["claimed"], -e["best_margin"]) for e in ranking]
    assert keys == sorted(keys), "claimed count, then best margin, descending"
    assert [rank_key(e) for e in ranking] == sorted(rank_key(e) for e in ranking)
    # The summary: the items, then one line per class in rank order.
    lines = [json.loads(line) for line in (full_scan / "summary.jsonl").read_text().splitlines()]
    assert [line["class"] for line in lines if line.get("format") == "digin-class/1"] == [e["class"] for e in ranking]
    assert header["items"]["done"] == 8


def test_a_rerun_does_nothing_and_a_lost_record_is_redone_alone(full_scan, tmp_path):
    before = mtimes(full_scan)
    result = runner.invoke(app, scan(full_scan, "--class", "all"))
    assert result.exit_code == 0, result.output
    assert mtimes(full_scan) == before, "no item is optimized again"
    copy = tmp_path / "copy"
    shutil.copytree(full_scan, copy)
    (copy / "star_seed1.json").unlink()
    kept = mtimes(copy)
    assert runner.invoke(app, scan(copy, "--class", "all")).exit_code == 0
    after = mtimes(copy)
    redone = sorted(name for name in after if after[name] != kept.get(name))
    assert redone == ["star_seed1.json", "star_seed1_init.png", "star_seed1_optimized.png", "star_seed1_plot.png", "star_seed1_sheet.png"]


def test_the_screen_optimizes_only_the_top_classes(tmp_path):
    out = tmp_path / "screen"
    result = runner.invoke(app, scan(out, "--class", "all", "--screen", "2", "--top", "1", "--fail-on", "claimed"))
    header = json.loads((out / "run.json").read_text())
    screening = header["scan"]["screening"]
    assert sorted(e["class"] for e in screening) == sorted(SHAPES) and all(len(e["p_f"]) == 2 for e in screening)
    top = max(screening, key=lambda e: e["score"])["class"]
    assert header["scan"]["chosen"] == [top]
    done = records(out)
    assert {r["classes"]["class"] for r in done.values()} == {top}, "screened-out classes have no records"
    for entry in screening:  # the screen's starts are the optimization's: seeds 0 and 1
        assert entry["seeds"] == [0, 1]
        assert entry["score"] == pytest.approx(sum(f - g for f, g in zip(entry["p_f"], entry["p_g"])) / 2, abs=1e-5)
        if entry["class"] == top:
            for seed, p_f in zip(entry["seeds"], entry["p_f"]):
                assert done[f"{top}_seed{seed}"]["before"]["p_f"] == pytest.approx(p_f, abs=1e-3)
    ranking = header["ranking"]
    assert ranking[0]["class"] == top and all(not e["optimized"] for e in ranking[1:])
    assert [e["screen_score"] for e in ranking[1:]] == sorted((e["screen_score"] for e in ranking[1:]), reverse=True)
    # --fail-on claimed: exit status 3 exactly when a class has a claimed finding.
    assert result.exit_code == (3 if any(r["claimed"] for r in done.values()) else 0), result.output
    # A rerun screens nothing and optimizes nothing.
    before = mtimes(out)
    assert runner.invoke(app, scan(out, "--class", "all", "--screen", "2", "--top", "1")).exit_code in (0,)
    assert mtimes(out) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--classes", "{empty}"], "names no class"),
        (["--classes", "{missing}"], "cannot be read"),
        (["--classes", "{bad}"], "line 3: unknown class 'hexagon'"),
        (["--class", "circle", "--class", "hexagon"], "unknown class 'hexagon'"),
        (["--class", "all", "--screen", "0", "--top", "1"], "--screen must be at least 1"),
        (["--class", "all", "--screen", "2", "--top", "0"], "--top must be at least 1"),
        (["--class", "all", "--top", "2"], "--top needs --screen"),
        (["--class", "all", "--class", "circle"], "--class all names every class of f; give it alone"),
        (["--class", "all", "--classes", "{bad}"], "--class all names every class of f; give it alone"),
    ],
)
def test_bad_scan_input_is_one_line(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    (tmp_path / "bad.txt").write_text("circle\n# a comment\nhexagon\n")
    files = {"empty": tmp_path / "empty.txt", "missing": tmp_path / "none.txt", "bad": tmp_path / "bad.txt"}
    out = tmp_path / "out"
    result = runner.invoke(app, scan(out, *(a.format(**files) for a in args)))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and message in lines[0], lines[0]
    assert not out.exists()


def test_a_classes_file_scans_its_classes_with_comments_skipped(tmp_path):
    (tmp_path / "classes.txt").write_text("# two shapes\nstar\n\n3  # star again, by index\nbar\n")
    out = tmp_path / "file"
    result = runner.invoke(app, scan(out, "--classes", str(tmp_path / "classes.txt"), "--num-images", "1"))
    assert result.exit_code == 0, result.output
    header = json.loads((out / "run.json").read_text())
    assert [c["name"] for c in header["config"]["classes"]] == ["star", "bar"]
    assert sorted(records(out)) == ["bar_seed0", "star_seed0"]


from test_report import _open, needs_browser  # noqa: E402
from test_report import browser  # noqa: E402, F401  (the module's Chromium fixture)


@needs_browser
def test_the_report_opens_on_the_ranking(browser, full_scan):  # noqa: F811
    header = json.loads((full_scan / "run.json").read_text())
    _open(browser, full_scan / "index.html")
    rows = browser.execute_script("return [...document.querySelectorAll('tr.rank')].map(r => r.dataset.class)")
    assert rows == [e["class"] for e in header["ranking"]]
    browser.get((full_scan / "index.html").resolve().as_uri())  # as a person first sees it: every <details> closed
    first = browser.execute_script("return document.getElementById('ranking').getBoundingClientRect().top < innerHeight"
                                   " && document.getElementById('ranking').getBoundingClientRect().top"
                                   " < document.getElementById('grid').getBoundingClientRect().top")  # fmt: skip
    assert first, "the ranking is the first view, above the items"
    broken = browser.execute_script("return [...document.querySelectorAll('#ranking img')].filter(i => !(i.naturalWidth > 0)).length")
    assert broken == 0
    for name in rows:
        browser.execute_script(f"document.querySelector('tr.rank[data-class=\"{name}\"]').click()")
        visible = browser.execute_script(
            "return [...document.querySelectorAll('.card')].filter(c => c.style.display !== 'none').map(c => c.dataset.name)")
        assert sorted(visible) == [f"{name}_seed0", f"{name}_seed1"]
