"""`digin report DIR`: rebuild the HTML page of a run folder or a bench folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from digin_cli.cli.app import app, call, stdout


@app.command()
def report(
    folder: Annotated[Path, typer.Argument(help="A run's --out folder, or a bench folder.", show_default=False)],
) -> None:
    """Rebuild the HTML report (index.html) of a run folder, or of a bench folder and all its runs."""
    from digin_cli.report.build import build_report

    pages = call(build_report, folder)
    stdout.print(f"Wrote {len(pages)} page(s); open {pages[-1]}", highlight=False)
