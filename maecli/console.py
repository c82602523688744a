"""Messages and progress for the user, on stderr: stdout carries only data (embeddings, JSON, PNG bytes)."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)


def plural(n: int, word: str, words: str | None = None) -> str:
    """`1 loader worker`, `2 loader workers`: the count and the word in the form it takes."""
    return f"{n} {word if n == 1 else words or word + 's'}"


def warn(message: str) -> None:
    from rich.markup import escape

    # escaped: messages carry values, and "[plot]" in a pip command or a path is text, not markup
    console.print(f"[yellow]warning:[/] {escape(message)}", markup=True)


class Progress:
    """A rich progress bar on stderr when it is a terminal. Elsewhere (a log file, CI) a bar is noise, so `line()`
    prints plain lines there instead and `advance`/`update` print nothing.

    with Progress("embed", total=n) as bar:
        bar.advance(k)                                   # inference: count items
        bar.update(step, info="loss 0.71", line=True)    # training: show where it stands, log a line
    """

    def __init__(self, label: str, total: int | None = None, *, keep: bool = False, enabled: bool = True):
        self.label = label
        self.bar = None
        if enabled and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn(f"[bold]{label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn() if keep else TimeElapsedColumn(),
                console=console,
                transient=not keep,
            )
            self.task = self.bar.add_task(label, total=total, info="")
        self.enabled = enabled

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def update(self, completed: int, info: str = "", line: bool = False) -> None:
        """Move the bar to step `completed`; with `line`, print `step N: info` where there is no bar."""
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, info=info)
        elif line and self.enabled:
            console.print(f"step {completed}: {info}")
