"""Hub models on a machine without network: one missing from the local cache fails in one
line at once, one in the cache loads; neither waits out huggingface_hub's retries (over
20 s for every file a loader asks for)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# In a fresh process: huggingface_hub reads its environment (offline mode, cache, proxies) on import.
LOADS = r"""
import json, time
import torch
from digin_cli.errors import DiginError
from digin_cli.models import load_classifier, load_diffusion
from digin_cli.models.diffusion import detect_family

loads = {
    "family": lambda: detect_family("CompVis/stable-diffusion-v1-4"),
    "model": lambda: load_diffusion("CompVis/stable-diffusion-v1-4"),
    "timm": lambda: load_classifier("timm:resnet18", torch.device("cpu")),
    "openclip": lambda: load_classifier("openclip:ViT-B-16/laion2b_s34b_b88k", torch.device("cpu")),
    # In the cache: they load, without a request to wait for.
    "cached model": lambda: load_diffusion("digin-test/tiny-sd"),
    "cached timm": lambda: load_classifier("timm:test_resnet.r160_in1k", torch.device("cpu")),
}
results = {}
for name, load in loads.items():
    start = time.monotonic()
    try:
        load()
        message = None
    except DiginError as error:
        message = str(error)
    results[name] = {"message": message, "seconds": time.monotonic() - start}
print(json.dumps(results))
"""

REPOS = {
    "family": "CompVis/stable-diffusion-v1-4",
    "model": "CompVis/stable-diffusion-v1-4",
    "timm": "timm/resnet18.a1_in1k",
    "openclip": "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
}


def no_network(tmp_path) -> dict[str, str]:
    """Online mode with an empty cache where nothing answers: the proxy and the endpoint itself
    (should a client ignore the proxy) are a closed port of this machine, so no real server is
    ever contacted."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_")) and not key.lower().endswith("_proxy")}  # fmt: skip
    closed = "http://127.0.0.1:9"
    env.update(HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=closed, HTTPS_PROXY=closed,
               HTTP_PROXY=closed, NO_PROXY="", TORCH_HOME=str(tmp_path / "torch"), OMP_NUM_THREADS="1")  # fmt: skip
    return env


def cached_snapshot(hf_home: Path, repo_id: str) -> Path:
    """The folder of a model's files in the hub cache, laid out as a download leaves it."""
    commit = "0" * 40
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def cache_models(tiny_folder: Path, hf_home: Path) -> None:
    """The tiny pipeline as a downloaded hub model, without digin.json (as most hub models);
    a timm test network's random weights as its downloaded pretrained ones."""
    import timm
    from safetensors.torch import save_file

    shutil.copytree(tiny_folder, cached_snapshot(hf_home, "digin-test/tiny-sd"), ignore=shutil.ignore_patterns("digin.json"))
    weights = cached_snapshot(hf_home, "timm/test_resnet.r160_in1k")
    weights.mkdir(parents=True)
    save_file(timm.create_model("test_resnet.r160_in1k", pretrained=False).state_dict(), weights / "model.safetensors")


def test_without_network_a_missing_model_fails_at_once_and_a_cached_one_loads(tiny_folder, tmp_path):
    cache_models(tiny_folder, tmp_path / "hf")
    done = subprocess.run([sys.executable, "-c", LOADS], env=no_network(tmp_path), capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.splitlines()[-1])
    for name, repo in REPOS.items():  # missing from the cache
        message, seconds = results[name]["message"], results[name]["seconds"]
        assert message is not None and "\n" not in message, (name, message)
        assert ": not in the local Hugging Face cache, and the hub cannot be reached" in message, message
        assert f"`hf download {repo}`" in message, message
        assert seconds < 20, f"{name}: {seconds:.1f} s, the hub's retries"
    assert "--model CompVis/stable-diffusion-v1-4" in results["model"]["message"]
    assert "checkpoint=PATH" in results["timm"]["message"]
    assert "openclip:ViT-B-16//path/to/weights" in results["openclip"]["message"]
    for name in ("cached model", "cached timm"):
        assert results[name]["message"] is None and results[name]["seconds"] < 20, (name, results[name])
