"""The quality benchmark on the shapes world: does digin find what is really there?

Every row runs a subcommand on the built-in shapes world with fixed seeds and judges
the result by ground truth (the renderer's colour statistics, the planted biases),
never by the classifiers being explained alone.

Row "disagree": f = shapes:oracle, g = shapes:color-biased, for every shape. A run
succeeds when the kept image ends with p_f >= 0.5 and p_g <= 0.2; it reveals the
shortcut when, in addition, the object's colour (judged from the pixels) is not the
colour planted for that shape, i.e. the colour-biased classifier fails because the
object does not wear "its" colour.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digin_cli.engine import OptimConfig, SamplerConfig
from digin_cli.io import read_rgb, write_json
from digin_cli.runs import DisagreeJob, Progress, RuntimeOptions, run_disagree
from digin_cli.world.scenes import BACKGROUNDS, COLOURS, SHAPES, judge_colours

SUCCESS_P_F = 0.5  # f must see the class...
SUCCESS_P_G = 0.2  # ...and g must not


@dataclass
class BenchConfig:
    out: Path
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    seeds_per_shape: int = 4
    steps: int = 20  # optimization steps, as in the paper
    ddim_steps: int = 20
    batch_size: int = 4
    device: str = "auto"


def _planted_colours() -> dict[str, str]:
    from digin_cli.models.builtin import shapes_classifier_meta

    planted = shapes_classifier_meta("color-biased")["planted"]
    return {shape: planted[shape] for shape in SHAPES}


def disagreement_row(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    planted = _planted_colours()
    per_shape = {}
    totals = {"runs": 0, "success": 0, "revealed": 0, "success_before": 0}
    for shape in config.shapes:
        job = DisagreeJob(
            classifier_f="shapes:oracle",
            classifier_g="shapes:color-biased",
            class_name=shape,
            out=config.out / "disagree" / shape,
            seeds=list(range(config.seeds_per_shape)),
            batch_size=config.batch_size,
            runtime=RuntimeOptions(model="shapes", device=config.device),
            sampler=SamplerConfig(num_steps=config.ddim_steps),
            optim=OptimConfig(steps=config.steps),
        )
        record = run_disagree(job, progress)
        runs = success = revealed = success_before = 0
        colours = []
        for item in record["images"]:
            after, before = item["optimized"], item["initial"]
            ok = after["p_f"] >= SUCCESS_P_F and after["p_g"] <= SUCCESS_P_G
            success_before += before["p_f"] >= SUCCESS_P_F and before["p_g"] <= SUCCESS_P_G
            colour = judge_colours(read_rgb(job.out / item["files"]["optimized"])).colour
            colours.append(colour)
            runs += 1
            success += ok
            # Revealed only when an object colour is seen and it is not the planted one.
            revealed += ok and colour is not None and colour != planted[shape]
        per_shape[shape] = {
            "runs": runs,
            "success_rate": success / runs,
            "revealed_share_of_successes": revealed / success if success else 0.0,
            "success_rate_before_optimization": success_before / runs,
            "planted_colour": planted[shape],
            "judged_colours": colours,
        }
        for key, value in (("runs", runs), ("success", success), ("revealed", revealed), ("success_before", success_before)):
            totals[key] += value
    success_rate = totals["success"] / totals["runs"]
    revealed_share = totals["revealed"] / totals["success"] if totals["success"] else 0.0
    before_rate = totals["success_before"] / totals["runs"]
    return {
        "row": "disagree: shapes:oracle (f) vs shapes:color-biased (g)",
        "headline": {
            "runs": str(totals["runs"]),
            "success (p_f>=0.5, p_g<=0.2)": f"{success_rate:.0%} (before optimization {before_rate:.0%})",
            "revealed shortcut (of successes)": f"{revealed_share:.0%}",
        },
        "criterion": f"p_f >= {SUCCESS_P_F} and p_g <= {SUCCESS_P_G}; revealed = an object colour is seen and it is not the planted one",
        "success_rate": totals["success"] / totals["runs"],
        "revealed_share_of_successes": totals["revealed"] / totals["success"] if totals["success"] else 0.0,
        "success_rate_before_optimization": totals["success_before"] / totals["runs"],
        "runs": totals["runs"],
        "per_shape": per_shape,
    }


# Starting scenes for the neuron row: maximizing starts away from the neuron's background,
# minimizing starts on it. One prompt per shape, each with its own colour and background.
def _neuron_prompts(background: str, on: bool) -> list[str]:
    others = [b for b in BACKGROUNDS if b != background]
    prompts = []
    for k, (shape, colour) in enumerate(zip(SHAPES, COLOURS)):
        where = background if on else others[k % len(others)]
        prompts.append(f"a photograph of a {colour} {shape} on {where}")
    return prompts


def neuron_row(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Row "neuron": the documented background neuron of shapes:background-biased.

    Maximizing must raise its activation (ratio of mean activations after / before) and
    turn the background toward the neuron's background (judged from the pixels);
    minimizing, started on that background, must lower it.
    """
    from digin_cli.models.builtin import shapes_classifier_meta
    from digin_cli.runs import NeuronJob, run_neuron

    documented = shapes_classifier_meta("background-biased")["background_neuron"]
    index, background = documented["index"], documented["background"]
    modes = {}
    for maximize in (True, False):
        mode = "maximize" if maximize else "minimize"
        before, after, turned, lowered, runs = [], [], 0, 0, 0
        for k, prompt in enumerate(_neuron_prompts(background, on=not maximize)[: len(config.shapes)]):
            job = NeuronJob(
                classifier="shapes:background-biased",
                out=config.out / "neuron" / mode / str(k),
                seeds=list(range(config.seeds_per_shape)),
                neuron=index,
                maximize=maximize,
                prompts=[prompt],
                batch_size=config.batch_size,
                runtime=RuntimeOptions(model="shapes", device=config.device),
                sampler=SamplerConfig(num_steps=config.ddim_steps),
                optim=OptimConfig(steps=config.steps),
            )
            record = run_neuron(job, progress)
            for item in record["images"]:
                a0, a1 = item["initial"]["activation"], item["optimized"]["activation"]
                judged = judge_colours(read_rgb(job.out / item["files"]["optimized"])).background
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
        }
    up, down = modes["maximize"], modes["minimize"]
    return {
        "row": f"neuron: shapes:background-biased neuron {index} ({background})",
        "headline": {
            "runs": f"{up['runs']} max + {down['runs']} min",
            "max: activation gain": f"x{up['gain_factor']} ({up['mean_activation_before']:.2f} -> {up['mean_activation_after']:.2f})",
            f"max: background turned to {background}": f"{up['share_background_turned_to_' + background]:.0%}",
            "min: activation lowered": f"{down['share_lowered']:.0%} ({down['mean_activation_before']:.2f} -> {down['mean_activation_after']:.2f})",
        },
        "criterion": "maximize: activation gain and background judged as the neuron's; minimize: activation lowered",
        "neuron": index,
        "background": background,
        **modes,
    }


def run_bench(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    rows = [disagreement_row(config, progress), neuron_row(config, progress)]
    result = {
        "benchmark": "shapes world, judged by ground truth",
        "config": {
            "shapes": config.shapes,
            "seeds_per_shape": config.seeds_per_shape,
            "steps": config.steps,
            "ddim_steps": config.ddim_steps,
            "batch_size": config.batch_size,
        },
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(result, config.out / "bench.json")
    result["json"] = str(config.out / "bench.json")
    return result
