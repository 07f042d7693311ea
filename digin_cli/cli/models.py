"""`digin models`: list the built-in offline models and classifiers."""

from __future__ import annotations

from rich.table import Table

from digin_cli.cli.app import app, stdout


@app.command()
def models() -> None:
    """List the built-in offline models and classifiers, and the accepted spec forms."""
    from digin_cli.models.builtin import builtin_catalog

    catalog = builtin_catalog()
    table = Table(title="Built-in models (offline, no download)")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("what it is")
    for kind, entries in catalog.items():
        for name, description in entries:
            table.add_row(kind, name, description)
    stdout.print(table)
    stdout.print(
        "Also: --model <hub id or diffusers folder>; classifiers timm:NAME[,checkpoint=PATH][,classes=FILE], "
        "openclip:ARCH/PRETRAINED[,classes=FILE], torchscript:PATH,classes=FILE",
        highlight=False,
    )
