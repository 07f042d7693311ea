"""Retrain the whole shapes world with one command (fixed seeds, CPU):

    python -m digin_cli.world.train            # into digin_cli/world/weights/
    python -m digin_cli.world.train --out DIR  # somewhere else

First the four classifiers (`train_classifiers`), then the diffusion model
(`train_diffusion`). Run it on an otherwise idle machine: two trainings or a test
suite at the same time oversubscribe the cores and each runs many times slower.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from digin_cli.world import train_classifiers, train_diffusion

DEFAULT_OUT = Path(__file__).resolve().parent / "weights"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--skip-classifiers", action="store_true")
    parser.add_argument("--skip-diffusion", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    if not args.skip_classifiers:
        train_classifiers.main(["--out", str(args.out / "classifiers")])
    if not args.skip_diffusion:
        train_diffusion.main(["--out", str(args.out / "diffusion")])
    print(f"shapes world trained in {time.perf_counter() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
