"""Shared fixtures: tiny models built from configs, nothing downloaded."""

from __future__ import annotations

import os

# Before any Hugging Face import: the test session never touches the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("DIGIN_TEST_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session", autouse=True)
def digin_cache(tmp_path_factory) -> Path:
    """A fresh digin cache for the whole session, so built-ins are built by the code under test."""
    path = tmp_path_factory.mktemp("digin-cache")
    os.environ["DIGIN_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_folder(digin_cache) -> Path:
    """The built-in tiny pipeline, saved as a diffusers folder."""
    from digin_cli.models.builtin import tiny_pipeline_folder

    return tiny_pipeline_folder()


@pytest.fixture()
def tiny_components(tiny_folder):
    """Fresh components per test (tests may change the scheduler config)."""
    from digin_cli.models import load_diffusion

    return load_diffusion(str(tiny_folder))


@pytest.fixture(scope="session")
def tiny_classifiers(digin_cache):
    from digin_cli.models import load_classifier

    return load_classifier("tiny:f"), load_classifier("tiny:g")

