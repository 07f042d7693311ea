"""Row "uvce": counterfactuals between shapes on rendered scenes, explaining shapes:oracle,
judged by ground truth, an independently trained classifier (through --judge) and the
geometric shape judge."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digin_cli.bench.claims import JUDGES, claim_counts, claim_headline, claim_rates, judge_view
from digin_cli.bench.config import BenchConfig
from digin_cli.bench.scenes import as_tensor, dilate, scene_file, write_csv
from digin_cli.bench.stats import rate
from digin_cli.io import load_image
from digin_cli.metrics import masked_psnr
from digin_cli.tasks.runtime import Progress
from digin_cli.tasks.uvce import UvceJob, run_uvce
from digin_cli.world.geometry import judge_shape
from digin_cli.world.scenes import SHAPES, caption, sample_scene

UVCE_RIM_PX = 4  # the object mask is dilated by this much before "background" is judged
SCENE_FIRST_SEED = 7_000  # the dev scenes' RNG seeds: 7_000 + 100 * shape + k


def uvce_row(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Row "uvce": counterfactuals between shapes on rendered scenes, explaining shapes:oracle.

    Each scene's shape is turned into the next shape (circle -> bar -> triangle -> star
    -> circle). A run claims a flip (the record's `claimed`: the oracle's top class is the
    target); shapes:oracle-2 (never optimized against, --judge) confirms it when its top
    class is the target too (the record's `confirmed`), the geometric shape judge (no
    classifier) when it sees the target. Judged by ground truth: PSNR outside the rendered
    object mask (dilated by UVCE_RIM_PX: the new shape may be a little larger), set beside
    the null-text reconstruction's own in the same region: what the inversion already
    loses is no fault of the counterfactual.
    """
    # 1. The scenes, written as a user's folder run: one folder, a CSV with each file's
    #    class, target and ground-truth caption; --batch-size scenes share an engine batch.
    folder = config.out / "uvce"
    scenes = _write_scenes(config, folder)
    job = UvceJob(
        classifier="shapes:oracle",
        inputs=folder / "scenes",
        targets=[],
        csv_file=folder / "scenes.csv",
        out=folder / "out",
        batch_size=config.batch_size,
        runtime=config.runtime(),
        sampler=config.sampler(),
        optim=config.optim(),
        judges=JUDGES,
        cone=config.cone,
    )
    # 2. The run, then every counterfactual judged.
    result = run_uvce(job, progress)
    records = result["items"]
    judged = [_judge(job.out, record, *scenes[Path(record["input"]["file"]).stem]) for record in records]
    items = [item for item, _ in judged]
    # 3. The figures: the claims and their confirmations, and the old names of the same counts.
    counts = claim_counts(records, [item["geometry"] == item["target"] for item in items])
    runs = counts["runs"]
    median_psnr = float(np.median([background_psnr for _, background_psnr in judged]))
    median_reconstruction = float(np.median([item["reconstruction_background_psnr_db"] for item in items]))
    rates = {**claim_rates(counts), "flip": rate(counts["claimed"], runs), "oracle_2_agrees": rate(counts["confirmed"], runs),
             "shape_judge_agrees": rate(counts["confirmed_geometry"], runs)}  # fmt: skip
    return {
        "row": "uvce: shapes:oracle, each shape -> the next shape",
        "headline": {
            "runs": str(runs),
            **claim_headline(rates, "flipped (oracle's top class = target)"),
            "background PSNR (median) / the reconstruction's": f"{median_psnr:.1f} dB / {median_reconstruction:.1f} dB",
        },
        "rates": rates,
        "criterion": "claimed: the record's flip, argmax of shapes:oracle is the target; confirmed: shapes:oracle-2's argmax "
                     "(--judge) is the target too; confirmed_geometry: the geometric shape judge sees the target too; "
                     "flip, oracle_2_agrees and shape_judge_agrees are the same three counts by their earlier names; "
                     f"background: outside the rendered object mask dilated by {UVCE_RIM_PX} px, beside the null-text "
                     "reconstruction's PSNR in the same region",
        "flip_rate": counts["claimed"] / runs,
        "agreement_rate": counts["confirmed"] / runs,
        "median_background_psnr_db": round(median_psnr, 2),
        "median_reconstruction_background_psnr_db": round(median_reconstruction, 2),
        # How many runs started from each searched prompt-to-prompt start (injected steps).
        "p2p_inject_steps_taken": {str(k): n for k, n in sorted(Counter(i["p2p_inject_steps"] for i in items).items())},
        "runs": runs,
        "items": items,
    }


def scene_seeds(config: BenchConfig) -> dict[str, int]:
    """Each scene's name and RNG seed on the config's split (dev: as before the splits).
    The captions, "a photograph of a {colour} {shape} on {background}", follow from a
    scene's colour, shape and background, 16 per shape, so the splits may share one; the
    scenes themselves (pose, size, texture) are drawn from seeds they do not share."""
    return {f"{shape}_{k}": config.seed(SCENE_FIRST_SEED + 100 * SHAPES.index(shape) + k)
            for shape in config.shapes for k in range(config.uvce_seeds)}  # fmt: skip


def _write_scenes(config: BenchConfig, folder: Path) -> dict[str, tuple]:
    """The row's scenes in folder/scenes and folder/scenes.csv; name -> (scene, target, image, mask)."""
    scenes, rows = {}, [("file", "class", "target", "caption")]
    for name, seed in scene_seeds(config).items():
        shape = name.rsplit("_", 1)[0]
        target = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
        scene = sample_scene(np.random.default_rng(seed), shape=shape)
        image, mask = scene_file(folder / "scenes", scene, name)
        scenes[name] = (scene, target, image, mask)
        rows.append((f"{name}.png", shape, target, caption(scene)))
    write_csv(rows, folder / "scenes.csv")
    return scenes


@torch.no_grad()
def _judge(out: Path, record: dict, scene, target: str, image: np.ndarray, mask: np.ndarray) -> tuple[dict[str, Any], float]:
    """One counterfactual as the judges see it: the oracle's top class (the record's kept
    iterate), oracle-2's (the record's judge), the geometric judge's and the background
    PSNR (the item for bench.json, and the PSNR unrounded)."""
    counterfactual = load_image(out / record["files"]["counterfactual"], image.shape[0])[None]  # (1, 3, H, W)
    reconstruction = load_image(out / record["files"]["reconstruction"], image.shape[0])  # (3, H, W)
    background = 1 - dilate(mask, UVCE_RIM_PX)[None]  # (1, H, W)
    background_psnr = masked_psnr(counterfactual[0], as_tensor(image), background)
    drawn = judge_shape((counterfactual[0].permute(1, 2, 0) * 255).round().byte().numpy()).shape
    item = {
        "scene": scene.to_dict(), "target": target, "oracle": SHAPES[int(record["after"]["top_class"])],
        "oracle_2": judge_view(record)["after"]["top_class_name"], "geometry": drawn,
        "claimed": record["claimed"], "confirmed": record["confirmed"], "background_psnr_db": round(background_psnr, 2),
        "reconstruction_background_psnr_db": round(masked_psnr(reconstruction, as_tensor(image), background), 2),
        "inversion_psnr_db": record["inversion"]["psnr_null_text_db"],
        "p_target": record["after"]["p_target"], "p2p_inject_steps": record["p2p"]["inject_steps"],
        "json": str(out / f"{record['item']}.json"),
    }  # fmt: skip
    return item, background_psnr
