"""What every command shares: the consoles, logging, the error boundary, flag parsing helpers.

Exit codes: 0 ok, 1 user error, 2 usage, 3 accuracy budget not met (--strict), 4 internal error, 130 interrupted.
"""
from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import re
import signal
import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from edgepack.errors import EdgepackError, Interrupted, first_line

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
for _c in (out, err):  # piped output: lines as wide as the tables need, not 80 columns
    if not _c.is_terminal and "COLUMNS" not in __import__("os").environ:
        _c.width = 120
log = logging.getLogger("edgepack")
state: dict[str, Any] = {"verbose": 0, "quiet": False, "json": False, "warnings": [], "error": None,
                        "command": ""}


def _ours(record: logging.LogRecord) -> bool:
    return record.name == "edgepack" or record.name.startswith("edgepack.")


class _Shown(logging.Filter):
    """What the terminal log shows now: edgepack's own lines (warnings wait for the end); other libraries'
    lines and Python warnings only with -v, as debug lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _ours(record):
            if not state["verbose"]:
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return True
        return record.levelno != logging.WARNING


class _Collect(logging.Handler):
    """Keeps edgepack's warnings for flush_warnings() at the end of the command."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if _ours(record) and record.levelno == logging.WARNING:
            add_warning(record.getMessage())


def add_warning(text: str) -> None:
    """A warning for the end of the command (each text once)."""
    state["warnings"].append(str(text))


def flush_warnings() -> None:
    """Every warning of this command once, together, on stderr (none with -q)."""
    items: dict[str, int] = {}
    for w in state["warnings"]:
        items[w] = items.get(w, 0) + 1
    state["warnings"] = []
    if state["quiet"] or not items:
        return
    if len(items) == 1:
        err.print(f"[yellow]warning:[/] {escape(next(iter(items)))}", highlight=False)
        return
    err.print(f"[yellow]{len(items)} warnings:[/]", highlight=False)
    for w, n in items.items():
        err.print(f"  - {escape(w)}" + (f" (×{n})" if n > 1 else ""), highlight=False)


def _setup_logging() -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if state["verbose"] else (logging.ERROR if state["quiet"] else logging.INFO)
    handler = RichHandler(console=err, show_time=False, show_path=False, markup=False)
    handler.addFilter(_Shown())
    root = logging.DEBUG if state["verbose"] > 1 else logging.INFO if state["verbose"] else logging.WARNING
    logging.basicConfig(level=root, handlers=[handler, _Collect()], format="%(message)s", force=True)
    logging.getLogger("edgepack").setLevel(level)
    logging.captureWarnings(False)  # (re)install: something may have put its own showwarning back since
    logging.captureWarnings(True)  # Python warnings go to the "py.warnings" logger: shown with -v only
    for noisy in ("nncf", "openvino", "torch", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if state["verbose"] > 1 else logging.ERROR)


def quiet_torch() -> None:
    """Import torch and send its log records through our handlers (debug lines, shown with -v) instead of
    the handlers torch installs on its own loggers (lines like 'W1130 ... torchvision is not installed')."""
    try:
        import torch  # noqa: F401  (installs torch's handlers; done here so they can be taken off)
    except ImportError:  # loading the model says how to install it
        return

    for name, lg in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger) and (name == "torch" or name.startswith("torch.")):
            for h in [h for h in lg.handlers if type(h) is logging.StreamHandler]:
                lg.removeHandler(h)
            lg.propagate = True


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def boundary(fn):
    """One error boundary: an EdgepackError becomes one line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from edgepack.tempdirs import WRITTEN

        _setup_logging()
        signal.signal(signal.SIGTERM, _on_sigterm)
        WRITTEN.clear()
        try:
            return fn(*args, **kwargs)
        except EdgepackError as e:
            say_error(str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:  # the message says what is on disk: bundles are renamed into place whole
            say_error(f"interrupted after the bundle was written: {WRITTEN[-1]} is complete and verified" if WRITTEN
                      else "interrupted; nothing was written")
            raise typer.Exit(Interrupted.exit_code) from None
        except typer.Exit:
            raise
        except OSError as e:  # permissions, a full disk, a read-only file system: the user's to fix, not a bug
            say_error(os_error_line(e))
            raise typer.Exit(1) from None
        except MemoryError:
            say_error("out of memory (a file larger than it looks, or too little RAM for this model); "
                      "see the EDGEPACK_MAX_*_MB limits in docs/errors.md")
            raise typer.Exit(1) from None
        except Exception as e:
            if state["verbose"]:
                err.print_exception()
            say_error(f"internal error: {type(e).__name__}: {first_line(e)} (rerun with -v for details)")
            raise typer.Exit(4) from None

    return with_common_options(wrapper, fn)


def with_common_options(wrapper, fn):
    """Give a command --json, -v and -q (unless it declares them), set `state` from them, print the
    command's warnings once at the end, and with --json print failures as {"error": ..., "exit_code": ...}."""
    sig = inspect.signature(fn)
    has_json = "as_json" in sig.parameters
    extra = [inspect.Parameter("ep_verbose", inspect.Parameter.KEYWORD_ONLY, annotation=int, default=typer.Option(
                 0, "--verbose", "-v", count=True, show_default=False,
                 help="More logging: -v for debug lines and other libraries' warnings, -vv for their debug lines.")),
             inspect.Parameter("ep_quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
                 False, "--quiet", "-q", help="Only errors on stderr (no progress, info or warnings)."))]
    if not has_json:
        extra.insert(0, inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                          default=typer.Option(False, "--json", help=JSON_HELP)))

    @functools.wraps(wrapper)
    def command(*args, **kwargs):
        verbose, quiet = kwargs.pop("ep_verbose", 0), kwargs.pop("ep_quiet", False)
        as_json = kwargs.get("as_json", False) if has_json else kwargs.pop("as_json", False)
        state.update(verbose=max(state["verbose"], verbose or 0), quiet=bool(state["quiet"] or quiet),
                     json=bool(state["json"] or as_json), command=fn.__name__)
        try:
            return wrapper(*args, **kwargs)
        except typer.Exit as e:
            if e.exit_code and state["json"]:
                emit_json({"error": state["error"] or f"exit code {e.exit_code}", "exit_code": e.exit_code})
            raise
        finally:
            flush_warnings()

    command.common_options = True  # type: ignore[attr-defined]
    params = [p.replace(default=_with_help(p.default, JSON_HELP)) if p.name == "as_json" else p
              for p in sig.parameters.values()]
    command.__signature__ = sig.replace(parameters=params + extra)  # type: ignore[attr-defined]
    command.__annotations__ = {**fn.__annotations__, **{p.name: p.annotation for p in extra}}
    return command


def with_logging(fn):
    """`fn` with this CLI's logging set up first (for commands that bring their own error handling)."""

    @functools.wraps(fn)
    def logged(*args, **kwargs):
        _setup_logging()
        return fn(*args, **kwargs)

    return logged


def _with_help(info, text: str):
    """A copy of a typer OptionInfo with `text` as its help when it has none."""
    if getattr(info, "help", "x"):
        return info
    info = copy.copy(info)
    info.help = text
    return info


JSON_HELP = "Machine-readable output on stdout (logs stay on stderr); failures too: {\"error\": …, \"exit_code\": …}."


def os_error_line(e: OSError) -> str:
    """An OSError as one line: what failed, on which file, what to do."""
    import errno

    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"disk full{where}: {e.strerror}; free some space (or point TMPDIR elsewhere) and run again"
    if e.errno == errno.EROFS:
        return f"read-only file system{where}; choose a writable --out or TMPDIR"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}; check the file's permissions or choose another path"
    return f"{e.strerror or type(e).__name__}{where}" if e.strerror else f"{type(e).__name__}: {first_line(e)}"


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain(text: str) -> str:
    """Text from files and users made safe for a terminal: one line, control characters (ANSI escapes
    included) shown as \\xNN instead of acting on the terminal."""
    text = " ".join(str(text).replace("\t", " ").splitlines())
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def say_error(text: str) -> None:
    """One line on stderr; the text is printed as it is (never read as markup, no terminal escapes)."""
    from rich.text import Text

    text = plain(for_command(text))
    state["error"] = text
    err.print(Text.assemble(("error:", "bold red"), " ", text), highlight=False)


def for_command(text: str) -> str:
    """Name this command's flag in hints that come from run.py: verify and profile take --provider for
    an ONNX Runtime provider and an OpenVINO device alike (run.py has --device for the latter)."""
    if state["command"] in ("verify", "profile"):
        return text.replace("pass --device ", "pass --provider ")
    return text


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
