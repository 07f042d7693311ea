"""Runs from seeds (disagree, neuron): one image per seed, optimized `batch_size` at a time.

Each seed is an item with its own record (``records``), written as soon as its batch is
done; a rerun skips the seeds whose record is finished, and several processes
(`accelerate launch`, `torchrun`) share the seeds between them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from digin_cli.drawing import labelled_sheet
from digin_cli.engine import GuidedDDIM, OptimConfig, OptimizationResult, SamplerConfig, initial_latents
from digin_cli.errors import DiginError
from digin_cli.io import save_png
from digin_cli.tasks.records import RunFolder, item_record, open_run_folder, rounded
from digin_cli.tasks.runtime import (MEMORY_ERRORS, Progress, Shard, counted, finite_losses, item_history,
                                     out_of_memory, release_memory, run_config)


def open_seed_run(command: str, job, specific: dict[str, Any], components, optim: OptimConfig, device) -> RunFolder:
    """The run folder of a run from seeds: the task's own settings, the seeds and the batch size in its config."""
    config = run_config(job.runtime, {**specific, "seeds": job.seeds, "batch_size": job.batch_size}, components,
                        job.sampler, optim)  # fmt: skip
    return open_run_folder(job.out, command, config, device, job.runtime)


def check_seeds(seeds: list[int]) -> None:
    if not seeds:
        raise DiginError("--num-images must be at least 1")
    if len(set(seeds)) != len(seeds):
        raise DiginError("the seeds repeat; give each image its own seed")


@dataclass
class ItemWriter:
    """Writes each optimized seed: its PNGs, its sheet and its record."""

    folder: RunFolder
    command: str
    stem: str  # file name prefix, e.g. the class slug
    title: str  # sheet title; the seed is appended
    labels: Callable[[str, dict[str, float]], list[str]]  # (panel title, figures) -> label lines under the image
    classes: dict[str, str]  # the record's class names
    figures: Callable[[dict[str, float]], dict[str, Any]] = rounded  # a figures dict as the record states it
    details: dict[str, Any] = field(default_factory=dict)  # the command's own fields of every record (a scan: class_index)

    def item(self, seed: int) -> str:
        return f"{self.stem}_seed{seed}"

    def write(self, result: OptimizationResult, index: int, seed: int, prompt: str) -> dict[str, Any]:
        """Item `index` of a batch's result, optimized from `seed`."""
        name = self.item(seed)
        files = {"initial": f"{name}_init.png", "optimized": f"{name}_optimized.png", "sheet": f"{name}_sheet.png"}
        before, after = result.initial(index), result.best(index)
        best_step = result.best_steps[index]
        save_png(result.initial_images[index], self.folder.out / files["initial"])
        save_png(result.best_images[index], self.folder.out / files["optimized"])
        sheet = labelled_sheet(
            [
                (result.initial_images[index], self.labels("SD init", before)),
                (result.best_images[index], self.labels(f"optimized (step {best_step})", after)),
            ],
            title=f"{self.title}  seed {seed}",
        )
        save_png(sheet, self.folder.out / files["sheet"])
        batch = len(result.best_steps)
        record = item_record(
            self.command, name, {"seed": seed}, classes=self.classes, before=self.figures(before),
            after=self.figures(after), best_step=best_step, history=item_history(result, index), files=files,
            # Items of one batch are optimized together; each gets the batch time divided evenly.
            seconds=result.seconds / batch, prompt=prompt, batch_size=batch, **self.details,
        )  # fmt: skip
        return self.folder.write_item(record)


def _optimize_chunk(engine: GuidedDDIM, objective, prompt_emb: torch.Tensor, null_emb: torch.Tensor, chunk: list[int],
                    sampler: SamplerConfig, optim: OptimConfig, progress: Progress, cone=None) -> OptimizationResult | None:  # fmt: skip
    """One batch of seeds optimized together; None when it ran out of memory."""
    batch = len(chunk)
    progress.start(f"seed {chunk[0]}" if batch == 1 else f"seeds {chunk[0]}-{chunk[-1]}", optim.steps)
    try:
        with finite_losses():
            return engine.optimize(
                objective,
                initial_latents(engine.components, chunk),
                prompt_emb.expand(batch, -1, -1),  # (1, L, D) -> (B, L, D)
                null_emb.expand(batch, -1, -1),  # (1, L, D) -> (B, L, D)
                sampler,
                optim,
                on_step=progress.step,
                cone=cone,
            )
    except MEMORY_ERRORS:
        return None
    finally:
        progress.finish()


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
    shard: Shard | None = None,
    cone=None,
    summary_items: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Optimize one image per seed of this process's shard from `prompt`, `batch_size` at a
    time, skipping the seeds already finished; returns every seed's record on disk, in
    seed order (also those of other processes, as far as they are done). `cone`: the
    engine's Cone (--cone), or None. `summary_items`: every item of the run, in order, when the
    run has more than these seeds (a class scan), for the summary. A batch that runs
    out of memory stops the run in one line; the batches before it keep their records."""
    shard = shard or Shard.current()
    items = summary_items or [writer.item(seed) for seed in seeds]
    pending = [seed for seed in shard.take(seeds) if writer.folder.finished(writer.item(seed)) is None]
    prompt_emb = engine.encode_text([prompt])  # (1, L, D)
    null_emb = engine.null_embedding()  # (1, L, D)
    for start in range(0, len(pending), batch_size):
        chunk = pending[start : start + batch_size]
        result = _optimize_chunk(engine, objective, prompt_emb, null_emb, chunk, sampler, optim, progress, cone)
        if result is None:
            release_memory()  # outside the `except`: the batch's tensors are freed by now
            raise DiginError(f"{out_of_memory(batch_size, counted(len(chunk), 'image') + ' in one batch')}; "
                             f"the seeds done are in {writer.folder.out}, rerun to do the rest")  # fmt: skip
        for index, seed in enumerate(chunk):
            writer.write(result, index, seed, prompt)
        writer.folder.rebuild_summary(items)
    return writer.folder.rebuild_summary(items)
