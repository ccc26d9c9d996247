"""The `edgepack` command. The cli package is the only code that prints: results to stdout, logs and progress
to stderr.

Exit codes: 0 ok, 1 user error, 2 usage, 3 accuracy budget not met (--strict), 4 internal error, 130 interrupted.
"""
from __future__ import annotations

import typer

from edgepack.cli import pack, tools
from edgepack.cli.common import out, state

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a trained model into a verified deployment bundle for a specific device.")
targets_app = typer.Typer(add_completion=False, help="List target profiles, or show one.")
report_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Work with report and profile JSON files.")
app.add_typer(targets_app, name="targets")
app.add_typer(report_app, name="report")


@app.callback()
def main(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging (-vv for libraries too)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors on stderr."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
):
    state["verbose"], state["quiet"] = verbose, quiet
    if version:
        from edgepack import __version__

        out.print(__version__)
        raise typer.Exit(0)


app.command()(pack.pack)
for _cmd in (tools.verify, tools.profile, tools.inspect, tools.doctor, tools.distill):
    app.command()(_cmd)
targets_app.callback(invoke_without_command=True)(tools.targets)
targets_app.command("show")(tools.targets_show)
report_app.command("compare")(tools.compare)
