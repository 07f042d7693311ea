"""The Typer app: one-line errors, calling a task with its progress bar, the closing line."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from digin_cli import __version__
from digin_cli.errors import CompileFallbackWarning, DiginError
from digin_cli.progress import RichProgress

try:  # typer >= 0.24 vendors its own copy of click, whose exceptions are not click's
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as click_exceptions

stdout = Console()
stderr = Console(stderr=True)


class OneLineErrors(TyperGroup):
    """Usage errors as one `Error: ...` line and exit code 2, without the usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.UsageError as error:
            if type(error).__name__ == "NoArgsIsHelpError" and error.ctx is not None:
                typer.echo(error.ctx.get_help())  # `digin` alone: help, not an error
                sys.exit(0)
            hint = f" (see `{error.ctx.command_path} --help`)" if error.ctx is not None else ""
            typer.echo(f"Error: {error.format_message()}{hint}", err=True)
            sys.exit(2)
        except typer.Abort:
            typer.echo("Error: aborted", err=True)
            sys.exit(130)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    help="Explain image classifiers by optimizing the inputs of a latent diffusion model (DiG-IN).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _line(text: str) -> None:
    # Printed as given: no markup, and no emoji codes (a `--lora style.safetensors:abc:` would show 🔤).
    stderr.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> None:
    _line(f"Error: {message}")
    raise typer.Exit(code)


def call(task: Callable[..., Any], *args: Any) -> Any:
    """Call a task; turn the errors a user can fix into one line, never a traceback."""
    try:
        return task(*args)
    except DiginError as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail("interrupted; files already written are complete, rerun to redo the rest", 130)
    except MemoryError:
        fail("out of memory; lower --batch-size, --cutouts or --ddim-steps, or use a GPU")
    except Exception as error:  # noqa: BLE001 - the last line of defence against tracebacks
        if os.environ.get("DIGIN_DEBUG"):
            raise
        if "out of memory" in str(error).lower():
            fail("out of GPU memory; lower --batch-size or --cutouts, or use --dtype bf16")
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        fail(f"unexpected {type(error).__name__}: {first} (set DIGIN_DEBUG=1 to see the traceback and report it)")


def call_with_progress(task: Callable[[Any, Any], Any], job: Any, quiet: bool) -> Any:
    """Call `task(job, progress)` with a progress bar on stderr (none when quiet)."""
    progress = None if quiet else RichProgress(stderr)
    try:
        return call(task, job, progress)
    finally:
        if progress is not None:
            progress.close()


def wrote(result: dict[str, Any]) -> str:
    """The closing line of a run: what is done, where the records are."""
    items = result["items"]
    done = sum(item.get("status") == "ok" for item in items)
    failed = len(items) - done
    out = result["out"]
    return f"Wrote {done} item(s){f' ({failed} failed)' if failed else ''} to {out}; open {out}/index.html for the report"


def confirmed_cell(item: dict[str, Any]) -> str:
    """The table's "confirmed" cell: yes, or how many judges agree ("" without judges)."""
    if item.get("confirmed") is None:
        return ""
    if item["confirmed"]:
        return "yes"
    judges = item.get("judges") or {}
    return f"no ({item.get('judges_agreeing', 0)}/{len(judges)} agree)" if item.get("claimed") else "-"


def finish(result: dict[str, Any], fail_on: str | None, lead: str = "") -> None:
    """The closing lines of a run (what is done, its findings), then with --fail-on exit
    status 3 when an item is such a finding."""
    from digin_cli.tasks.judges import FINDING_EXIT_CODE, findings

    items = result["items"]
    judged = bool(result["header"]["config"].get("judges"))
    claimed = findings(items, "claimed")
    summary = ""
    if any(item.get("claimed") is not None for item in items):
        summary = f"{len(claimed)} of {len(items)} item(s) claimed"
        summary += f", {len(findings(items, 'confirmed'))} confirmed by every judge. " if judged else ". "
    stdout.print(f"{lead}{summary}{wrote(result)}", highlight=False)
    if fail_on is not None and findings(items, fail_on):
        _line(f"Found {len(findings(items, fail_on))} {fail_on} finding(s) (--fail-on {fail_on}): exit status {FINDING_EXIT_CODE}")
        raise typer.Exit(FINDING_EXIT_CODE)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"digin {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Explain image classifiers by optimizing the inputs of a latent diffusion model (DiG-IN)."""


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, CompileFallbackWarning):
        _line(f"Warning: {message}")
    else:  # DIGIN_DEBUG: the libraries' warnings as Python shows them
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def main() -> None:
    if not os.environ.get("DIGIN_DEBUG"):
        # Libraries report through logging and warnings (retries, deprecations, a root
        # ERROR line from open_clip before it raises); digin reports every problem itself
        # as one `Error:` line, so their messages only bury it. DIGIN_DEBUG=1 shows them.
        logging.getLogger().addHandler(logging.NullHandler())
        warnings.filterwarnings("ignore")
    # What the engine warns of itself (a torch.compile that fell back to eager) is one line.
    warnings.filterwarnings("always", category=CompileFallbackWarning)
    warnings.showwarning = _warning_line
    app()
