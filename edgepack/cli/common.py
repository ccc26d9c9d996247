"""What every command shares: the consoles, logging, the error boundary, flag parsing helpers.

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

from edgepack.errors import EdgepackError, Interrupted, first_line

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
for _c in (out, err):  # piped output: lines as wide as the tables need, not 80 columns
    if not _c.is_terminal and "COLUMNS" not in __import__("os").environ:
        _c.width = 120
log = logging.getLogger("edgepack")
state = {"verbose": 0, "quiet": False}


def _setup_logging() -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if state["verbose"] else (logging.ERROR if state["quiet"] else logging.INFO)
    handler = RichHandler(console=err, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("edgepack").setLevel(level)
    for noisy in ("nncf", "openvino", "torch", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if state["verbose"] > 1 else logging.ERROR)


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
            say_error(str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            say_error("interrupted; nothing was written")
            raise typer.Exit(Interrupted.exit_code) from None
        except typer.Exit:
            raise
        except Exception as e:
            if state["verbose"]:
                err.print_exception()
            say_error(f"internal error: {type(e).__name__}: {first_line(e)} (rerun with -v for details)")
            raise typer.Exit(4) from None

    return wrapper


def say_error(text: str) -> None:
    """One line on stderr; the text is printed as it is (never read as markup)."""
    from rich.text import Text

    err.print(Text.assemble(("error:", "bold red"), " ", text), highlight=False)


def emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def parse_shapes(values: list[str]) -> dict[str, tuple[int, ...]] | None:
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


def parse_drop(value: str) -> float:
    try:
        v = float(value.rstrip("%"))
    except ValueError:
        raise EdgepackError(f"--max-drop {value!r}: expected accuracy points, e.g. 1 or 0.5%") from None
    if not 0 <= v <= 100:
        raise EdgepackError(f"--max-drop {value!r}: must be between 0 and 100 points")
    return v / 100.0
