"""How faithful the shapes world's diffusion model is, judged by ground truth.

For every (shape, colour, background) combination and a few seeds, sample an image
from "a photograph of a <colour> <shape> on <background>" and check:
- shape: do `shapes:oracle`, the independently trained `shapes:oracle-2` and the
  geometric shape judge (`geometry.judge_shape`, no classifier) see the prompted shape?
- colour and background: does the renderer's colour statistics (`judge_colours`)
  read back the prompted colour and background?

    python -m digin_cli.world.evaluate [--seeds 2] [--json out.json] [--model DIR]

`--model` judges another diffusion model folder (a retrained world before it replaces
the shipped weights); the classifiers are always the built-in ones.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch

from digin_cli.engine import GuidedDDIM, SamplerConfig, initial_latents
from digin_cli.models import load_classifier, load_diffusion
from digin_cli.tasks.runtime import sampling_components
from digin_cli.world.geometry import judge_shape
from digin_cli.world.scenes import BACKGROUNDS, COLOURS, SHAPES, judge_colours

SHAPE_JUDGES = ("oracle", "oracle-2", "geometry")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()


def generation_jobs(seeds_per_prompt: int, seed_offset: int = 0) -> list[tuple[tuple[str, str, str], int]]:
    """Every (shape, colour, background) prompt with its seeds: distinct seeds per image,
    seed_offset + the prompt's index * 1000 + the repeat."""
    combos = itertools.product(SHAPES, COLOURS, BACKGROUNDS)
    return [(combo, seed_offset + index * 1000 + k) for index, combo in enumerate(combos) for k in range(seeds_per_prompt)]


@torch.no_grad()
def evaluate_generation(seeds_per_prompt: int = 2, sampler: SamplerConfig | None = None, batch: int = 32,
                        device: str = "cpu", model: str = "shapes", seed_offset: int = 0) -> dict:  # fmt: skip
    """Sample every prompt `seeds_per_prompt` times (`generation_jobs`; the bench's test
    split moves the seeds past its dev seeds with `seed_offset`) and judge each image."""
    if not 1 <= seeds_per_prompt <= 1000:
        raise ValueError(f"seeds_per_prompt must be from 1 to 1000 (1000 seeds a prompt), got {seeds_per_prompt}")
    sampler = sampler or SamplerConfig()
    components = sampling_components(load_diffusion(model), sampler)  # the sampler's spacing
    engine = GuidedDDIM(components, device=torch.device(device))
    oracles = {"oracle": load_classifier("shapes:oracle", device), "oracle-2": load_classifier("shapes:oracle-2", device)}
    jobs = generation_jobs(seeds_per_prompt, seed_offset)
    null = engine.null_embedding()
    # Per prompted shape: how often each judge sees it.
    by_shape = {shape: {judge: 0 for judge in SHAPE_JUDGES} | {"images": 0} for shape in SHAPES}
    colour_ok = background_ok = 0
    started = time.perf_counter()
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        prompts = [f"a photograph of a {c} {s} on {b}" for (s, c, b), _ in chunk]
        seeds = [seed for _, seed in chunk]
        images = engine.sample(
            initial_latents(components, seeds), engine.encode_text(prompts), null.expand(len(chunk), -1, -1), sampler
        )  # (B, 3, 64, 64)
        predicted = {name: oracle(images).argmax(dim=1).tolist() for name, oracle in oracles.items()}
        for i, (((shape, colour, background), _), image) in enumerate(zip(chunk, to_uint8(images))):
            seen = {name: SHAPES[predicted[name][i]] for name in oracles} | {"geometry": judge_shape(image).shape}
            by_shape[shape]["images"] += 1
            for judge in SHAPE_JUDGES:
                by_shape[shape][judge] += seen[judge] == shape
            judged = judge_colours(image)
            colour_ok += judged.colour == colour
            background_ok += judged.background == background
    n = len(jobs)
    shape_ok = {judge: sum(counts[judge] for counts in by_shape.values()) for judge in SHAPE_JUDGES}
    return {
        "images": n,
        "shape_recognised_by_oracle": shape_ok["oracle"] / n,
        "shape_recognised_by_oracle_2": shape_ok["oracle-2"] / n,
        "shape_recognised_by_geometry": shape_ok["geometry"] / n,
        "recognised": shape_ok,  # images whose prompted shape each judge sees
        "by_shape": by_shape,
        "colour_correct": colour_ok / n,
        "colours_correct": colour_ok,
        "backgrounds_correct": background_ok,
        "background_correct": background_ok / n,
        "sampler": {"num_steps": sampler.num_steps, "guidance_scale": sampler.guidance_scale,
                    "spacing": engine.components.scheduler.config.timestep_spacing},
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2, help="images per (shape, colour, background) prompt")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--model", default="shapes", help="the diffusion model to judge (default: the built-in)")
    args = parser.parse_args()
    result = evaluate_generation(args.seeds, model=args.model)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
