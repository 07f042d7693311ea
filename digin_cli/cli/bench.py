"""`digin bench`: parse, run the quality benchmark (or with --perf the performance one), print its table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from digin_cli.cli.app import app, call, call_with_progress, fail, stderr, stdout
from digin_cli.cli.options import (
    GUARD_OPTIONS,
    BatchOpt,
    ConeOpt,
    DeviceOpt,
    OptionGroup,
    OutOpt,
    QuietOpt,
    StepsOpt,
    _option,
    with_options,
)

PERF = "--perf (performance benchmark)"
# The performance benchmark's own options, handed to _perf as one dict.
PERF_OPTIONS = OptionGroup(
    (
        _option("perf_resolution", int | None, None, "--perf-resolution", panel=PERF,
                help="Image side of the SD-sized pipeline (default: 512 on CUDA, else 128)."),
        _option("perf_steps", int | None, None, "--perf-steps", panel=PERF,
                help="DDIM steps T (default: 20; 5 for the SD-sized pipeline on CPU)."),
        _option("repeats", int, 3, "--repeats", help="Timed repeats per figure (after one warm-up).", panel=PERF),
        _option("pipelines", str, "shapes,sd1-random,sdxl-random", "--pipelines", panel=PERF,
                help="Comma-separated pipelines: shapes, sd1-random, sdxl-random, or a model folder / hub id."),
        _option("batch_sizes", str, "1,2", "--batch-sizes", help="Comma-separated batch sizes for throughput.", panel=PERF),
        _option("feature_pipelines", str, "shapes", "--feature-pipelines", panel=PERF,
                help="Pipelines on which to time the speed features against their absence."),
        _option("few_step_pipeline", str, "sd1-random", "--few-step-pipeline", panel=PERF,
                help="Pipeline of the few-step row (1, 2, 4, 20 DDIM steps, guided and not); none: no row."),
        _option("few_step_resolution", int | None, None, "--few-step-resolution", panel=PERF,
                help="Image side of the few-step row (default: 512 on CUDA, else 64)."),
    ),  # fmt: skip
    lambda **values: values,
)


def _names(text: str | None) -> list[str] | None:
    """A comma-separated option as a list; None when the option was not given."""
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


@app.command()
@with_options(guards=GUARD_OPTIONS, perf_options=PERF_OPTIONS)
def bench(
    out: OutOpt = Path("digin-out/bench"),
    shapes: Annotated[str | None, typer.Option(help="Comma-separated shapes to run (default: all of them).")] = None,
    full: Annotated[bool, typer.Option("--full", help="48 runs behind every headline rate instead of 16 (about 3x the time).")] = False,
    runs: Annotated[int | None, typer.Option(help="Runs behind every headline rate (default: 16; 48 with --full).")] = None,
    split: Annotated[
        str, typer.Option(help="Seeds to run: test (to report) or dev (to choose settings on); the two share no seed, scene or start.")
    ] = "test",
    seeds: Annotated[int | None, typer.Option(help="Runs (seeds) per shape for the disagree row (default: the runs / 4).")] = None,
    steps: StepsOpt = 20,
    ddim_steps: Annotated[int, typer.Option("--ddim-steps", help="DDIM sampling steps (the paper's 20: --ddim-steps 20 --spacing leading).")] = 8,
    spacing: Annotated[str, typer.Option(help="DDIM timestep spacing: leading, trailing or linspace.")] = "trailing",
    batch_size: BatchOpt = 8,
    uvce_seeds: Annotated[int | None, typer.Option(help="Scenes per shape for the uvce row (default: the runs / 4).")] = None,
    neuron_seeds: Annotated[
        int | None, typer.Option(help="Seeds per starting prompt for the neuron and directions rows (default: the runs / 4).")
    ] = None,
    neuron_cf_seeds: Annotated[
        int | None, typer.Option(help="Scenes per mode (max, min, control) for the neuron-cf row (default: the runs).")
    ] = None,
    directions_images: Annotated[int, typer.Option(help="Images of the class for the directions row's neural PCA.")] = 64,
    rows: Annotated[
        str | None,
        typer.Option(help="Comma-separated rows to run: generator, disagree, neuron, uvce, neuron-cf, directions (default: all)."),
    ] = None,
    model: Annotated[
        str, typer.Option(help="Diffusion model of every row: the built-in shapes model or a retrained world's model folder "
                               "(python -m digin_cli.world.train_diffusion --out DIR), judged before it replaces the shipped one.")
    ] = "shapes",
    disagree_g: Annotated[
        str, typer.Option("--disagree-g", help="Classifier g of the disagree row (f is shapes:oracle).")
    ] = "shapes:color-biased",
    device: DeviceOpt = "auto",
    jobs: Annotated[
        int | None, typer.Option(help="Rows run at once, each in its own process (default: 2 on a CPU, 1 on a GPU).")
    ] = None,
    quiet: QuietOpt = False,
    cone: ConeOpt = None,
    guards: dict[str, Any] | None = None,
    perf: Annotated[
        bool, typer.Option("--perf", help="Run the performance benchmark instead (step cost, memory, batching).")
    ] = False,
    perf_options: dict[str, Any] | None = None,
) -> None:
    """Quality benchmark on the built-in shapes world, judged by ground truth (fixed seeds);
    with --perf, the performance benchmark."""
    if perf:
        _perf(out, device, quiet, **perf_options)
        return
    from digin_cli.bench.config import DEFAULT_RUNS, FULL_RUNS, BenchConfig
    from digin_cli.bench.quality import run_bench

    if full and runs is not None:
        fail("give --full or --runs, not both (--full is --runs 48)")
    runs = runs if runs is not None else FULL_RUNS if full else DEFAULT_RUNS
    config = BenchConfig(out=out, runs=runs, seeds_per_shape=seeds, steps=steps, ddim_steps=ddim_steps,
                         spacing=spacing, batch_size=batch_size, uvce_seeds=uvce_seeds, neuron_seeds=neuron_seeds,
                         neuron_cf_seeds=neuron_cf_seeds, directions_images=directions_images, device=device,
                         model=model, disagree_g=disagree_g, jobs=jobs, split=split, cone=cone, **guards)  # fmt: skip
    config.shapes = _names(shapes) or config.shapes
    config.rows = _names(rows) if rows is not None else config.rows
    result = call_with_progress(run_bench, config, quiet)
    stdout.print(_bench_table(result["rows"], result["config"]["split"]))
    stdout.print(f"Wrote {result['json']} ({result['seconds']:.0f} s)", highlight=False)


def _bench_table(rows: list[dict[str, Any]], split: str) -> Table:
    table = Table(title=f"digin bench: shapes world, judged by ground truth ({split} split)")
    for column in ("row", "figure", "value"):
        table.add_column(column)
    for row in rows:
        for k, (figure, value) in enumerate({**row["headline"], "time": f"{row['seconds']:.0f} s"}.items()):
            table.add_row(row["row"] if k == 0 else "", figure, value)
    return table


def _perf(out: Path, device: str, quiet: bool, perf_resolution: int | None, perf_steps: int | None, repeats: int,
          pipelines: str, batch_sizes: str, feature_pipelines: str, few_step_pipeline: str,
          few_step_resolution: int | None) -> None:  # fmt: skip
    from digin_cli.bench.perf import PerfConfig, run_perf

    few_step_pipeline = None if few_step_pipeline.strip().lower() == "none" else few_step_pipeline.strip()
    try:
        batches = [int(b) for b in _names(batch_sizes)]
    except ValueError:
        fail(f"--batch-sizes must be comma-separated integers, got '{batch_sizes}'")
    config = PerfConfig(out=out, device=device, pipelines=_names(pipelines), sd_resolution=perf_resolution, ddim_steps=perf_steps,
                        repeats=repeats, batch_sizes=batches, feature_pipelines=_names(feature_pipelines),
                        few_step_pipeline=few_step_pipeline, few_step_resolution=few_step_resolution)  # fmt: skip
    log = (lambda message: None) if quiet else (lambda message: stderr.print(message, highlight=False))
    result = call(run_perf, config, log)
    table = Table(title=f"digin bench --perf on {result['machine']['device']} ({result['machine']['cpu']})")
    for column in ("pipeline", "px", "T", "forward s", "step s", "step/forward", "memory 4T/T", "images/s (batch)"):
        table.add_column(column)
    for row in result["rows"]:
        throughput = ", ".join(f"{v['images_per_second']:.2f} ({b})" for b, v in row["throughput"].items())
        table.add_row(row["pipeline"], str(row["resolution"]), str(row["ddim_steps"]), f"{row['forward_sample_seconds']:.3f}",
                      f"{row['optimization_step_seconds']:.3f}", f"{row['step_over_forward']:.2f}",
                      f"{row['memory']['ratio_above_loaded']:.2f}", throughput)  # fmt: skip
    stdout.print(table)
    few = result["few_steps"]
    if few is not None:
        cells = ", ".join(f"T={t}: {v['guided']:.2f}/{v['unguided']:.2f} s" for t, v in few["seconds_per_step"].items())
        stdout.print(f"Few steps on {few['pipeline']} at {few['resolution']} px (guided/unguided step): {cells}; "
                     f"4 unguided / 20 guided = {few['four_unguided_over_twenty_guided']:.3f} (target <= 0.2)", highlight=False)  # fmt: skip
    stdout.print(f"Wrote {result['json']} ({result['seconds']:.0f} s)", highlight=False)
