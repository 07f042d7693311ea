"""The quality benchmark on the shapes world: does digin find what is really there?

Every row runs a subcommand on the built-in shapes world with fixed seeds and judges
the result by ground truth (the renderer's colour statistics, the planted biases),
never by the classifiers being explained alone. The seeds come in two disjoint splits
(config.py): "dev" to choose settings on, "test" to report. The rows live in a module each; they
share no files, so they may run at once, each in its own process.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from digin_cli.bench.claims import JUDGES
from digin_cli.bench.config import ROW_NAMES, SPLIT_OFFSET, BenchConfig
from digin_cli.bench.directions_row import directions_row
from digin_cli.bench.disagree_row import disagreement_row
from digin_cli.bench.generator_row import generator_row
from digin_cli.bench.neuron_cf_row import neuron_cf_row
from digin_cli.bench.neuron_row import neuron_row
from digin_cli.bench.uvce_row import uvce_row
from digin_cli.engine.configs import StepReport
from digin_cli.errors import DiginError
from digin_cli.io import remove_tree, write_json
from digin_cli.report.build import write_bench_page
from digin_cli.tasks.runtime import Progress, resolve_device

# The rows by the names `digin bench --rows` takes, in the order they are reported.
ROWS = dict(zip(ROW_NAMES, (generator_row, disagreement_row, neuron_row, uvce_row, neuron_cf_row, directions_row)))
# Each row's share of a default bench's time (seconds on a 2-core CPU): parallel rows start
# longest first, so the processes finish close together.
ROW_SECONDS = {"generator": 13, "disagree": 130, "neuron": 212, "uvce": 117, "neuron-cf": 361, "directions": 95}


def run_bench(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    config.check()
    started = time.perf_counter()
    chosen = [name for name in ROWS if name in config.rows]  # in the benchmark's order
    jobs = bench_jobs(config, len(chosen))
    if jobs == 1:
        rows = [run_row(name, config, progress) for name in chosen]
    else:
        rows = _run_rows_at_once(chosen, config, jobs, progress)
    result = {
        # The split in the title too: the bench page (report/build.py) shows the title.
        "benchmark": f"shapes world, judged by ground truth, {config.split} split",
        "config": {
            "split": config.split,
            "split_seed_offset": SPLIT_OFFSET if config.split == "test" else 0,
            "judges": list(JUDGES),
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
            "guards": config.guards(),
            "jobs": jobs,
        },
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(result, config.out / "bench.json")
    write_bench_page(config.out)  # each row's runs wrote their own pages
    result["json"] = str(config.out / "bench.json")
    return result


def bench_jobs(config: BenchConfig, rows: int) -> int:
    """How many rows run at once: --jobs, else 2 on a CPU of 2 cores or more and 1 on a GPU
    (one GPU is kept busy by one row); never more than there are rows."""
    if config.jobs is not None:
        return max(1, min(config.jobs, rows))
    if resolve_device(config.device).type != "cpu":
        return 1
    return max(1, min(2, _cores(), rows))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_row(name: str, config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """One row, into out/<row name>: emptied first, so no scene or item of an earlier bench
    (other seeds, other settings) is read or counted."""
    remove_tree(config.out / name)
    row_started = time.perf_counter()
    return {**ROWS[name](config, progress), "seconds": round(time.perf_counter() - row_started, 1)}


def _run_rows_at_once(chosen: list[str], config: BenchConfig, jobs: int, progress: Progress | None) -> list[dict[str, Any]]:
    """The rows in up to `jobs` processes at a time (spawned: no torch state is forked),
    longest first, each process with its share of the cores; progress is counted in rows
    done. A row's error (a DiginError included) is raised here as in one process, a process
    that dies (killed, out of memory) is named, and either way the other rows are stopped.
    Processes of our own rather than a pool: multiprocessing.Pool waits forever for a
    killed worker's task, and concurrent.futures cannot stop the rows still running."""
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // jobs)
    waiting = sorted(chosen, key=lambda row: ROW_SECONDS.get(row, 0), reverse=True)
    running: dict[str, tuple[Any, Any]] = {}  # row -> (process, the parent's end of its pipe)
    results: dict[str, dict[str, Any]] = {}
    if progress is not None:
        progress.start(f"bench rows, {jobs} at a time", len(chosen))
    try:
        while waiting or running:
            # 1. Start rows while there are free processes.
            while waiting and len(running) < jobs:
                name = waiting.pop(0)
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_row_process, args=(name, config, threads, sender), name=f"digin bench {name}")
                process.start()
                sender.close()  # the child holds its own end: EOF here when it is gone
                running[name] = (process, receiver)
            # 2. Wait for a row to send its result (or its process to end without one).
            ready = wait([receiver for _, receiver in running.values()])
            for name in [row for row, (_, receiver) in running.items() if receiver in ready]:
                process, receiver = running.pop(name)
                try:
                    ok, payload = receiver.recv()
                except EOFError:
                    process.join()
                    raise DiginError(f"the bench's {name} row stopped without a result (its process exited with code "
                                     f"{process.exitcode}; out of memory? try --jobs 1)") from None  # fmt: skip
                process.join()
                if not ok:
                    raise payload
                results[name] = payload
                if progress is not None:
                    progress.step(StepReport(step=len(results), total=len(chosen), loss=torch.zeros(0), metrics={}))
    finally:
        for process, _ in running.values():  # an error or an interrupt: the other rows stop too
            process.terminate()
            process.join()
    if progress is not None:
        progress.finish()
    return [results[name] for name in chosen]


def _row_process(name: str, config: BenchConfig, threads: int, sender) -> None:
    """A spawned process's work: one row, its result (or its error) sent back to the parent."""
    torch.set_num_threads(threads)
    try:
        sender.send((True, run_row(name, config)))
    except BaseException as error:  # noqa: BLE001 - handed to the parent, which raises it
        sender.send((False, error))
    finally:
        sender.close()
