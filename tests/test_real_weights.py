"""Real Stable Diffusion weights, when they are already in the local Hugging Face cache.

Skipped otherwise (CI has no network and no GPU): download once with
`hf download CompVis/stable-diffusion-v1-4` and run `pytest -m real_weights`.
"""

from __future__ import annotations

import json

import pytest
from huggingface_hub import try_to_load_from_cache
from typer.testing import CliRunner

from digin_cli.cli import app
from digin_cli.models import DEFAULT_MODEL

pytestmark = pytest.mark.real_weights


def _cached(repo: str, *files: str) -> bool:
    return all(isinstance(try_to_load_from_cache(repo, name), str) for name in files)


needs_sd = pytest.mark.skipif(
    not _cached(DEFAULT_MODEL, "unet/config.json", "vae/config.json", "text_encoder/config.json"),
    reason=f"{DEFAULT_MODEL} is not in the local Hugging Face cache",
)


@needs_sd
def test_real_stable_diffusion_loads_and_runs(tmp_path):
    from digin_cli.models import load_diffusion

    components = load_diffusion(DEFAULT_MODEL)
    assert components.resolution == 512 and components.scheduler.config.prediction_type == "epsilon"
    out = tmp_path / "sd"
    args = ["disagree", "-f", "tiny:f", "-g", "tiny:g", "--class", "circle", "--out", str(out),
            "--ddim-steps", "2", "--steps", "1", "--loss-steps", "1", "--cutouts", "2", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["resolution"] == 512
