"""`digin uvce`: parse, run the counterfactual task, print its table."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from digin_cli.cli.app import app, call_with_progress, confirmed_cell, finish, stdout
from digin_cli.cli.options import ClassifierOpt, CommonOptions, ConeOpt, InputsArg, common_options, real_image_options, with_options


@app.command()
@with_options(real=real_image_options(kept="background"),
              common=common_options(out="digin-out/uvce", compile_unet=False, cutout_seed=True))  # fmt: skip
def uvce(
    inputs: InputsArg,
    classifier: ClassifierOpt,
    target: Annotated[
        list[str] | None, typer.Option("--target", "-t", help="Target class (name or index); repeat for several.")
    ] = None,
    source_class: Annotated[
        str | None, typer.Option("--source-class", help="Class of the image(s) (default: the classifier's prediction).")
    ] = None,
    csv_file: Annotated[
        Path | None,
        typer.Option("--csv", help="For a folder: rows file,class[,target]; a header row may add a caption column. Overrides --source-class."),
    ] = None,
    p2p_fraction: Annotated[
        list[float] | None,
        typer.Option("--p2p-fraction", help="Share of DDIM steps with injected cross-attention; repeat for several: each "
                     "counterfactual starts from the one with the lowest loss (default 0.3, 0.4 and 0.5, as the reference)."),
    ] = None,
    cone: ConeOpt = None,
    real: tuple | None = None,
    common: CommonOptions | None = None,
) -> None:
    """Visual counterfactuals of real images: what must change for the classifier to say TARGET (paper section 5)."""
    from digin_cli.tasks.uvce import UvceJob, run_uvce

    real_options, weights = real
    if p2p_fraction:
        real_options = replace(real_options, p2p_fractions=tuple(p2p_fraction))
    job = UvceJob(classifier=classifier, inputs=inputs, targets=list(target or []), source_class=source_class,
                  csv_file=csv_file, cone=cone, real=real_options, **weights, **common.job_fields())  # fmt: skip
    result = call_with_progress(run_uvce, job, common.quiet)
    if not common.quiet:
        stdout.print(_table(result["items"], bool(job.judges)))
    finish(result, common.fail_on)


def _table(items: list[dict[str, Any]], judged: bool) -> Table:
    table = Table(title="uvce: p(target) before -> after, background kept")
    columns = ("file", "target", "p(target) before", "p(target) after", "flipped", *(("confirmed",) if judged else ()),
               "background PSNR", "status")  # fmt: skip
    for column in columns:
        table.add_column(column)
    for item in items:
        name = Path(item["input"]["file"]).name
        if item.get("status") != "ok":
            table.add_row(name, item["classes"].get("target", ""), *[""] * (len(columns) - 3), f"failed: {item['error']}")
            continue
        confirmed = (confirmed_cell(item),) if judged else ()
        table.add_row(name, item["classes"]["target"], f"{item['before']['p_target']:.3f}",
                      f"{item['after']['p_target']:.3f}", "yes" if item["flipped"] else "no", *confirmed,
                      f"{item['background_psnr_db']:.1f} dB", "ok")  # fmt: skip
    return table
