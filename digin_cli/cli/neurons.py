"""`digin neurons`: parse, run the neuron search, print the ranking and the next command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from digin_cli.cli.app import app, call, stdout
from digin_cli.cli.options import SAMPLER_OPTIONS, ClassifierOpt, PromptTemplateOpt, runtime_options, with_options


@app.command()
@with_options(sampler=SAMPLER_OPTIONS, runtime=runtime_options(compile_unet=False))
def neurons(
    classifier: ClassifierOpt,
    class_name: Annotated[str, typer.Option("--class", "-c", help="Class whose logit is attributed.")],
    top: Annotated[int, typer.Option(help="How many neurons to list.")] = 10,
    samples: Annotated[int, typer.Option(help="Generated images of the class to average over.")] = 8,
    seed: Annotated[int, typer.Option(help="First seed of the generated images.")] = 0,
    prompt_template: PromptTemplateOpt = "a photograph of a {}",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the list to this JSON file.")] = None,
    sampler=None,
    runtime=None,
) -> None:
    """List the penultimate neurons that contribute most to a class logit (weight x mean activation)."""
    from digin_cli.io import write_json
    from digin_cli.tasks.neuron import NeuronSearchJob, find_neurons

    job = NeuronSearchJob(classifier=classifier, class_name=class_name, top=top, samples=samples, seed=seed,
                          prompt_template=prompt_template, runtime=runtime, sampler=sampler)  # fmt: skip
    result = call(find_neurons, job)
    table = Table(title=f"neurons driving '{result['class_name']}' in {classifier} ({samples} images of '{result['prompt']}')")
    for column in ("neuron", "contribution", "weight", "mean activation"):
        table.add_column(column)
    for entry in result["neurons"]:
        table.add_row(str(entry["neuron"]), f"{entry['contribution']:+.3f}", f"{entry['weight']:+.3f}",
                      f"{entry['mean_activation']:.3f}")  # fmt: skip
    stdout.print(table)
    best = result["neurons"][0]["neuron"]
    stdout.print(f"Next: digin neuron --classifier {classifier} --neuron {best} --model {runtime.model}", highlight=False, markup=False)
    if json_out is not None:
        call(write_json, result, json_out)
