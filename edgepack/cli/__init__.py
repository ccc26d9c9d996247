"""The `edgepack` command. The cli package is the only code that prints: results to stdout, logs and progress
to stderr.

Exit codes: 0 ok, 1 user error, 2 usage, 3 accuracy budget not met (--strict), 4 internal error, 5 partial
(some devices or batch jobs failed), 130 interrupted.
"""
from __future__ import annotations

import typer

from edgepack.cli import pack, tools
from edgepack.cli.common import out, state, with_common_options, with_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a trained model into a verified deployment bundle for a specific device.")
targets_app = typer.Typer(add_completion=False, help="List target profiles, or show one.")
report_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Work with report and profile JSON files.")
app.add_typer(targets_app, name="targets")
app.add_typer(report_app, name="report")


def _version(value: bool) -> None:
    if value:
        from edgepack import __version__

        out.print(f"edgepack {__version__}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def main(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, show_default=False,
                                help="More logging (-vv for libraries too); also accepted after the command."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors on stderr; also accepted after the command."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                 help="Print the version and exit."),
):
    state.update(verbose=verbose, quiet=quiet, json=False, warnings=[], error=None, command="")


app.command()(pack.pack)
for _cmd in (tools.verify, tools.profile, tools.inspect, tools.doctor, tools.distill):
    app.command()(_cmd)
targets_app.callback(invoke_without_command=True)(tools.targets)
targets_app.command("show")(tools.targets_show)
report_app.command("compare")(tools.compare)


def _mount_optional() -> None:
    """Command groups of their own packages: devices (SSH) and batch."""
    from edgepack.batch.cli import app as batch_app
    from edgepack.devices.cli import app as devices_app

    app.add_typer(devices_app, name="devices")
    app.registered_commands += batch_app.registered_commands
    for info in [*devices_app.registered_commands, *batch_app.registered_commands]:  # --json, -v, -q as everywhere
        if info.callback is not None and not getattr(info.callback, "common_options", False):
            info.callback = with_common_options(with_logging(info.callback), info.callback)


_mount_optional()


def run() -> None:
    """The console entry point: the app, then a quick exit. Once a command has finished (files written and
    closed, exit handlers run, streams flushed), the native runtimes' own teardown only adds half a second."""
    import atexit
    import logging
    import os
    import sys
    import threading

    try:
        app(prog_name="edgepack")
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str) or any(t.is_alive() and not t.daemon for t in threading.enumerate()
                                          if t is not threading.main_thread()):
            raise  # a message to print, or threads that a normal exit would wait for
        code = e.code or 0
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
