"""The `edgepack` command. The only module that prints: results to stdout, logs and progress to stderr.

Exit codes: 0 ok, 1 user error, 2 usage, 3 accuracy budget not met (--strict), 4 internal error, 130 interrupted.
"""
from __future__ import annotations

import functools
import json
import logging
import signal
import sys

import typer
from rich.console import Console

from .errors import EdgepackError, Interrupted

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a trained model into a verified deployment bundle for a specific device.")
targets_app = typer.Typer(add_completion=False, help="List target profiles, or show one.")
report_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Work with report and profile JSON files.")
app.add_typer(targets_app, name="targets")
app.add_typer(report_app, name="report")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
for _c in (out, err):  # piped output: lines as wide as the tables need, not 80 columns
    if not _c.is_terminal and "COLUMNS" not in __import__("os").environ:
        _c.width = 120
log = logging.getLogger("edgepack")
_state = {"verbose": 0, "quiet": False}


def _setup_logging() -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if _state["verbose"] else (logging.ERROR if _state["quiet"] else logging.INFO)
    handler = RichHandler(console=err, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("edgepack").setLevel(level)
    for noisy in ("nncf", "openvino", "torch", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if _state["verbose"] > 1 else logging.ERROR)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def boundary(fn):
    """One error boundary: an EdgepackError becomes one line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _setup_logging()
        signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except EdgepackError as e:
            err.print(f"[bold red]error:[/] {e}", markup=True, highlight=False)
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            err.print("[bold red]error:[/] interrupted; nothing was written", markup=True)
            raise typer.Exit(Interrupted.exit_code)
        except typer.Exit:
            raise
        except Exception as e:
            if _state["verbose"]:
                err.print_exception()
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            err.print(f"[bold red]error:[/] internal error: {type(e).__name__}: {first} (rerun with -v for details)",
                      markup=True, highlight=False)
            raise typer.Exit(4)

    return wrapper


@app.callback()
def main(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging (-vv for libraries too)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors on stderr."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
):
    _state["verbose"], _state["quiet"] = verbose, quiet
    if version:
        from . import __version__

        out.print(__version__)
        raise typer.Exit(0)


def _emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _parse_shapes(values: list[str]) -> dict[str, tuple[int, ...]] | None:
    if not values:
        return None
    shapes = {}
    for v in values:
        name, sep, dims = v.rpartition("=") if "=" in v else ("input", "=", v)
        try:
            shapes[name] = tuple(int(d) for d in dims.replace("x", ",").split(",") if d)
        except ValueError:
            raise EdgepackError(f"--input-shape {v!r}: expected NAME=1,3,224,224") from None
    return shapes


def _parse_drop(value: str) -> float:
    try:
        v = float(value.rstrip("%"))
    except ValueError:
        raise EdgepackError(f"--max-drop {value!r}: expected accuracy points, e.g. 1 or 0.5%") from None
    if not 0 <= v <= 100:
        raise EdgepackError(f"--max-drop {value!r}: must be between 0 and 100 points")
    return v / 100.0


from .cli_pack import register_pack  # noqa: E402  (pack's many flags live in their own module)
from .cli_tools import register_tools  # noqa: E402

register_pack(app, boundary, out, err, _emit_json, _parse_shapes, _parse_drop)
register_tools(app, targets_app, report_app, boundary, out, err, _emit_json)
