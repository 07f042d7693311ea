"""Gradient checkpointing keeps memory flat in the number of DDIM steps.

Each measurement runs in its own process: peak RSS (VmHWM, reset just before the
optimization starts) minus the RSS at that moment. A control run without checkpointing shows that the
measurement is sensitive enough to see growth when there is some.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from digin_cli.models import load_diffusion
    from digin_cli.engine import GuidedDDIM, OptimConfig, SamplerConfig, initial_latents
    from digin_cli.objectives import ObjectiveOutput

    folder, steps, use_checkpoint = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    components = load_diffusion(folder)
    engine = GuidedDDIM(components)
    z_T = initial_latents(components, [0, 1])
    prompt = engine.encode_text(["a photograph of a circle"] * 2)
    null = engine.encode_text([""] * 2)

    def brightness(inputs):  # a cheap objective: the chain, not the classifier, is measured
        return ObjectiveOutput(loss=inputs.views.mean(dim=(1, 2, 3, 4)))

    def status_kib(field):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))

    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak-RSS mark: loading must not count
    before = status_kib("VmRSS")
    engine.optimize(
        brightness, z_T, prompt, null, SamplerConfig(num_steps=steps),
        OptimConfig(steps=1, loss_steps=1, num_cutouts=2, gradient_checkpointing=use_checkpoint),
    )
    peak = status_kib("VmHWM")
    print(json.dumps({"growth_kib": max(peak - before, 1)}))
    """
)


def peak_growth(folder, steps: int, use_checkpoint: bool) -> int:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder), str(steps), "1" if use_checkpoint else "0"],
        capture_output=True,
        text=True,
        check=True,
        # A fixed mmap threshold makes glibc return large freed blocks at once, so the
        # peak RSS follows the tensors that are alive rather than heap fragmentation.
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_kib"]


def test_peak_memory_is_flat_in_ddim_steps(tiny_folder):
    T = 10
    checkpointed = peak_growth(tiny_folder, T, True), peak_growth(tiny_folder, 4 * T, True)
    stored = peak_growth(tiny_folder, T, False), peak_growth(tiny_folder, 4 * T, False)
    # Control: storing every step's activations grows clearly with 4x the steps...
    assert stored[1] > 2.0 * stored[0], stored
    # ...while per-call checkpointing grows by well under 2x.
    assert checkpointed[1] < 1.5 * checkpointed[0], checkpointed


def test_auto_checkpointing_follows_the_measured_activations_and_changes_no_value(tiny_components, monkeypatch):
    """Auto: the chain is checkpointed only where T x one step's saved activations (plus the
    loss decodes') would take more than the budget's share of the available memory; either
    way the optimization computes the same values."""
    import torch

    from digin_cli.engine import GuidedDDIM, OptimConfig, SamplerConfig, configs, guided_ddim, initial_latents
    from digin_cli.objectives import ObjectiveOutput

    z_T = initial_latents(tiny_components, [0, 1])

    def brightness(inputs):
        return ObjectiveOutput(loss=inputs.views.mean(dim=(1, 2, 3, 4)))

    used = []
    original = guided_ddim.GuidedDDIM.run_chain

    def spy(self, *args, **kwargs):
        used.append(kwargs.get("use_checkpoint", False))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(guided_ddim.GuidedDDIM, "run_chain", spy)
    results = {}
    for label, budget in (("small budget", 1e-9), ("default budget", configs.CHECKPOINT_MEMORY_SHARE)):
        monkeypatch.setattr(guided_ddim, "CHECKPOINT_MEMORY_SHARE", budget)
        engine = GuidedDDIM(tiny_components)  # a run plans its memory once: a new run for each budget
        prompt, null = engine.encode_text(["a photograph of a circle"] * 2), engine.null_embedding(2)
        used.clear()
        results[label] = engine.optimize(brightness, z_T, prompt, null, SamplerConfig(4),
                                         OptimConfig(steps=2, loss_steps=2, num_cutouts=2))  # fmt: skip
        # The updating passes (iterates 0 and 1) checkpoint or not; the last one is a plain forward.
        assert used == ([True, True, False] if budget < 1e-3 else [False, False, False]), label
    a, b = results["small budget"], results["default budget"]
    assert torch.allclose(a.best_images, b.best_images, atol=1e-5)
    assert all(abs(x - y) < 1e-5 for x, y in zip(a.history[-1]["loss"], b.history[-1]["loss"]))
