"""Row "neuron": the documented background neuron of shapes:background-biased, raised from
scenes off its background and lowered on it, judged by the renderer's colour statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from digin_cli.bench.config import BenchConfig
from digin_cli.bench.stats import format_rate, rate
from digin_cli.io import read_rgb
from digin_cli.models.builtin import shapes_classifier_meta
from digin_cli.tasks.neuron import NeuronJob, run_neuron
from digin_cli.tasks.runtime import Progress
from digin_cli.world.scenes import BACKGROUNDS, COLOURS, SHAPES, judge_colours, one_start_per_shape

# The test split's starts wear other colours: shape k the colour k + 2 (a derangement of
# the dev split's colour k), and off the background the other backgrounds in another turn.
# A start is a prompt and a seed (there is no scene), so the splits share neither.
TEST_COLOUR_SHIFT = 2


def _starts(background: str, on: bool, split: str) -> list[tuple[str, str, str]]:
    """(shape, colour, background) starts, one per shape: dev's are world/scenes.py's
    one_start_per_shape (what every setting so far was tuned on), test's the same kind of
    start with no (shape, colour) pair of dev's."""
    if split == "dev":
        return one_start_per_shape(background, on)
    others = [b for b in BACKGROUNDS if b != background]
    return [(shape, COLOURS[(k + TEST_COLOUR_SHIFT) % len(COLOURS)], background if on else others[(k + 1) % len(others)])
            for k, shape in enumerate(SHAPES)]  # fmt: skip


def neuron_prompts(config: BenchConfig, background: str, on: bool) -> list[str]:
    """The neuron row's starting prompts on the config's split: one per shape (as many as
    --shapes names), each with its own colour, on `background` or off it."""
    starts = _starts(background, on, config.split)[: len(config.shapes)]
    return [f"a photograph of a {colour} {shape} on {where}" for shape, colour, where in starts]


def neuron_seeds(config: BenchConfig) -> list[int]:
    """Each starting prompt's generator seeds on the config's split (dev: 0, 1, ..., as before)."""
    return config.seeds(config.neuron_seeds)


def neuron_runs(config: BenchConfig, progress: Progress | None, out: Path, background: str, maximize: bool,
                neuron: int | None = None, direction_file: Path | None = None) -> list[tuple[float, float, str]]:  # fmt: skip
    """`digin neuron` runs of a neuron or a direction of shapes:background-biased, one job per
    starting prompt (off `background` to maximize, on it to minimize), `config.neuron_seeds`
    seeds each: (activation before, after, background judged from the pixels) per run."""
    seen = []
    for k, prompt in enumerate(neuron_prompts(config, background, on=not maximize)):
        job = NeuronJob(
            classifier="shapes:background-biased",
            out=out / str(k),
            seeds=neuron_seeds(config),
            neuron=neuron,
            direction_file=direction_file,
            maximize=maximize,
            prompts=[prompt],
            batch_size=config.batch_size,
            runtime=config.runtime(),
            sampler=config.sampler(),
            optim=config.optim(),
        )
        record = run_neuron(job, progress)
        for item in record["items"]:
            judged = judge_colours(read_rgb(job.out / item["files"]["optimized"])).background
            seen.append((item["before"]["activation"], item["after"]["activation"], judged))
    return seen


def neuron_row(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Row "neuron": the documented background neuron of shapes:background-biased.

    Maximizing must raise its activation (ratio of mean activations after / before) and
    turn the background toward the neuron's background (judged from the pixels);
    minimizing, started on that background, must lower it.
    """
    documented = shapes_classifier_meta("background-biased")["background_neuron"]
    index, background = documented["index"], documented["background"]
    modes = {}
    for maximize in (True, False):
        mode = "maximize" if maximize else "minimize"
        runs_seen = neuron_runs(config, progress, config.out / "neuron" / mode, background, maximize, neuron=index)
        before, after, turned, lowered, runs = [], [], 0, 0, 0
        for a0, a1, judged in runs_seen:
            before.append(a0)
            after.append(a1)
            runs += 1
            lowered += a1 < a0
            turned += (judged == background) if maximize else (judged != background)
        mean_before, mean_after = sum(before) / runs, sum(after) / runs
        modes[mode] = {
            "runs": runs,
            "mean_activation_before": round(mean_before, 4),
            "mean_activation_after": round(mean_after, 4),
            "gain_factor": round(mean_after / mean_before, 3) if mean_before > 0 else None,
            "share_lowered": lowered / runs,
            ("share_background_turned_to_" + background if maximize else "share_background_no_longer_" + background): turned / runs,
            "rates": {"lowered": rate(lowered, runs), "background_judged": rate(turned, runs)},
        }
    up, down = modes["maximize"], modes["minimize"]
    return {
        "row": f"neuron: shapes:background-biased neuron {index} ({background})",
        "headline": {
            "runs": f"{up['runs']} max + {down['runs']} min",
            # A factor needs a positive start (a leaky or signed unit can start at or below 0).
            "max: activation gain": ("" if up["gain_factor"] is None else f"x{up['gain_factor']} ")
            + f"({up['mean_activation_before']:.2f} -> {up['mean_activation_after']:.2f})",
            f"max: background turned to {background}": format_rate(up["rates"]["background_judged"]),
            "min: activation lowered": f"{format_rate(down['rates']['lowered'])}; {down['mean_activation_before']:.2f} -> "
                                       f"{down['mean_activation_after']:.2f}",
        },
        "criterion": "maximize: activation gain and background judged as the neuron's; minimize: activation lowered",
        "neuron": index,
        "background": background,
        **modes,
    }
