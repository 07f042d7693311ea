"""Row "uvce": counterfactuals between shapes on rendered scenes, explaining shapes:oracle,
judged by ground truth, an independently trained classifier and the geometric shape judge."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digin_cli.bench.config import BenchConfig
from digin_cli.bench.stats import format_rate, rate
from digin_cli.bench.scenes import as_tensor, dilate, scene_file, write_csv
from digin_cli.io import load_image
from digin_cli.metrics import masked_psnr
from digin_cli.models import load_classifier
from digin_cli.tasks.runtime import Progress
from digin_cli.tasks.uvce import UvceJob, run_uvce
from digin_cli.world.geometry import judge_shape
from digin_cli.world.scenes import SHAPES, caption, sample_scene

UVCE_RIM_PX = 4  # the object mask is dilated by this much before "background" is judged


def uvce_row(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Row "uvce": counterfactuals between shapes on rendered scenes, explaining shapes:oracle.

    Each scene's shape is turned into the next shape (circle -> bar -> triangle -> star
    -> circle). Judged by ground truth: flip rate (the oracle's top class is the target),
    PSNR outside the rendered object mask (dilated by UVCE_RIM_PX: the new shape may be a
    little larger), and the share of counterfactuals where an independently trained
    classifier (shapes:oracle-2, never optimized against) also sees the target shape, and
    where the geometric shape judge (no classifier) does. The background PSNR is set
    beside the null-text reconstruction's own, in the same region: what the inversion
    already loses is no fault of the counterfactual.
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
    )
    # 2. The run, then every counterfactual judged.
    result = run_uvce(job, progress)
    judges = load_classifier("shapes:oracle"), load_classifier("shapes:oracle-2")
    judged = [_judge(job.out, record, *scenes[Path(record["input"]["file"]).stem], *judges) for record in result["items"]]
    items = [item for item, _ in judged]
    # 3. The figures.
    runs = len(items)
    flipped = sum(item["oracle"] == item["target"] for item in items)
    agreed = sum(item["oracle"] == item["target"] == item["oracle_2"] for item in items)
    drawn = sum(item["oracle"] == item["target"] == item["geometry"] for item in items)
    median_psnr = float(np.median([background_psnr for _, background_psnr in judged]))
    median_reconstruction = float(np.median([item["reconstruction_background_psnr_db"] for item in items]))
    rates = {"flip": rate(flipped, runs), "oracle_2_agrees": rate(agreed, runs), "shape_judge_agrees": rate(drawn, runs)}
    return {
        "row": "uvce: shapes:oracle, each shape -> the next shape",
        "headline": {
            "runs": str(runs),
            "flip rate (oracle's top class = target)": format_rate(rates["flip"]),
            "oracle-2 agrees (real change)": format_rate(rates["oracle_2_agrees"]),
            "shape judge agrees (geometry, no classifier)": format_rate(rates["shape_judge_agrees"]),
            "background PSNR (median) / the reconstruction's": f"{median_psnr:.1f} dB / {median_reconstruction:.1f} dB",
        },
        "rates": rates,
        "criterion": f"flip: argmax of shapes:oracle is the target; agree: shapes:oracle-2 too / the geometric shape judge "
                     f"too; background: outside the rendered object mask dilated by {UVCE_RIM_PX} px, beside the null-text "
                     "reconstruction's PSNR in the same region",
        "flip_rate": flipped / runs,
        "agreement_rate": agreed / runs,
        "median_background_psnr_db": round(median_psnr, 2),
        "median_reconstruction_background_psnr_db": round(median_reconstruction, 2),
        # How many runs started from each searched prompt-to-prompt start (injected steps).
        "p2p_inject_steps_taken": {str(k): n for k, n in sorted(Counter(i["p2p_inject_steps"] for i in items).items())},
        "runs": runs,
        "items": items,
    }


def _write_scenes(config: BenchConfig, folder: Path) -> dict[str, tuple]:
    """The row's scenes in folder/scenes and folder/scenes.csv; name -> (scene, target, image, mask)."""
    scenes, rows = {}, [("file", "class", "target", "caption")]
    for shape in config.shapes:
        target = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
        for seed in range(config.uvce_seeds):
            scene = sample_scene(np.random.default_rng(7_000 + 100 * SHAPES.index(shape) + seed), shape=shape)
            name = f"{shape}_{seed}"
            image, mask = scene_file(folder / "scenes", scene, name)
            scenes[name] = (scene, target, image, mask)
            rows.append((f"{name}.png", shape, target, caption(scene)))
    write_csv(rows, folder / "scenes.csv")
    return scenes


@torch.no_grad()
def _judge(out: Path, record: dict, scene, target: str, image: np.ndarray, mask: np.ndarray, oracle,
           second) -> tuple[dict[str, Any], float]:  # fmt: skip
    """One counterfactual as the judges see it: both oracles' top class and the background PSNR
    (the item for bench.json, and the PSNR unrounded)."""
    counterfactual = load_image(out / record["files"]["counterfactual"], image.shape[0])[None]  # (1, 3, H, W)
    top_oracle = int(oracle(counterfactual).argmax(dim=1))
    top_second = int(second(counterfactual).argmax(dim=1))
    reconstruction = load_image(out / record["files"]["reconstruction"], image.shape[0])  # (3, H, W)
    background = 1 - dilate(mask, UVCE_RIM_PX)[None]  # (1, H, W)
    background_psnr = masked_psnr(counterfactual[0], as_tensor(image), background)
    drawn = judge_shape((counterfactual[0].permute(1, 2, 0) * 255).round().byte().numpy()).shape
    item = {
        "scene": scene.to_dict(), "target": target, "oracle": SHAPES[top_oracle], "oracle_2": SHAPES[top_second],
        "geometry": drawn, "background_psnr_db": round(background_psnr, 2),
        "reconstruction_background_psnr_db": round(masked_psnr(reconstruction, as_tensor(image), background), 2),
        "inversion_psnr_db": record["inversion"]["psnr_null_text_db"],
        "p_target": record["after"]["p_target"], "p2p_inject_steps": record["p2p"]["inject_steps"],
        "json": str(out / f"{record['item']}.json"),
    }  # fmt: skip
    return item, background_psnr
