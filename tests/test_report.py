"""The HTML report in a real browser: headless Chromium (Debian's chromium and chromium-driver)
driven by Selenium, the network blocked. The page loads from file://, every image resolves,
the numbers shown are the records', the filters work, and it fits a phone's width."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from digin_cli.cli import app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401

    SELENIUM = True
except ImportError:  # pragma: no cover - the test extra installs it
    SELENIUM = False

needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER and SELENIUM),
    reason="needs Chromium and its driver (apt-get install chromium chromium-driver) and Selenium (pip install selenium)",
)
runner = CliRunner()
FAST = ["--ddim-steps", "3", "--steps", "2", "--loss-steps", "1", "--cutouts", "2", "--device", "cpu", "--quiet"]
SCREENSHOTS = Path(os.environ.get("DIGIN_SCREENSHOTS", "")) if os.environ.get("DIGIN_SCREENSHOTS") else None


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["http://*", "https://*", "ws://*", "wss://*"]})
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A disagree run (two seeds) and a uvce folder run with one unreadable image."""
    root = tmp_path_factory.mktemp("report")
    disagree = root / "disagree"
    args = ["disagree", "--model", "tiny", "-f", "tiny:f", "-g", "tiny:g", "--class", "circle", "-n", "2", "--out", str(disagree), *FAST]
    assert runner.invoke(app, args).exit_code == 0
    images = root / "images"
    images.mkdir()
    sample = Path(__file__).resolve().parent.parent / "sample_images" / "chelsea.png"
    Image.open(sample).convert("RGB").resize((96, 64)).save(images / "cat.png")
    (images / "broken.png").write_text("not an image")
    uvce = root / "uvce"
    args = ["uvce", str(images), "--target", "circle", "--target", "star", "--source-class", "bar", "--model", "tiny",
            "--classifier", "tiny:f", "--out", str(uvce), *FAST]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 1  # the broken image fails alone
    return {"disagree": disagree, "uvce": uvce}


def _open(browser, page: Path, width: int = 1280, height: int = 900, screenshot: Path | None = None) -> None:
    """Load the page (a screenshot of it as a person first sees it), then every image:
    also the lazy ones and those inside closed <details>."""
    browser.set_window_size(width, height)
    browser.get_log("performance")  # drop earlier events
    browser.get(page.resolve().as_uri())
    _wait_for_images(browser, in_view=True)
    if screenshot is not None:
        browser.save_screenshot(str(screenshot))
    browser.execute_script("document.querySelectorAll('details').forEach(d => d.open = true);"
                           "document.querySelectorAll('img').forEach(i => i.loading = 'eager');")  # fmt: skip
    _wait_for_images(browser)


def _wait_for_images(browser, in_view: bool = False) -> None:
    """Until every image is loaded; with `in_view`, those a person sees now (lazy ones load on scrolling)."""
    deadline = time.monotonic() + 30
    pick = ("[...document.images].filter(i => !i.closest('details:not([open])') && i.getBoundingClientRect().top < innerHeight)"
            if in_view else "[...document.images]")  # fmt: skip
    while not browser.execute_script(f"return {pick}.every(i => i.complete)"):
        assert time.monotonic() < deadline, "images never finished loading"
        time.sleep(0.1)


def _requested(browser) -> list[str]:
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _shown_numbers(browser) -> list[tuple[str, str, str, str, float]]:
    return browser.execute_script("""
        return [...document.querySelectorAll('td.num')].map(td => [td.closest('.card').dataset.name,
            td.dataset.key, td.dataset.when, td.textContent.trim(), parseFloat(td.dataset.value)]);""")


def _record_value(record: dict, key: str, when: str) -> float:
    if when == "before":
        return record["before"][key]
    after = record["after"]
    return after[when][key] if when in after else after[key]


@needs_browser
@pytest.mark.parametrize("name", ["disagree", "uvce"])
def test_the_page_shows_the_records(browser, runs, name, tmp_path):
    folder = runs[name]
    page = folder / "index.html"
    shots = SCREENSHOTS or tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    _open(browser, page, screenshot=shots / f"{name}-desktop.png")
    # Offline and self-contained: nothing but the page's own files was asked for.
    requested = _requested(browser)
    assert requested and all(url.startswith(("file://", "data:")) for url in requested), requested
    broken = browser.execute_script("return [...document.images].filter(i => !(i.naturalWidth > 0)).map(i => i.src)")
    assert broken == [], "every image resolves"
    shown_files = set(browser.execute_script("return [...document.images].map(i => decodeURIComponent(i.src.split('/').pop()))"))
    records = {line["item"]: json.loads((folder / f"{line['item']}.json").read_text())
               for line in map(json.loads, (folder / "summary.jsonl").read_text().splitlines())}  # fmt: skip
    ok = [r for r in records.values() if r["status"] == "ok"]
    from digin_cli.report.pages import DETAILS, IMAGES

    shown_keys = [key for key, _ in IMAGES[name] + DETAILS]
    expected = {r["files"][key] for r in ok for key in shown_keys if key in r["files"]}
    assert expected <= shown_files, expected - shown_files  # before/after on the card; sheet, mask, difference, plot inside
    # Every number shown is the record's, to the three decimals shown.
    shown = _shown_numbers(browser)
    assert len(shown) >= 2 * len(ok)
    for item, key, when, text, value in shown:
        expected = _record_value(records[item], key, when)
        assert value == pytest.approx(expected, abs=1e-9) and text == f"{expected:.3f}", (item, key, when, text)
    # Failures are listed with their error, and the outcome filter shows them alone.
    failed = [r for r in records.values() if r["status"] == "failed"]
    body = browser.find_element("tag name", "body").text
    for record in failed:
        assert record["error"] in body
    if failed:
        browser.execute_script("const s=document.getElementById('outcome'); s.value='failed'; s.dispatchEvent(new Event('change'));")
        visible = browser.execute_script("return [...document.querySelectorAll('.card')].filter(c => c.style.display !== 'none').map(c => c.dataset.name)")
        assert sorted(visible) == sorted(r["item"] for r in failed)
    # A phone: the grid becomes one column, and nothing is wider than the screen.
    _open(browser, page, width=390, height=844, screenshot=shots / f"{name}-phone.png")
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")


@needs_browser
def test_report_rebuilds_a_page_and_a_bench_page(browser, runs, tmp_path):
    folder = runs["disagree"]
    (folder / "index.html").unlink()
    result = runner.invoke(app, ["report", str(folder)])
    assert result.exit_code == 0 and (folder / "index.html").is_file(), result.output
    bench = tmp_path / "bench"
    shutil.copytree(folder, bench / "disagree" / "circle")
    (bench / "bench.json").write_text(json.dumps({
        "benchmark": "test", "seconds": 1.0, "config": {"rows": ["disagree"]},
        "rows": [{"row": "disagree: f vs g", "headline": {"runs": "2"}, "criterion": "p_f >= 0.5", "seconds": 1.0}],
    }))  # fmt: skip
    assert runner.invoke(app, ["report", str(bench)]).exit_code == 0
    _open(browser, bench / "index.html")
    link = browser.find_element("link text", "disagree/circle")
    link.click()
    assert browser.current_url.endswith("disagree/circle/index.html") and "digin disagree" in browser.title


def test_report_of_a_folder_without_a_run_is_one_line(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: {tmp_path} holds no digin run")


def test_report_reads_run_folders_of_earlier_versions(tmp_path):
    """Before the record format, disagree wrote one disagree.json and uvce one JSON per item."""
    old = tmp_path / "old"
    old.mkdir()
    for name in ("circle_seed3_init.png", "circle_seed3_optimized.png", "circle_seed3_sheet.png"):
        Image.new("RGB", (64, 64), "green").save(old / name)
    (old / "disagree.json").write_text(json.dumps({
        "command": "disagree", "started": "2026-11-01T10:00:00+00:00", "versions": {"digin": "0.1.0"}, "device": "cpu",
        "config": {"class_name": "circle", "dtype": "fp32"}, "seconds": 12.0,
        "images": [{"seed": 3, "prompt": "a photograph of a circle", "best_step": 2,
                    "files": {"initial": "circle_seed3_init.png", "optimized": "circle_seed3_optimized.png",
                              "sheet": "circle_seed3_sheet.png"},
                    "initial": {"loss": 0.1, "p_f": 0.125, "p_g": 0.25}, "optimized": {"loss": -0.5, "p_f": 0.875, "p_g": 0.0625},
                    "history": [{"step": 0, "loss": 0.1, "p_f": 0.125, "p_g": 0.25}]}],
    }))  # fmt: skip
    result = runner.invoke(app, ["report", str(old)])
    assert result.exit_code == 0, result.output
    page = (old / "index.html").read_text()
    assert 'data-name="circle_seed3"' in page and "f sees it, g does not" in page
    for key, when, value in (("p_f", "before", 0.125), ("p_f", "after", 0.875), ("p_g", "after", 0.0625)):
        assert f'data-key="{key}" data-when="{when}" data-value="{value}">{value:.3f}<' in page
    assert 'src="circle_seed3_optimized.png"' in page


@needs_browser
def test_the_judges_badge_and_filter(browser, tmp_path):
    from test_judges import DISAGREE, oracle_copy

    out = tmp_path / "judged"
    result = runner.invoke(app, [*DISAGREE, "--judge", oracle_copy(), "--out", str(out)])
    assert result.exit_code == 0, result.output
    # One claim that the judge does not confirm, as a record says it; the page is rebuilt from the records.
    unconfirmed = out / "triangle_seed1.json"
    record = json.loads(unconfirmed.read_text())
    assert record["claimed"] and record["confirmed"]
    unconfirmed.write_text(json.dumps({**record, "confirmed": False, "judges_agreeing": 0}))
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    _open(browser, out / "index.html")
    badges = browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('.card')].map(c => [c.dataset.name,"
        " [...c.querySelectorAll('.badge')].map(b => b.textContent)]))")  # fmt: skip
    assert badges["triangle_seed0"][1] == "confirmed by 1 of 1 judge" and badges["triangle_seed1"][1] == "confirmed by 0 of 1 judge"
    for choice, expected in (("confirmed", ["triangle_seed0"]), ("not confirmed", ["triangle_seed1"]), ("", ["triangle_seed0", "triangle_seed1"])):
        browser.execute_script(f"const s=document.getElementById('judges'); s.value='{choice}'; s.dispatchEvent(new Event('change'));")
        visible = browser.execute_script("return [...document.querySelectorAll('.card')].filter(c => c.style.display !== 'none').map(c => c.dataset.name)")
        assert sorted(visible) == expected, choice
    assert "2 claimed, 1 confirmed by" in browser.find_element("tag name", "header").text
