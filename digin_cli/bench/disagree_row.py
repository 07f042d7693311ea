"""Row "disagree": f = shapes:oracle, g = shapes:color-biased, for every shape.

A run succeeds when the kept image ends with p_f >= 0.5 and p_g <= 0.2; it reveals the
shortcut when, in addition, the object's colour (judged from the pixels) is not the
colour planted for that shape, i.e. the colour-biased classifier fails because the
object does not wear "its" colour.
"""

from __future__ import annotations

from typing import Any

from digin_cli.bench.config import BenchConfig
from digin_cli.bench.stats import format_rate, rate
from digin_cli.io import read_rgb
from digin_cli.tasks.disagree import DisagreeJob, run_disagree
from digin_cli.tasks.runtime import Progress
from digin_cli.models.builtin import shapes_classifier_meta
from digin_cli.world.scenes import SHAPES, judge_colours

SUCCESS_P_F = 0.5  # f must see the class...
SUCCESS_P_G = 0.2  # ...and g must not


def planted_colours() -> dict[str, str]:
    """The colour each shape wears 95% of the time in shapes:color-biased's training."""
    planted = shapes_classifier_meta("color-biased")["planted"]
    return {shape: planted[shape] for shape in SHAPES}


def disagreement_row(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    planted = planted_colours()
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
            runtime=config.runtime(),
            sampler=config.sampler(),
            optim=config.optim(),
        )
        record = run_disagree(job, progress)
        runs = success = revealed = success_before = 0
        colours = []
        for item in record["items"]:
            after, before = item["after"], item["before"]
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
    rates = {
        "success": rate(totals["success"], totals["runs"]),
        "revealed_of_successes": rate(totals["revealed"], totals["success"]),
        "success_before_optimization": rate(totals["success_before"], totals["runs"]),
    }
    return {
        "row": "disagree: shapes:oracle (f) vs shapes:color-biased (g)",
        "headline": {
            "runs": str(totals["runs"]),
            "success (p_f>=0.5, p_g<=0.2)": f"{format_rate(rates['success'])}; before optimization "
                                            f"{rates['success_before_optimization']['rate']:.0%}",
            "revealed shortcut (of successes)": format_rate(rates["revealed_of_successes"]),
        },
        "rates": rates,
        "criterion": f"p_f >= {SUCCESS_P_F} and p_g <= {SUCCESS_P_G}; revealed = an object colour is seen and it is not the planted one",
        "success_rate": totals["success"] / totals["runs"],
        "revealed_share_of_successes": totals["revealed"] / totals["success"] if totals["success"] else 0.0,
        "success_rate_before_optimization": totals["success_before"] / totals["runs"],
        "runs": totals["runs"],
        "per_shape": per_shape,
    }
