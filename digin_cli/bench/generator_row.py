"""Row "generator": does the shapes model draw what it is asked? Every (shape, colour,
background) prompt sampled with fixed seeds, the prompted shape judged by shapes:oracle,
the independently trained shapes:oracle-2 and the geometric shape judge (no classifier),
the colour and background by the renderer's colour statistics."""

from __future__ import annotations

from typing import Any

from digin_cli.bench.config import BenchConfig
from digin_cli.bench.stats import format_rate, rate
from digin_cli.tasks.runtime import Progress, resolve_device
from digin_cli.world.evaluate import SHAPE_JUDGES, evaluate_generation, generation_jobs
from digin_cli.world.scenes import BACKGROUNDS, COLOURS, SHAPES

PROMPTS = len(SHAPES) * len(COLOURS) * len(BACKGROUNDS)  # 64


def seeds_per_prompt(config: BenchConfig) -> int:
    """2 seeds a prompt (128 images) by default, 6 with --full (384)."""
    return max(2, -(-8 * config.runs // PROMPTS))


def generator_seeds(config: BenchConfig) -> list[int]:
    """The split's seeds of every image the row samples (each a seed of the split: a dev
    seed past the offset refuses)."""
    return [config.seed(seed) for _, seed in generation_jobs(seeds_per_prompt(config))]


def generator_row(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    seeds = seeds_per_prompt(config)
    generator_seeds(config)  # refuses a count whose dev seeds would reach the test split
    result = evaluate_generation(seeds, sampler=config.sampler(), device=str(resolve_device(config.device)),
                                 model=config.model, seed_offset=config.seed(0))  # fmt: skip
    n = result["images"]
    rates = {f"shape_by_{judge.replace('-', '_')}": rate(result["recognised"][judge], n) for judge in SHAPE_JUDGES}
    rates["colour"] = rate(result["colours_correct"], n)
    rates["background"] = rate(result["backgrounds_correct"], n)
    return {
        "row": f"generator: the {config.model} model, every prompt",
        "headline": {
            "images": f"{n} ({seeds} per shape x colour x background prompt)",
            "prompted shape seen by oracle / oracle-2 / shape judge": " / ".join(
                format_rate(rates[f"shape_by_{judge.replace('-', '_')}"]) for judge in SHAPE_JUDGES
            ),
            "colour / background correct": f"{format_rate(rates['colour'])} / {format_rate(rates['background'])}",
        },
        "rates": rates,
        "criterion": "the prompted shape is shapes:oracle's / shapes:oracle-2's top class / the geometric shape judge's "
                     "reading; colour and background by the renderer's colour statistics",
        "by_shape": result["by_shape"],
        # world/evaluate.py's seeds (prompt * 1000 + k), moved by the split's offset.
        "first_seed": config.seed(0),
        "runs": n,
    }
