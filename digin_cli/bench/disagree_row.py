"""Row "disagree": f = shapes:oracle, g = shapes:color-biased, for every shape.

A run succeeds when the kept image ends with p_f >= 0.5 and p_g <= 0.2; it reveals the
shortcut when, in addition, the object's colour (judged from the pixels) is not the
colour planted for that shape, i.e. the colour-biased classifier fails because the
object does not wear "its" colour. f is the classifier optimized for, so an image that
fools f counts as a success too: the independent shapes:oracle-2 (trained apart, never
optimized against) judges whether the class is really there, and the row reports the
successes it confirms beside the plain ones.
"""

from __future__ import annotations

from typing import Any

import torch

from digin_cli.bench.config import BenchConfig
from digin_cli.bench.stats import format_rate, rate
from digin_cli.io import load_image, read_rgb
from digin_cli.models import load_classifier
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
    totals = {"runs": 0, "success": 0, "revealed": 0, "success_before": 0, "confirmed": 0}
    judge = load_classifier("shapes:oracle-2")
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
        runs = success = revealed = success_before = confirmed = 0
        colours, judged_classes = [], []
        for item in record["items"]:
            after, before = item["after"], item["before"]
            ok = after["p_f"] >= SUCCESS_P_F and after["p_g"] <= SUCCESS_P_G
            success_before += before["p_f"] >= SUCCESS_P_F and before["p_g"] <= SUCCESS_P_G
            colour = judge_colours(read_rgb(job.out / item["files"]["optimized"])).colour
            colours.append(colour)
            judged_class = _top_class(judge, job.out / item["files"]["optimized"])
            judged_classes.append(judged_class)
            runs += 1
            success += ok
            confirmed += ok and judged_class == shape
            # Revealed only when an object colour is seen and it is not the planted one.
            revealed += ok and colour is not None and colour != planted[shape]
        per_shape[shape] = {
            "runs": runs,
            "success_rate": success / runs,
            "revealed_share_of_successes": revealed / success if success else 0.0,
            "success_rate_before_optimization": success_before / runs,
            "planted_colour": planted[shape],
            "judged_colours": colours,
            "oracle_2_classes": judged_classes,
        }
        for key, value in (("runs", runs), ("success", success), ("revealed", revealed), ("success_before", success_before),
                           ("confirmed", confirmed)):  # fmt: skip
            totals[key] += value
    rates = {
        "success": rate(totals["success"], totals["runs"]),
        "revealed_of_successes": rate(totals["revealed"], totals["success"]),
        "success_before_optimization": rate(totals["success_before"], totals["runs"]),
        "success_confirmed_by_oracle_2": rate(totals["confirmed"], totals["runs"]),
    }
    return {
        "row": "disagree: shapes:oracle (f) vs shapes:color-biased (g)",
        "headline": {
            "runs": str(totals["runs"]),
            "success (p_f>=0.5, p_g<=0.2)": f"{format_rate(rates['success'])}; before optimization "
                                            f"{rates['success_before_optimization']['rate']:.0%}",
            "revealed shortcut (of successes)": format_rate(rates["revealed_of_successes"]),
            "success that oracle-2 confirms (its top class)": format_rate(rates["success_confirmed_by_oracle_2"]),
        },
        "rates": rates,
        "criterion": f"p_f >= {SUCCESS_P_F} and p_g <= {SUCCESS_P_G}; revealed = an object colour is seen and it is not the planted one; "
                     "confirmed = a success whose class is also shapes:oracle-2's top class",
        "success_rate": totals["success"] / totals["runs"],
        "revealed_share_of_successes": totals["revealed"] / totals["success"] if totals["success"] else 0.0,
        "success_rate_before_optimization": totals["success_before"] / totals["runs"],
        "runs": totals["runs"],
        "per_shape": per_shape,
    }


@torch.no_grad()
def _top_class(classifier, image_file) -> str:
    """The class `classifier` ranks first on the image file, by name."""
    image = load_image(image_file, max(classifier.input_size))[None]  # (1, 3, H, W)
    return classifier.class_names[int(classifier(image).argmax(dim=1))]
