"""Row "disagree": f = shapes:oracle, g = shapes:color-biased (or `--disagree-g`), for every shape.

A run succeeds when the kept image ends with p_f >= 0.5 and p_g <= 0.2 and two judges
that are not optimized against see the class too: the independently trained
shapes:oracle-2 (its top class) and the geometric shape judge (no classifier at all).
f is the classifier optimized for, so p_f alone also counts an image that fools f; the
row reports that looser rate beside the strict one. A success reveals the shortcut
when the object's colour (judged from the pixels) is not the colour planted for that
shape, i.e. the colour-biased classifier fails because the object does not wear "its"
colour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from digin_cli.bench.config import BenchConfig
from digin_cli.bench.stats import format_rate, rate
from digin_cli.io import load_image, read_rgb
from digin_cli.models import load_classifier
from digin_cli.tasks.disagree import DisagreeJob, run_disagree
from digin_cli.tasks.runtime import Progress
from digin_cli.models.builtin import shapes_classifier_meta
from digin_cli.world.geometry import judge_shape
from digin_cli.world.scenes import COLOURS, SHAPES, judge_colours, render, sample_scene

SUCCESS_P_F = 0.5  # f must see the class...
SUCCESS_P_G = 0.2  # ...and g must not
EXISTS_SCENES_PER_COLOUR = 100  # rendered scenes per shape and colour behind "a disagreement exists"
# What each shape's runs are counted by. "fresh_success": the confirmed successes among the
# runs whose start was not already apart by p_f and p_g (runs - success_before of them),
# what the optimization itself found (where the model draws starts that already disagree,
# the success rate counts those too).
COUNTS = ("runs", "success", "revealed", "success_before", "f_and_g", "fresh_success")


def planted_colours() -> dict[str, str]:
    """The colour each shape wears in shapes:color-biased's training most of the time (its
    meta.json's planted_share, 97%)."""
    planted = shapes_classifier_meta("color-biased")["planted"]
    return {shape: planted[shape] for shape in SHAPES}


def disagreement_row(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    # 1. The planted colours, the independent judge and where a disagreement exists at all.
    planted = planted_colours()
    judge = load_classifier("shapes:oracle-2")
    exists = disagreement_exists(load_classifier("shapes:oracle"), load_classifier(config.disagree_g), config.shapes)
    # 2. Per shape: the runs, each judged.
    per_shape = {}
    totals = dict.fromkeys(COUNTS, 0)
    for shape in config.shapes:
        folder = config.out / "disagree" / shape
        record = _run_shape(config, shape, folder, progress)
        counts, judged = _judge_runs(folder, record, shape, planted[shape], judge)
        per_shape[shape] = {
            "runs": counts["runs"],
            "success_rate": counts["success"] / counts["runs"],
            "f_and_g_rate": counts["f_and_g"] / counts["runs"],
            "revealed_share_of_successes": counts["revealed"] / counts["success"] if counts["success"] else 0.0,
            "success_rate_before_optimization": counts["success_before"] / counts["runs"],
            "fresh_starts": counts["runs"] - counts["success_before"],
            "successes_from_fresh_starts": counts["fresh_success"],
            "planted_colour": planted[shape],
            "disagreement_exists_share": exists[shape]["share"],
            "disagreement_exists_by_colour": exists[shape]["by_colour"],
            **judged,
        }
        for key in totals:
            totals[key] += counts[key]
    # 3. The rates over all shapes.
    rates = {
        "success": rate(totals["success"], totals["runs"]),
        "revealed_of_successes": rate(totals["revealed"], totals["success"]),
        "f_and_g_only": rate(totals["f_and_g"], totals["runs"]),
        "success_before_optimization": rate(totals["success_before"], totals["runs"]),
        "success_from_fresh_starts": rate(totals["fresh_success"], totals["runs"] - totals["success_before"]),
    }
    return {
        "row": f"disagree: shapes:oracle (f) vs {_short(config.disagree_g)} (g)",
        "headline": {
            "runs": str(totals["runs"]),
            "success (f and g, confirmed by oracle-2 and the shape judge)": format_rate(rates["success"]),
            "revealed shortcut (of successes)": format_rate(rates["revealed_of_successes"]),
            "success from starts not already apart": format_rate(rates["success_from_fresh_starts"]),
            "p_f>=0.5 and p_g<=0.2 alone": f"{format_rate(rates['f_and_g_only'])}; before optimization "
                                           f"{rates['success_before_optimization']['rate']:.0%}",
            "a disagreement exists (rendered scenes, by shape)": ", ".join(
                f"{shape} {exists[shape]['share']:.0%}" for shape in config.shapes
            ),
        },
        "rates": rates,
        "criterion": f"success = p_f >= {SUCCESS_P_F} and p_g <= {SUCCESS_P_G} and shapes:oracle-2's top class is the class "
                     "and the geometric shape judge sees the class; revealed = a success whose object colour is seen "
                     "and is not the planted one",
        "success_rate": rates["success"]["rate"],
        "revealed_share_of_successes": rates["revealed_of_successes"]["rate"],
        "success_rate_before_optimization": rates["success_before_optimization"]["rate"],
        "runs": totals["runs"],
        "per_shape": per_shape,
        "disagreement_exists_criterion": f"share of {EXISTS_SCENES_PER_COLOUR} rendered scenes per shape and colour "
                                         f"(background and pose random) with p_f >= {SUCCESS_P_F} and p_g <= {SUCCESS_P_G}",
    }



def _run_shape(config: BenchConfig, shape: str, folder: Path, progress: Progress | None) -> dict[str, Any]:
    """`digin disagree` for one shape, the bench's seeds, into `folder`."""
    job = DisagreeJob(
        classifier_f="shapes:oracle",
        classifier_g=config.disagree_g,
        class_name=shape,
        out=folder,
        seeds=list(range(config.seeds_per_shape)),
        batch_size=config.batch_size,
        runtime=config.runtime(),
        sampler=config.sampler(),
        optim=config.optim(),
    )
    return run_disagree(job, progress)


def _judge_runs(folder: Path, record: dict[str, Any], shape: str, planted_colour: str,
                judge) -> tuple[dict[str, int], dict[str, list]]:  # fmt: skip
    """One shape's runs counted by COUNTS, and what the colour judge, oracle-2 and the
    geometric shape judge saw in each optimized image."""
    counts = dict.fromkeys(COUNTS, 0)
    judged = {"judged_colours": [], "oracle_2_classes": [], "geometry_shapes": []}
    for item in record["items"]:
        after, before = item["after"], item["before"]
        image_file = folder / item["files"]["optimized"]
        pixels = read_rgb(image_file)
        colour = judge_colours(pixels).colour
        oracle_2_class = _top_class(judge, image_file)
        geometry_shape = judge_shape(pixels).shape
        judged["judged_colours"].append(colour)
        judged["oracle_2_classes"].append(oracle_2_class)
        judged["geometry_shapes"].append(geometry_shape)
        f_and_g = after["p_f"] >= SUCCESS_P_F and after["p_g"] <= SUCCESS_P_G
        ok = f_and_g and oracle_2_class == shape and geometry_shape == shape
        counts["runs"] += 1
        counts["f_and_g"] += f_and_g
        counts["success"] += ok
        apart_before = before["p_f"] >= SUCCESS_P_F and before["p_g"] <= SUCCESS_P_G
        counts["success_before"] += apart_before
        counts["fresh_success"] += ok and not apart_before
        # Revealed only when an object colour is seen and it is not the planted one.
        counts["revealed"] += ok and colour is not None and colour != planted_colour
    return counts, judged


@torch.no_grad()
def disagreement_exists(f, g, shapes: list[str], per_colour: int = EXISTS_SCENES_PER_COLOUR) -> dict[str, dict[str, Any]]:
    """Per shape: on which share of its rendered scenes (`per_colour` of each colour,
    background and pose random, fixed seeds) f sees the shape and g does not,
    overall and by colour. The ceiling of the row's rate for that shape on in-distribution
    images: an optimizer can only find disagreements that exist."""
    from digin_cli.world.train_classifiers import render_batch

    result = {}
    for shape in shapes:
        k = SHAPES.index(shape)
        by_colour = {}
        for c, colour in enumerate(COLOURS):
            rng = np.random.default_rng(77_000 + 10 * k + c)
            images = render_batch([sample_scene(rng, shape=shape, colour=colour) for _ in range(per_colour)])
            p_f, p_g = f(images).softmax(-1)[:, k], g(images).softmax(-1)[:, k]  # (N,) each
            by_colour[colour] = float(((p_f >= SUCCESS_P_F) & (p_g <= SUCCESS_P_G)).float().mean())
        result[shape] = {"share": sum(by_colour.values()) / len(COLOURS), "by_colour": by_colour}
    return result


def _short(spec: str) -> str:
    """A classifier spec as a row title shows it: a built-in's name, else the checkpoint's folder."""
    if spec.startswith("shapes:"):
        return spec
    checkpoint = next((part.split("=", 1)[1] for part in spec.split(",") if part.startswith("checkpoint=")), None)
    return f"{spec.split(',')[0]} from {Path(checkpoint).parent}" if checkpoint else spec


@torch.no_grad()
def _top_class(classifier, image_file) -> str:
    """The class `classifier` ranks first on the image file, by name."""
    image = load_image(image_file, max(classifier.input_size))[None]  # (1, 3, H, W)
    return classifier.class_names[int(classifier(image).argmax(dim=1))]
