"""Messages and progress for the user, on stderr: stdout carries only data (embeddings, JSON, PNG bytes)."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)


def plural(n: int, word: str, words: str | None = None) -> str:
    """`1 loader worker`, `2 loader workers`, `1,234 rows`: the count and the word in the form it takes."""
    return f"{n:,} {word if n == 1 else words or word + 's'}"


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

            # the counter and the time come before the bar and the info: on an 80-column terminal the info is what
            # gets cut, not the step count
            self.bar = RichProgress(
                TextColumn(f"[bold]{label}"),
                MofNCompleteColumn(),
                TimeRemainingColumn() if keep else TimeElapsedColumn(),
                BarColumn(bar_width=12),
                TextColumn("{task.fields[info]}"),
                console=console,
                transient=not keep,
            )
            self.task = self.bar.add_task(label, total=total, info="")
        self.enabled, self.total = enabled, total
        self.started = None  # (time, count) at the first update: a resumed run's rate counts only its own steps

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
        """Move the bar to step `completed`; with `line`, print `step N/T: info, elapsed, time left` where there is
        no bar (a log file), as the bar would show it."""
        import time

        now = time.monotonic()
        if self.started is None:
            self.started = (now, completed)
        if self.bar is not None:
            room = max(0, self.bar.console.width - len(self.label) - 2 * len(str(self.total)) - 30)
            self.bar.update(self.task, completed=completed, info=info if len(info) <= room else info[: room - 1] + "…")
        elif line and self.enabled:
            console.print(
                f"step {completed}{f'/{self.total}' if self.total else ''}: {info}{self.timing(completed, now)}"
            )

    def timing(self, completed: int, now: float) -> str:
        """`, 1m05s elapsed, 4m10s left` from the rate since the first update; the estimate once there is one."""
        t0, first = self.started
        text = f", {clock(now - t0)} elapsed"
        if self.total and completed > first and now > t0:
            text += f", {clock((self.total - completed) * (now - t0) / (completed - first))} left"
        return text


def clock(seconds: float) -> str:
    """12s, 4m05s, 2h03m."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
