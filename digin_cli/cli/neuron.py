"""`digin neuron`: parse, run the neuron task, print the chosen prompt and its table."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from digin_cli.cli.app import app, call_with_progress, finish, stdout
from digin_cli.cli.options import (
    SEEDS,
    ClassifierOpt,
    CommonOptions,
    DirectionOpt,
    LayerOpt,
    NeuronOpt,
    PromptTemplateOpt,
    common_options,
    with_options,
)


@app.command()
@with_options(seeds=SEEDS, common=common_options(out="digin-out/neuron"))
def neuron(
    classifier: ClassifierOpt,
    neuron_index: NeuronOpt = None,
    direction: DirectionOpt = None,
    layer: LayerOpt = None,
    minimize: Annotated[bool, typer.Option("--minimize", help="Minimize instead of maximize.")] = False,
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="Candidate initial prompt; repeat for several.")
    ] = None,
    select_samples: Annotated[int, typer.Option(help="Images per candidate prompt when choosing the start.")] = 8,
    candidates: Annotated[int, typer.Option(help="Prompts proposed from the last layer when none are given.")] = 3,
    prompt_template: PromptTemplateOpt = "a photograph of a {}",
    seeds: list[int] | None = None,
    common: CommonOptions | None = None,
) -> None:
    """Show what a neuron (or feature direction) of a classifier looks for (paper section 6)."""
    from digin_cli.tasks.neuron import NeuronJob, run_neuron

    job = NeuronJob(
        classifier=classifier, seeds=seeds, neuron=neuron_index, direction_file=direction, layer=layer,
        maximize=not minimize, prompts=list(prompt or []), num_candidates=candidates, select_samples=select_samples,
        prompt_template=prompt_template, **common.job_fields(seed=seeds[0] if seeds else 0),
    )  # fmt: skip
    result = call_with_progress(run_neuron, job, common.quiet)
    if not common.quiet:
        _print_selection(result["header"]["config"])
        stdout.print(_table(result))
    finish(result, common.fail_on)


def _print_selection(config: dict[str, Any]) -> None:
    if not config["selection_scores"]:
        return
    stdout.print("start prompt chosen by mean activation:", highlight=False)
    for text, score in config["selection_scores"].items():
        mark = "*" if text == config["prompt"] else " "
        stdout.print(f" {mark} {score:+.3f}  {text}", highlight=False, markup=False)


def _table(result: dict[str, Any]) -> Table:
    config = result["header"]["config"]
    target = config["neuron"] if config["neuron"] is not None else config["direction_file"]
    table = Table(title=f"neuron: {config['mode']} {target}")
    judged = bool(config.get("judges"))
    for column in ("seed", "activation before", "activation after", "top class after", *(("judges' top class after",) if judged else ()),
                   "best step"):  # fmt: skip
        table.add_column(column)
    for item in result["items"]:
        b, a = item["before"], item["after"]
        judges = (", ".join(j.get("after", {}).get("top_class_name", "?") for j in (item.get("judges") or {}).values()),)
        table.add_row(str(item["input"]["seed"]), f"{b['activation']:.3f}", f"{a['activation']:.3f}",
                      f"{a['top_class_name']} {a['top_p']:.2f}", *(judges if judged else ()), str(item["best_step"]))  # fmt: skip
    return table
