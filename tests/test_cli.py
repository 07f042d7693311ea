"""The command line, end to end on the built-in tiny models."""

from __future__ import annotations


import pytest
from PIL import Image
from typer.testing import CliRunner

from digin_cli.cli import app
from run_records import read_record, read_run

runner = CliRunner()

FAST = ["--ddim-steps", "4", "--steps", "2", "--loss-steps", "2", "--cutouts", "2", "--device", "cpu", "--quiet"]


def disagree(*extra: str, out) -> list[str]:
    return ["disagree", "--model", "tiny", "-f", "tiny:f", "-g", "tiny:g", "--out", str(out), *FAST, *extra]


def test_every_command_has_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in app.registered_commands:
        assert command.callback.__doc__, command.name
        sub = runner.invoke(app, [command.name or command.callback.__name__, "--help"])
        assert sub.exit_code == 0


def test_disagree_writes_pngs_and_json(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, disagree("--class", "Circle", "--num-images", "2", "--seed", "5", out=out))
    assert result.exit_code == 0, result.output
    header, items = read_run(out)
    assert header["command"] == "disagree"
    config = header["config"]
    assert config["class_name"] == "circle" and config["class_index"] == 0
    assert config["prompt"] == "a photograph of a circle"
    assert config["seeds"] == [5, 6]
    assert config["sampler"]["num_steps"] == 4 and config["optim"]["steps"] == 2
    assert {"torch", "diffusers", "timm", "open_clip", "digin"} <= set(header["versions"])
    assert [item["input"]["seed"] for item in items] == [5, 6]
    assert header["items"] == {"done": 2, "failed": 0, "claimed": sum(item["claimed"] for item in items), "confirmed": 0}
    for line in items:
        item = read_record(out, line["item"])
        assert item["classes"] == {"class": "circle"}
        assert set(item["before"]) == set(item["after"]) == {"loss", "p_f", "p_g"}
        assert [h["step"] for h in item["history"]] == [0, 1, 2]
        assert item["history"][item["best_step"]]["loss"] == item["after"]["loss"]
        assert item["seconds"] > 0
        for name in item["files"].values():
            with Image.open(out / name) as image:
                assert image.mode == "RGB"
        with Image.open(out / item["files"]["optimized"]) as image:
            assert image.size == (64, 64)
    assert header["seconds"] > 0
    assert not list(out.glob(".*part")), "no temporary files left behind"


def test_disagree_batches_like_single_runs(tmp_path):
    single = tmp_path / "single"
    batched = tmp_path / "batched"
    assert runner.invoke(app, disagree("--class", "1", "-n", "2", out=single)).exit_code == 0
    assert runner.invoke(app, disagree("--class", "1", "-n", "2", "--batch-size", "2", out=batched)).exit_code == 0
    a = read_run(single)[1]
    b = read_run(batched)[1]
    for x, y in zip(a, b):
        # Items are optimized independently, whether alone or in a batch; only float
        # reduction order differs, and the random cutouts are drawn per batch.
        assert x["before"] == pytest.approx(y["before"], abs=1e-4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--class", "hexagon"], "unknown class 'hexagon'"),
        (["--class", "circle", "--model", "/nonexistent/sd-folder"], "--model /nonexistent/sd-folder: no such folder"),
        (["--class", "circle", "--model", "./sd"], "--model ./sd: no such folder"),
        (["--class", "circle", "--guidance", "nan"], "--guidance must be at least 0, got nan"),
        (["--class", "circle", "--guidance", "inf"], "--guidance must be at least 0, got inf"),
        (["--class", "circle", "--guidance", "-1"], "--guidance must be at least 0, got -1.0"),
        (["--class", "circle", "--lr-latent", "nan"], "--lr-latent must be a positive learning rate, got nan"),
        (["--class", "circle", "-g", "timm"], "timm"),
        (["--class", "circle", "-g", "nosuchkind:abc"], "nosuchkind"),
        (["--class", "circle", "--loss-steps", "9"], "--loss-steps must be between 1 and --ddim-steps"),
        (["--class", "circle", "--device", "cuda:99"], "cuda:99"),  # no machine has 100 GPUs
        (["--class", "circle", "--dtype", "fp16", "--device", "cpu"], "needs a CUDA device; on cpu use --dtype bf16 or fp32"),
        (["--class", "circle", "--num-images", "0"], "--num-images must be at least 1"),
        (["--class", "circle", "--resolution", "0"], "--resolution must be at least 8 pixels, got 0"),
        (["--class", "circle", "--resolution=-64"], "--resolution must be at least 8 pixels, got -64"),
        (["--class", "circle", "--prompt-template", "no slot"], "must contain {}"),
    ],
)
def test_bad_input_is_one_clean_error_line(tmp_path, args, message):
    out = tmp_path / "bad"
    result = runner.invoke(app, disagree(*args, out=out))
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists(), "nothing is written when the input is bad"


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file" / "sub", "cannot be created"), (tmp_path / "file", "exists and is not a folder")):
        result = runner.invoke(app, disagree("--class", "circle", out=out))
        assert result.exit_code == 1 and result.stderr.startswith(f"Error: --out {out}") and message in result.stderr
        assert "unexpected" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unknown_class_lists_close_matches(tmp_path):
    result = runner.invoke(app, disagree("--class", "circl", out=tmp_path / "x"))
    assert result.exit_code != 0
    assert "circle" in result.stderr.split("close matches", 1)[1]


def test_missing_required_option_is_one_line():
    result = runner.invoke(app, ["disagree", "--model", "tiny"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: Missing option"), result.stderr


def test_models_lists_builtins():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "tiny" in result.output and "tiny:f" in result.output
