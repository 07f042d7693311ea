"""`digin disagree`: parse, run the disagree task, print its table."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from digin_cli.cli.app import app, call_with_progress, confirmed_cell, finish, stdout
from digin_cli.cli.options import SEEDS, CommonOptions, ConeOpt, PromptTemplateOpt, common_options, with_options


@app.command()
@with_options(seeds=SEEDS, common=common_options(out="digin-out/disagree"))
def disagree(
    classifier_f: Annotated[
        str, typer.Option("--classifier-f", "-f", help="Classifier that should see the class (spec, see README).")
    ],
    classifier_g: Annotated[str, typer.Option("--classifier-g", "-g", help="Classifier that should not see the class.")],
    class_name: Annotated[str, typer.Option("--class", "-c", help="Target class: a name (any case) or an index.")],
    prompt_template: PromptTemplateOpt = "a photograph of a {}",
    cone: ConeOpt = None,
    seeds: list[int] | None = None,
    common: CommonOptions | None = None,
) -> None:
    """Make images that classifier f assigns to CLASS and classifier g does not (paper section 4)."""
    from digin_cli.tasks.disagree import DisagreeJob, run_disagree

    job = DisagreeJob(classifier_f=classifier_f, classifier_g=classifier_g, class_name=class_name, seeds=seeds,
                      prompt_template=prompt_template, cone=cone, **common.job_fields(seed=seeds[0] if seeds else 0))  # fmt: skip
    result = call_with_progress(run_disagree, job, common.quiet)
    if not common.quiet:
        stdout.print(_table(result))
    finish(result, common.fail_on)


def _table(result: dict[str, Any]) -> Table:
    table = Table(title=f"disagree: '{result['header']['config']['class_name']}'  (p_f up, p_g down)")
    judged = bool(result["header"]["config"].get("judges"))
    columns = ("seed", "p_f before", "p_g before", "p_f after", "p_g after", "claimed", *(("confirmed",) if judged else ()),
               "best step", "sheet")  # fmt: skip
    for column in columns:
        table.add_column(column)
    for item in result["items"]:
        b, a = item["before"], item["after"]
        confirmed = (confirmed_cell(item),) if judged else ()
        table.add_row(str(item["input"]["seed"]), f"{b['p_f']:.3f}", f"{b['p_g']:.3f}", f"{a['p_f']:.3f}",
                      f"{a['p_g']:.3f}", "yes" if item.get("claimed") else "no", *confirmed, str(item["best_step"]),
                      item["files"]["sheet"])  # fmt: skip
    return table
