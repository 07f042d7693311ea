"""Runs from seeds (disagree, neuron): one image per seed, optimized `batch_size` at a time,
each written as it is done, with the run record kept current after every batch."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from digin_cli.drawing import labelled_sheet
from digin_cli.engine import GuidedDDIM, OptimConfig, OptimizationResult, SamplerConfig, initial_latents
from digin_cli.errors import DiginError
from digin_cli.io import save_png, write_json
from digin_cli.tasks.runtime import Progress, item_history, run_config, started_at, versions


def check_seeds(seeds: list[int]) -> None:
    if not seeds:
        raise DiginError("--num-images must be at least 1")


def new_record(
    command: str, device: torch.device, job, resolution: int, optim: OptimConfig, specific: dict[str, Any]
) -> dict[str, Any]:
    """The run record: what ran where, with the whole config, before any image is added.

    `job` is any job with runtime, seeds, batch_size and sampler; `specific` holds the
    command's own settings.
    """
    config = run_config(
        job.runtime, {**specific, "seeds": job.seeds, "batch_size": job.batch_size}, resolution, job.sampler, optim
    )
    return {
        "command": command,
        "started": started_at(),
        "versions": versions(),
        "device": str(device),
        "config": config,
        "images": [],
        "seconds": 0.0,
    }


@dataclass
class ItemWriter:
    """Writes each optimized item (PNGs, sheet, its JSON entry) and keeps the run record current."""

    out: Any  # Path: the output folder
    stem: str  # file name prefix, e.g. the class slug
    title: str  # sheet title; the seed is appended
    labels: Callable[[str, dict[str, float]], list[str]]  # (panel title, metrics) -> label lines under the image
    record: dict[str, Any]
    record_path: Any  # Path of the run's JSON record
    started: float

    def write(self, result: OptimizationResult, item: int, seed: int, prompt: str) -> None:
        stem = f"{self.stem}_seed{seed}"
        files = {"initial": f"{stem}_init.png", "optimized": f"{stem}_optimized.png", "sheet": f"{stem}_sheet.png"}
        before, after = result.initial(item), result.best(item)
        best_step = result.best_steps[item]
        save_png(result.initial_images[item], self.out / files["initial"])
        save_png(result.best_images[item], self.out / files["optimized"])
        sheet = labelled_sheet(
            [
                (result.initial_images[item], self.labels("SD init", before)),
                (result.best_images[item], self.labels(f"optimized (step {best_step})", after)),
            ],
            title=f"{self.title}  seed {seed}",
        )
        save_png(sheet, self.out / files["sheet"])
        self.record["images"].append(
            {
                "seed": seed,
                "prompt": prompt,
                "files": files,
                "initial": {k: round(v, 6) for k, v in before.items()},
                "optimized": {k: round(v, 6) for k, v in after.items()},
                "best_step": best_step,
                "history": item_history(result, item),
                # Items of one batch are optimized together; each gets the batch time divided evenly.
                "seconds": round(result.seconds / len(result.best_steps), 3),
            }
        )

    def flush(self) -> None:
        self.record["seconds"] = round(time.perf_counter() - self.started, 3)
        # Rewritten after every batch: a long run that stops keeps a valid record of what is done.
        write_json(self.record, self.record_path)
        self.record["json"] = str(self.record_path)


def optimize_seeds(
    engine: GuidedDDIM,
    objective,
    prompt: str,
    seeds: list[int],
    batch_size: int,
    sampler: SamplerConfig,
    optim: OptimConfig,
    progress: Progress,
    writer: ItemWriter,
) -> None:
    """Optimize one image per seed from `prompt`, `batch_size` at a time, writing as it goes."""
    prompt_emb = engine.encode_text([prompt])  # (1, L, D)
    null_emb = engine.encode_text([""])  # (1, L, D)
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        batch = len(chunk)
        progress.start(f"seed {chunk[0]}" if batch == 1 else f"seeds {chunk[0]}-{chunk[-1]}", optim.steps)
        result = engine.optimize(
            objective,
            initial_latents(engine.components, chunk),
            prompt_emb.expand(batch, -1, -1),
            null_emb.expand(batch, -1, -1),
            sampler,
            optim,
            on_step=progress.step,
        )
        progress.finish()
        for item, seed in enumerate(chunk):
            writer.write(result, item, seed, prompt)
        writer.flush()
