"""`digin disagree`: parse, run the disagree task, print its table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from digin_cli.cli.app import app, call_with_progress, confirmed_cell, finish, stdout
from digin_cli.cli.options import SEEDS, CommonOptions, ConeOpt, PromptTemplateOpt, common_options, with_options


SCAN = "Many classes (a scan)"


@app.command()
@with_options(seeds=SEEDS, common=common_options(out="digin-out/disagree"))
def disagree(
    classifier_f: Annotated[
        str, typer.Option("--classifier-f", "-f", help="Classifier that should see the class (spec, see README).")
    ],
    classifier_g: Annotated[str, typer.Option("--classifier-g", "-g", help="Classifier that should not see the class.")],
    class_names: Annotated[
        list[str] | None,
        typer.Option("--class", "-c", show_default=False,
                     help="Target class: a name (any case) or an index; repeat it to scan several classes, or 'all' for every class of f."),
    ] = None,
    classes_file: Annotated[
        Path | None,
        typer.Option("--classes", metavar="FILE", rich_help_panel=SCAN,
                     help="Scan the classes of FILE: one name or index a line (blank lines and # comments skipped)."),
    ] = None,
    screen: Annotated[
        int | None,
        typer.Option("--screen", metavar="K", rich_help_panel=SCAN,
                     help="First score every class by K unoptimized samples (mean p_f - p_g), then optimize only the --top N."),
    ] = None,
    top: Annotated[
        int | None, typer.Option("--top", metavar="N", rich_help_panel=SCAN, help="With --screen: optimize the N classes it scores highest.")
    ] = None,
    prompt_template: PromptTemplateOpt = "a photograph of a {}",
    cone: ConeOpt = None,
    seeds: list[int] | None = None,
    common: CommonOptions | None = None,
) -> None:
    """Make images that classifier f assigns to CLASS and classifier g does not (paper section 4); several classes are a scan, ranked."""
    from digin_cli.tasks.disagree import DisagreeJob, run_disagree

    job = DisagreeJob(classifier_f=classifier_f, classifier_g=classifier_g, class_name=class_names or [], seeds=seeds,
                      prompt_template=prompt_template, cone=cone, classes_file=classes_file, screen=screen, top=top,
                      **common.job_fields(seed=seeds[0] if seeds else 0))  # fmt: skip
    result = call_with_progress(run_disagree, job, common.quiet)
    if not common.quiet:
        stdout.print(_ranking_table(result) if "ranking" in result else _table(result))
    finish(result, common.fail_on)


def _ranking_table(result: dict[str, Any]) -> Table:
    """A class scan's classes, ranked (tasks/scan.py, RANKING_RULE)."""
    judged = bool(result["header"]["config"].get("judges"))
    screened = result["header"]["scan"]["screening"] is not None
    table = Table(title="disagree scan: classes ranked by findings (claimed; confirmed where judged)")
    columns = ("rank", "class", "items", "claimed", *(("confirmed",) if judged else ()), "best p_f - p_g",
               *(("screen score",) if screened else ()), "best image")  # fmt: skip
    for column in columns:
        table.add_column(column)
    for entry in result["ranking"]:
        best = "" if entry["best_margin"] is None else f"{entry['best_margin']:.3f}"
        optimized = str(entry["items"]) if entry["optimized"] else "screened out"
        confirmed = (str(entry["confirmed"]),) if judged else ()
        score = (f"{entry['screen_score']:.3f}",) if screened else ()
        table.add_row(str(entry["rank"]), entry["class"], optimized, str(entry["claimed"]), *confirmed, best, *score,
                      entry["best_image"] or "")  # fmt: skip
    return table


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
