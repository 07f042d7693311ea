"""`digin directions`: parse, compute a class's feature directions (neural PCA), print them
and the next command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from digin_cli.cli.app import app, call, stdout
from digin_cli.cli.options import ClassifierOpt, DeviceOpt, OutOpt, QuietOpt


@app.command()
def directions(
    folder: Annotated[Path, typer.Argument(help="A folder of images of the class.", show_default=False)],
    classifier: ClassifierOpt,
    class_name: Annotated[str, typer.Option("--class", "-c", help="Class whose logit is decomposed.")],
    out: OutOpt = Path("digin-out/directions"),
    components: Annotated[int, typer.Option(help="Components to write, largest variance first.")] = 10,
    top_images: Annotated[int, typer.Option("--top-images", help="Images on each component's sheet.")] = 8,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images through the classifier at once.")] = 32,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """A class's feature directions by neural PCA (Neuhaus et al.): a .npy each for --direction, and its top images."""
    from digin_cli.tasks.directions import DirectionsJob, run_directions
    from digin_cli.tasks.runtime import RuntimeOptions

    job = DirectionsJob(classifier=classifier, class_name=class_name, folder=folder, out=out, components=components,
                        top_images=top_images, batch_size=batch_size, runtime=RuntimeOptions(device=device))  # fmt: skip
    record = call(run_directions, job)
    if not quiet:
        table = Table(title=f"components of '{record['class_name']}' in {record['classifier']} ({record['images']} images)")
        for column in ("component", "variance", "alpha std", "direction file", "most activating"):
            table.add_column(column, overflow="fold")
        for entry in record["components"]:
            top = ", ".join(image["file"] for image in entry["top_images"][:3])
            table.add_row(str(entry["component"]), f"{100 * entry['explained_variance']:.1f}%", f"{entry['alpha_std']:.3f}",
                          entry["direction_file"], top)  # fmt: skip
        stdout.print(table)
        for skipped in record["skipped"]:
            stdout.print(f"skipped {skipped['file']}: {skipped['error']}", highlight=False, markup=False)
    first = Path(out) / record["components"][0]["direction_file"]
    stdout.print(f"Next: digin neuron --classifier {classifier} --direction {first} --model MODEL", highlight=False, markup=False)
    stdout.print(f"Wrote {out}/directions.json", highlight=False, markup=False)
