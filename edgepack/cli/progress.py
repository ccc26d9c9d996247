"""Progress on stderr for long commands: a Rich status line for steps, a bar for training epochs."""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, console, enabled: bool = True):
        from edgepack.cli.common import state

        self.console, self.enabled = console, enabled and console.is_terminal and not state["quiet"]
        self._status: Any = None
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._status = self.console.status("starting")
            self._status.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._close_bar()
        if self._status is not None:
            self._status.__exit__(*exc)

    def _say(self, text: str) -> None:
        if self._status is not None:
            self._status.update(text)
        log.debug(text)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None

    def event(self, event: str, **data) -> None:
        kind = event
        if kind == "phase":
            self._say(f"{data['name']}…")
        elif kind == "step":
            self._say(f"step {data['name']}…")
        elif kind == "candidate":
            self._say(f"{data['phase']} {data['name']}…")
        elif kind == "measure":
            self._say(f"timing {len(data['names'])} candidates, interleaved…")
        elif kind == "epoch":
            self._epoch(**data)
        elif kind == "progress":
            self._say(str(data.get("message", "")))

    def _epoch(self, epoch: int, total: int, loss: float, eval_acc: float | None = None, **_):
        if not self.enabled:
            log.info("epoch %d/%d loss %.4f eval %s", epoch, total, loss, f"{eval_acc:.4f}" if eval_acc is not None else "-")
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
        from rich.progress import Progress as Bar

        if self._bar is None:
            self._bar = Bar(TextColumn("fine-tuning"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), console=self.console, transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=total, info="")
        acc = f" eval acc {eval_acc:.4f}" if eval_acc is not None else ""
        self._bar.update(self._task, completed=epoch, total=total, info=f"loss {loss:.4f}{acc}")
        if epoch >= total:
            self._close_bar()
