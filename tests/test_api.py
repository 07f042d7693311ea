"""The Python API: the README's notebook example runs as written, results carry images and
figures, models pass in loaded, out= is optional, errors are DiginError."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

import digin_cli as digin
from digin_cli.models.builtin import shapes_classifier_meta

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    section = README.read_text().split("## Python API (notebooks)", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_notebook_example_runs(capsys):
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    run, grass = namespace["run"], namespace["grass"]
    printed = capsys.readouterr().out
    assert len(run) == 2 and [item.record["input"]["seed"] for item in run] == [0, 1]
    assert run.out is None and run.report is None, "without out= nothing stays on disk"
    for item in run:
        assert isinstance(item.after_image, Image.Image) and item.after_image.size == (64, 64)
        assert item.history[item.best_step]["p_f"] == item.after["p_f"]
        assert f"{item.name} p_f {item.before['p_f']} -> {item.after['p_f']} | p_g {item.after['p_g']}" in printed
    documented = shapes_classifier_meta("background-biased")["background_neuron"]["index"]
    assert grass.header["config"]["neuron"] == documented and grass.header["config"]["prompt"] == "a photograph of a red circle on sand"
    assert grass[0].after["activation"] >= grass[0].before["activation"], "the kept iterate is never worse than the start"


def test_api_writes_the_run_folder_and_report_with_out(tmp_path):
    out = tmp_path / "run"
    run = digin.disagree("tiny:f", "tiny:g", "circle", model="tiny", num_images=1, ddim_steps=3, steps=1,
                         loss_steps=1, cutouts=2, device="cpu", out=out, progress=False)  # fmt: skip
    assert run.out == out and run.report == out / "index.html" and run.report.is_file()
    record = json.loads((out / f"{run[0].name}.json").read_text())
    assert record == run[0].record, "the API returns the very record the folder holds"
    assert set(run[0].images) == set(record["files"])


def test_api_takes_loaded_models_and_gives_real_image_results(tmp_path):
    tiny = digin.load_model("tiny")
    classifier = digin.load_classifier("tiny:f")
    image = Path(__file__).resolve().parent.parent / "sample_images" / "chelsea.png"
    run = digin.uvce(image, classifier, target="circle", source_class="bar", model=tiny, ddim_steps=3, steps=1,
                     loss_steps=1, cutouts=2, device="cpu", progress=False)  # fmt: skip
    item = run[0]
    assert run.header["config"]["classifier"] == "tiny:f" and run.header["config"]["model"] == tiny.source
    assert item.record["classes"] == {"source": "bar", "target": "circle"}
    assert item.mask.size == item.reconstruction.size == item.after_image.size == (64, 64)
    assert item.images["counterfactual"] is item.after_image


def test_api_errors_are_the_clis(tmp_path):
    with pytest.raises(digin.DiginError, match="unknown class 'hexagon'"):
        digin.disagree("tiny:f", "tiny:g", "hexagon", model="tiny", device="cpu", progress=False)
    with pytest.raises(TypeError, match="unknown option.*stepz"):
        digin.disagree("tiny:f", "tiny:g", "circle", model="tiny", device="cpu", progress=False, stepz=3)


def test_api_and_cli_share_defaults():
    from digin_cli import api
    from digin_cli.cli.options import DEFAULT_MODEL as CLI_DEFAULT
    from digin_cli.models import DEFAULT_MODEL

    assert api.DEFAULT_MODEL == CLI_DEFAULT == DEFAULT_MODEL
