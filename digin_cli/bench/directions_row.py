"""Row "directions": neural PCA of a background-planted class of shapes:background-biased.

The background is the documented background neuron's (meta.json; grass in the shipped
world), the class the shape planted on it (triangle).
1. `digin directions` on a folder of rendered scenes of the class, its backgrounds
   balanced, as a user would hand in images of a class.
2. Which of its components is the background feature, judged by the renderer's ground
   truth on fresh scenes of every shape and background (never the folder's): a component
   is that feature when its activation separates the background from the other
   backgrounds by a large margin (ROC AUC >= 0.95 and Cohen's d >= 2, that background higher).
3. That component maximized by `digin neuron --direction` from scenes off the background:
   does the background turn to it (judged from the pixels)?
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from digin_cli.bench.config import BenchConfig
from digin_cli.bench.neuron_row import neuron_runs
from digin_cli.bench.scenes import as_tensor, scene_file
from digin_cli.bench.stats import format_rate, rate
from digin_cli.io import load_vector_file
from digin_cli.models import load_classifier
from digin_cli.models.builtin import shape_planted_with, shapes_classifier_meta
from digin_cli.tasks.directions import DirectionsJob, run_directions
from digin_cli.tasks.runtime import Progress, RuntimeOptions
from digin_cli.world.scenes import BACKGROUNDS, SHAPES, render, sample_scene

CLASSIFIER = "shapes:background-biased"
TOP_COMPONENTS = 3  # the planted feature must be among the first three
MIN_AUC = 0.95
MIN_COHENS_D = 2.0
FOLDER_SEED, HELD_OUT_SEED = 1901, 1902  # the dev split's scene RNG seeds (BenchConfig.seed moves them on test)


def directions_row(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    meta = shapes_classifier_meta("background-biased")
    background = meta["background_neuron"]["background"]
    class_name = shape_planted_with(meta, background)
    folder = config.out / "directions"

    # 1. The class's images, backgrounds balanced, and their components.
    rng = np.random.default_rng(config.seed(FOLDER_SEED))
    per_background = config.directions_images // len(BACKGROUNDS)
    for where in BACKGROUNDS:
        for i in range(per_background):
            scene_file(folder / "images", sample_scene(rng, shape=class_name, background=where), f"{where}-{i:03d}")
    job = DirectionsJob(classifier=CLASSIFIER, class_name=class_name, folder=folder / "images", out=folder / "components",
                        components=10, runtime=RuntimeOptions(device=config.device))  # fmt: skip
    record = run_directions(job, progress)

    # 2. Each top component judged on fresh scenes of every shape and background.
    judged = _separation(record, job.out, background, config.seed(HELD_OUT_SEED))
    planted = [entry for entry in judged if entry["is_planted_feature"]]
    found = planted[0] if planted else None

    # 3. Maximizing the planted feature from scenes off its background.
    maximized = {"runs": 0}
    if found is not None:
        runs = neuron_runs(config, progress, folder / "maximize", background, maximize=True,
                           direction_file=job.out / found["direction_file"])  # fmt: skip
        turned = sum(judged_background == background for _, _, judged_background in runs)
        maximized = {
            "runs": len(runs),
            "mean_activation_before": round(float(np.mean([a0 for a0, _, _ in runs])), 4),
            "mean_activation_after": round(float(np.mean([a1 for _, a1, _ in runs])), 4),
            "raised": rate(sum(a1 > a0 for a0, a1, _ in runs), len(runs)),
            "background_turned": rate(turned, len(runs)),
        }
    headline = {
        "images": f"{record['images']} of '{class_name}' ({per_background} per background)",
        f"{background} feature among the top {TOP_COMPONENTS}": (
            f"yes: component {found['component']} ({100 * found['explained_variance']:.0f}% of the variance; "
            f"AUC {found['auc']:.3f}, d {found['cohens_d']:.1f})" if found else "no"
        ),
    }
    if found is not None:
        headline[f"maximized off {background}: background turned to {background}"] = format_rate(maximized["background_turned"])
    return {
        "row": f"directions: neural PCA of '{class_name}' in {CLASSIFIER}",
        "headline": headline,
        "criterion": f"the {background} feature = a component among the top {TOP_COMPONENTS} whose activation on fresh rendered "
                     f"scenes separates {background} from the other backgrounds with ROC AUC >= {MIN_AUC} and Cohen's d >= "
                     f"{MIN_COHENS_D} ({background} higher); maximized with `digin neuron --direction` from scenes off "
                     f"{background}: background judged as {background} from the pixels",
        "class_name": class_name,
        "background": background,
        "components": judged,
        "planted_component": found["component"] if found else None,
        "rates": {"background_turned": maximized["background_turned"]} if found else {},
        "maximize": maximized,
    }


@torch.no_grad()
def _separation(record: dict, components_folder: Path, background: str, seed: int) -> list[dict]:
    """Per top component: how its activation separates `background` on fresh scenes (drawn from `seed`)."""
    classifier = load_classifier(CLASSIFIER)
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, shape=shape, background=where) for where in BACKGROUNDS for shape in SHAPES for _ in range(8)]
    images = torch.stack([as_tensor(render(scene)[0]) for scene in scenes])  # (N, 3, 64, 64)
    features = classifier.features(images)  # (N, D)
    on = np.array([scene.background == background for scene in scenes])
    judged = []
    for entry in record["components"][:TOP_COMPONENTS]:
        direction = load_vector_file(components_folder / entry["direction_file"]).float()  # (D,)
        alpha = (features @ direction).numpy() - entry["direction_offset"]  # (N,)
        auc = _auc(alpha[on], alpha[~on])
        pooled = np.sqrt((alpha[on].var(ddof=1) + alpha[~on].var(ddof=1)) / 2)
        cohens_d = float((alpha[on].mean() - alpha[~on].mean()) / max(pooled, 1e-12))
        judged.append({
            "component": entry["component"],
            "explained_variance": entry["explained_variance"],
            "direction_file": entry["direction_file"],
            "auc": round(auc, 4),
            "cohens_d": round(cohens_d, 3),
            f"mean_alpha_on_{background}": round(float(alpha[on].mean()), 4),
            f"mean_alpha_off_{background}": round(float(alpha[~on].mean()), 4),
            "is_planted_feature": auc >= MIN_AUC and cohens_d >= MIN_COHENS_D,
        })
    return judged


def _auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC: the chance a positive scores above a negative (ties count half)."""
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)
