"""The quality benchmark on the shapes world: does digin find what is really there?

Every row runs a subcommand on the built-in shapes world with fixed seeds and judges
the result by ground truth (the renderer's colour statistics, the planted biases),
never by the classifiers being explained alone. The rows live in a module each.
"""

from __future__ import annotations

import time
from typing import Any

from digin_cli.bench.config import ROW_NAMES, BenchConfig
from digin_cli.bench.directions_row import directions_row
from digin_cli.bench.disagree_row import disagreement_row
from digin_cli.bench.generator_row import generator_row
from digin_cli.bench.neuron_cf_row import neuron_cf_row
from digin_cli.bench.neuron_row import neuron_row
from digin_cli.bench.uvce_row import uvce_row
from digin_cli.io import remove_tree, write_json
from digin_cli.report.build import write_bench_page
from digin_cli.tasks.runtime import Progress

# The rows by the names `digin bench --rows` takes, in the order they run.
ROWS = dict(zip(ROW_NAMES, (generator_row, disagreement_row, neuron_row, uvce_row, neuron_cf_row, directions_row)))


def run_bench(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    config.check()
    started = time.perf_counter()
    chosen = [name for name in ROWS if name in config.rows]  # in the benchmark's order
    rows = []
    for name in chosen:
        # Each row owns out/<row name>: emptied first, so no scene or item of an earlier
        # bench (other seeds, other settings) is read or counted.
        remove_tree(config.out / name)
        row_started = time.perf_counter()
        rows.append({**ROWS[name](config, progress), "seconds": round(time.perf_counter() - row_started, 1)})
    result = {
        "benchmark": "shapes world, judged by ground truth",
        "config": {
            "shapes": config.shapes,
            "runs_per_rate": config.runs,
            "seeds_per_shape": config.seeds_per_shape,
            "steps": config.steps,
            "ddim_steps": config.ddim_steps,
            "spacing": config.spacing,
            "batch_size": config.batch_size,
            "neuron_seeds": config.neuron_seeds,
            "uvce_seeds": config.uvce_seeds,
            "neuron_cf_seeds": config.neuron_cf_seeds,
            "directions_images": config.directions_images,
            "rows": chosen,
            "model": config.model,
            "disagree_g": config.disagree_g,
        },
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(result, config.out / "bench.json")
    write_bench_page(config.out)  # each row's runs wrote their own pages
    result["json"] = str(config.out / "bench.json")
    return result
