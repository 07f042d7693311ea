"""`digin models`: list the built-in offline models and classifiers, or (--family) the model
families digin samples and their defaults."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from digin_cli.cli.app import app, stdout


@app.command()
def models(
    family: Annotated[bool, typer.Option("--family", help="The model families digin samples and each one's defaults.")] = False,
) -> None:
    """List the built-in offline models and classifiers, and the accepted spec forms."""
    if family:
        _families()
        return
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
        "openclip:ARCH/PRETRAINED[,classes=FILE], torchscript:PATH,classes=FILE. `digin models --family`: the model families.",
        highlight=False,
    )


def _families() -> None:
    from digin_cli.families import FAMILIES

    table = Table(title="Model families (recognised from the model's config files; every option overrides)")
    for column in ("family", "what it is", "DDIM steps", "guidance", "spacing", "resolution"):
        table.add_column(column, overflow="fold")
    for entry in FAMILIES.values():
        table.add_row(entry.name, entry.title, str(entry.ddim_steps), f"{entry.guidance:g}", entry.spacing or "the config's",
                      f"{entry.resolution} px" if entry.resolution else "the UNet's")  # fmt: skip
    stdout.print(table)
    for entry in FAMILIES.values():
        stdout.print(f"{entry.name}: {entry.examples}", highlight=False, soft_wrap=True)
    stdout.print(
        "Turbo models are told apart from their base by 'turbo' in the hub id or folder name, or by "
        '{"family": "sd-turbo"} (or "sdxl-turbo") in the folder\'s digin.json. Not sampled: SD3, FLUX and other '
        "transformer pipelines, inpainting and image-conditioned UNets, unconditional models.",
        highlight=False,
    )
