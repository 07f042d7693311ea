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
from digin_cli.world.scenes import SHAPES, judge_colours

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
            revealed += ok and colour != planted[shape]
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
    return {
        "row": "disagree: shapes:oracle (f) vs shapes:color-biased (g)",
        "criterion": f"p_f >= {SUCCESS_P_F} and p_g <= {SUCCESS_P_G}; revealed = object colour is not the planted one",
        "success_rate": totals["success"] / totals["runs"],
        "revealed_share_of_successes": totals["revealed"] / totals["success"] if totals["success"] else 0.0,
        "success_rate_before_optimization": totals["success_before"] / totals["runs"],
        "runs": totals["runs"],
        "per_shape": per_shape,
    }


def run_bench(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    rows = [disagreement_row(config, progress)]
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
