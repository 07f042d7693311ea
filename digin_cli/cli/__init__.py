"""The command line: ``app`` (one-line errors, progress, calling a task), ``options`` (the
shared options, defined once), and one small module per command that parses its options,
calls a task and reports. Importing this package registers every command, in help order."""

from digin_cli.cli import disagree, neuron, uvce, neuron_cf, neurons, directions, bench, report, models  # noqa: F401, I001  (registers the commands)
from digin_cli.cli.app import app, main

__all__ = ["app", "main"]
