"""Row "disagree": f = shapes:oracle, g = shapes:color-biased (or `--disagree-g`), for every shape.

A run **claims** a disagreement when the kept image ends with p_f >= 0.5 and p_g <= 0.2
(the record's `claimed`, as `digin disagree` states it). f is the classifier optimized
for, so a claim may be an image that fools f alone; two judges that are not optimized
against look at it: shapes:oracle-2, independently trained, through `--judge` as a user
runs it (the record's `confirmed`: its top class is the class), and the geometric shape
judge (no classifier at all, the bench's own). A run succeeds when both confirm it.
A success reveals the shortcut when the object's colour (judged from the pixels) is not
the colour planted for that shape, i.e. the colour-biased classifier fails because the
object does not wear "its" colour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from digin_cli.bench.claims import JUDGES, add_counts, claim_counts, claim_headline, claim_rates, judge_view
from digin_cli.bench.config import BenchConfig
from digin_cli.bench.stats import format_rate, rate
from digin_cli.io import read_rgb
from digin_cli.models import load_classifier
from digin_cli.models.builtin import shapes_classifier_meta
from digin_cli.tasks.disagree import DisagreeJob, run_disagree
from digin_cli.tasks.runtime import Progress
from digin_cli.world.geometry import judge_shape
from digin_cli.world.scenes import COLOURS, SHAPES, judge_colours, sample_scene

SUCCESS_P_F = 0.5  # f must see the class... (the claim, as tasks/judges.py states it)
SUCCESS_P_G = 0.2  # ...and g must not
EXISTS_SCENES_PER_COLOUR = 100  # rendered scenes per shape and colour behind "a disagreement exists"
EXISTS_FIRST_SEED = 77_000  # their dev scene seeds: 77_000 + 10 * shape + colour
# What each shape's runs are counted by, beside claimed / confirmed / confirmed_geometry.
# "success": confirmed by both judges; "fresh_success": the successes among the runs whose
# start was not already apart by p_f and p_g (runs - success_before of them), what the
# optimization itself found (where the model draws starts that already disagree, the
# success rate counts those too).
COUNTS = ("success", "revealed", "success_before", "fresh_success")


def planted_colours() -> dict[str, str]:
    """The colour each shape wears in shapes:color-biased's training most of the time (its
    meta.json's planted_share, 97%)."""
    planted = shapes_classifier_meta("color-biased")["planted"]
    return {shape: planted[shape] for shape in SHAPES}


def disagree_seeds(config: BenchConfig) -> list[int]:
    """Each shape's generator seeds on the config's split (dev: 0, 1, ..., as before the splits).
    The prompt, "a photograph of a {class}", is shared by the splits: it is the command's
    default start (the paper's), a setting every user runs with rather than a sample of
    the world, and the shapes model knows no other wording of it."""
    return config.seeds(config.seeds_per_shape)


def disagreement_row(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    # 1. The planted colours and where a disagreement exists at all.
    planted = planted_colours()
    exists = disagreement_exists(load_classifier("shapes:oracle"), load_classifier(config.disagree_g), config.shapes,
                                 first_seed=config.seed(EXISTS_FIRST_SEED))  # fmt: skip
    # 2. Per shape: the runs, each judged.
    per_shape, totals = {}, {}
    for shape in config.shapes:
        folder = config.out / "disagree" / shape
        record = _run_shape(config, shape, folder, progress)
        counts, judged = _judge_runs(folder, record, shape, planted[shape])
        per_shape[shape] = _shape_entry(counts, judged, planted[shape], exists[shape])
        totals = add_counts(totals, counts)
    # 3. The rates over all shapes.
    rates = {
        **claim_rates(totals),
        "precision_both_judges": rate(totals["success"], totals["claimed"]),
        "success": rate(totals["success"], totals["runs"]),
        "revealed_of_successes": rate(totals["revealed"], totals["success"]),
        "f_and_g_only": rate(totals["claimed"], totals["runs"]),  # = claimed, by its name before the judges
        "success_before_optimization": rate(totals["success_before"], totals["runs"]),
        "success_from_fresh_starts": rate(totals["fresh_success"], totals["runs"] - totals["success_before"]),
    }
    return {
        "row": f"disagree: shapes:oracle (f) vs {_short(config.disagree_g)} (g)",
        "headline": _headline(rates, totals, exists, config.shapes),
        "rates": rates,
        "criterion": f"claimed = p_f >= {SUCCESS_P_F} and p_g <= {SUCCESS_P_G}; confirmed = claimed and shapes:oracle-2's "
                     "top class (--judge) is the class; confirmed_geometry = claimed and the geometric shape judge sees "
                     "the class; success = confirmed by both; revealed = a success whose object colour is seen and is "
                     "not the planted one",
        "success_rate": rates["success"]["rate"],
        "revealed_share_of_successes": rates["revealed_of_successes"]["rate"],
        "success_rate_before_optimization": rates["success_before_optimization"]["rate"],
        "runs": totals["runs"],
        "per_shape": per_shape,
        "disagreement_exists_criterion": f"share of {EXISTS_SCENES_PER_COLOUR} rendered scenes per shape and colour "
                                         f"(background and pose random) with p_f >= {SUCCESS_P_F} and p_g <= {SUCCESS_P_G}",
    }


def _headline(rates: dict[str, dict], totals: dict[str, int], exists: dict[str, dict], shapes: list[str]) -> dict[str, str]:
    return {
        "runs": str(totals["runs"]),
        **claim_headline(rates, f"p_f >= {SUCCESS_P_F} and p_g <= {SUCCESS_P_G}"),
        "success (confirmed by oracle-2 and the shape judge)": format_rate(rates["success"]),
        "revealed shortcut (of successes)": format_rate(rates["revealed_of_successes"]),
        "success from starts not already apart": format_rate(rates["success_from_fresh_starts"]),
        "claimed before optimization": format_rate(rates["success_before_optimization"]),
        "a disagreement exists (rendered scenes, by shape)": ", ".join(f"{shape} {exists[shape]['share']:.0%}" for shape in shapes),
    }


def _shape_entry(counts: dict[str, int], judged: dict[str, list], planted: str, exists: dict[str, Any]) -> dict[str, Any]:
    """One shape's figures in bench.json."""
    runs = counts["runs"]
    return {
        "runs": runs,
        **{key: counts[key] for key in ("claimed", "confirmed", "confirmed_geometry", "success")},
        "success_rate": counts["success"] / runs,
        "f_and_g_rate": counts["claimed"] / runs,
        "revealed_share_of_successes": counts["revealed"] / counts["success"] if counts["success"] else 0.0,
        "success_rate_before_optimization": counts["success_before"] / runs,
        "fresh_starts": runs - counts["success_before"],
        "successes_from_fresh_starts": counts["fresh_success"],
        "planted_colour": planted,
        "disagreement_exists_share": exists["share"],
        "disagreement_exists_by_colour": exists["by_colour"],
        **judged,
    }


def _run_shape(config: BenchConfig, shape: str, folder: Path, progress: Progress | None) -> dict[str, Any]:
    """`digin disagree --judge shapes:oracle-2` for one shape, the split's seeds, into `folder`."""
    job = DisagreeJob(
        classifier_f="shapes:oracle",
        classifier_g=config.disagree_g,
        class_name=shape,
        out=folder,
        seeds=disagree_seeds(config),
        batch_size=config.batch_size,
        runtime=config.runtime(),
        sampler=config.sampler(),
        optim=config.optim(),
        judges=JUDGES,
        cone=config.cone,
    )
    return run_disagree(job, progress)


def _judge_runs(folder: Path, record: dict[str, Any], shape: str, planted_colour: str) -> tuple[dict[str, int], dict[str, list]]:
    """One shape's runs counted (claim_counts' and COUNTS), and what the colour judge,
    oracle-2 (read from the records) and the geometric shape judge saw in each kept image."""
    items = record["items"]
    judged = {"judged_colours": [], "oracle_2_classes": [], "geometry_shapes": []}
    for item in items:
        pixels = read_rgb(folder / item["files"]["optimized"])
        judged["judged_colours"].append(judge_colours(pixels).colour)
        judged["oracle_2_classes"].append(judge_view(item)["after"]["top_class_name"])
        judged["geometry_shapes"].append(judge_shape(pixels).shape)
    geometry = [seen == shape for seen in judged["geometry_shapes"]]
    counts = {**claim_counts(items, geometry), **dict.fromkeys(COUNTS, 0)}
    for item, drawn, colour in zip(items, geometry, judged["judged_colours"]):
        ok = item.get("confirmed") is True and drawn
        before = item["before"]
        apart_before = before["p_f"] >= SUCCESS_P_F and before["p_g"] <= SUCCESS_P_G
        counts["success"] += ok
        counts["success_before"] += apart_before
        counts["fresh_success"] += ok and not apart_before
        # Revealed only when an object colour is seen and it is not the planted one.
        counts["revealed"] += ok and colour is not None and colour != planted_colour
    return counts, judged


@torch.no_grad()
def disagreement_exists(f, g, shapes: list[str], per_colour: int = EXISTS_SCENES_PER_COLOUR,
                        first_seed: int = EXISTS_FIRST_SEED) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per shape: on which share of its rendered scenes (`per_colour` of each colour,
    background and pose random, seeds from `first_seed`) f sees the shape and g does not,
    overall and by colour. The ceiling of the row's rate for that shape on in-distribution
    images: an optimizer can only find disagreements that exist."""
    from digin_cli.world.train_classifiers import render_batch

    result = {}
    for shape in shapes:
        k = SHAPES.index(shape)
        by_colour = {}
        for c, colour in enumerate(COLOURS):
            rng = np.random.default_rng(first_seed + 10 * k + c)
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

