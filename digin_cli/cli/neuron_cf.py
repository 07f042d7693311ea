"""`digin neuron-cf`: parse, run the neuron-counterfactual task, print its verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from digin_cli.cli.app import app, call_with_progress, confirmed_cell, finish, stdout
from digin_cli.cli.options import (
    ClassifierOpt,
    CommonOptions,
    DirectionOpt,
    InputsArg,
    LayerOpt,
    NeuronOpt,
    common_options,
    real_image_options,
    with_options,
)


@app.command("neuron-cf")
@with_options(real=real_image_options(kept="object"), common=common_options(out="digin-out/neuron-cf", cutout_seed=True))
def neuron_cf(
    inputs: InputsArg,
    classifier: ClassifierOpt,
    neuron_index: NeuronOpt = None,
    direction: DirectionOpt = None,
    layer: LayerOpt = None,
    class_name: Annotated[
        str | None,
        typer.Option("--class", "-c", help="Class the neuron may be spurious for (default: the image's predicted class)."),
    ] = None,
    direction_mode: Annotated[str, typer.Option("--direction-mode", help="max, min or both.")] = "both",
    from_other_class: Annotated[
        bool, typer.Option("--from-other-class", help="Images of other classes: does maximizing the neuron trigger --class?")
    ] = False,
    source_class: Annotated[
        str | None, typer.Option("--source-class", help="With --from-other-class: what the images show (default: predicted).")
    ] = None,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="For a folder: rows file,class; a header row may add a caption column.")
    ] = None,
    drop_threshold: Annotated[
        float, typer.Option(help="Flag as spurious when minimizing drops p(class) by at least this much.")
    ] = 0.3,
    object_error_ratio: Annotated[
        float,
        typer.Option(help="...and the object's squared error stays within this factor of the reconstruction's."),
    ] = 2.0,
    hold_object: Annotated[
        bool,
        typer.Option(
            help="Hold the object as reconstructed, on top of the distance term: its latents follow the reconstruction's "
            "at every DDIM step (blended latent diffusion) and the reconstruction is laid over each image by the mask; "
            "--no-hold-object keeps the object by the distance term alone, as the paper."
        ),
    ] = True,
    real: tuple | None = None,
    common: CommonOptions | None = None,
) -> None:
    """Neuron counterfactuals of real images: keep the object, raise or lower a neuron, flag spurious ones (paper section 6)."""
    from digin_cli.tasks.neuron_cf import NeuronCfJob, run_neuron_cf

    real_options, weights = real
    job = NeuronCfJob(
        classifier=classifier, inputs=inputs, neuron=neuron_index, direction_file=direction, layer=layer,
        class_name=class_name, source_class=source_class, csv_file=csv_file, direction_mode=direction_mode,
        from_other_class=from_other_class, drop_threshold=drop_threshold, object_error_ratio=object_error_ratio,
        hold_object=hold_object, real=real_options, **weights, **common.job_fields(),
    )  # fmt: skip
    result = call_with_progress(run_neuron_cf, job, common.quiet)
    if not common.quiet:
        stdout.print(_table(result["items"], bool(job.judges)))
    finish(result, common.fail_on, lead=f"Flagged as spurious on {result['flagged']} of {result['judged']} image(s). ")


def _table(items: list[dict[str, Any]], judged: bool) -> Table:
    table = Table(title="neuron-cf: activation and p(class), original -> max / min")
    columns = ("file", "class", "activation", "p(class)", "verdict", *(("confirmed",) if judged else ()))
    for column in columns:
        table.add_column(column)
    for item in items:
        name = Path(item["input"]["file"]).name
        if item.get("status") != "ok":
            table.add_row(name, "", "", "", f"failed: {item['error']}", *[""] * (len(columns) - 5))
            continue
        figures = [item["before"], *item["after"].values()]  # original, then maximized / minimized
        acts = " / ".join(f"{f['activation']:.2f}" for f in figures)
        probs = " / ".join(f"{f['p_class']:.2f}" for f in figures)
        confirmed = (confirmed_cell(item),) if judged else ()
        table.add_row(name, item["classes"]["class"], acts, probs, _verdict(item), *confirmed)
    return table


def _verdict(item: dict[str, Any]) -> str:
    if item.get("verdict"):
        return item["verdict"]["text"]
    if item.get("from_other_class"):
        return "triggers the class" if item["from_other_class"]["triggers_class"] else "does not trigger the class"
    return ""
