"""What the user reads on stderr: step lines in a log file carry the time as the terminal's bar does, and the bar
keeps its step counter on an 80-column terminal."""

import io

from rich.console import Console

from maecli import console as C


def test_log_lines_carry_elapsed_and_time_left(monkeypatch):
    clock = iter([100.0, 160.0, 220.0])
    monkeypatch.setattr("time.monotonic", lambda: next(clock))
    with C.console.capture() as captured:
        bar = C.Progress("pretrain", 100)  # stderr is no terminal here: plain lines
        bar.update(50, "starting")  # a resumed run: its rate counts from here
        bar.update(60, "loss 0.5", line=True)
        bar.update(70, "loss 0.4", line=True)
    lines = captured.get().splitlines()
    assert lines == [
        "step 60/100: loss 0.5, 1m00s elapsed, 4m00s left",
        "step 70/100: loss 0.4, 2m00s elapsed, 3m00s left",
    ]


def test_the_bar_keeps_its_counter_at_80_columns(monkeypatch):
    narrow = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    monkeypatch.setattr(C, "console", narrow)
    with C.Progress("pretrain", 1620, keep=True) as bar:
        bar.update(1234, "epoch 23/30 loss 0.5912 lr 1.04e-03 13.4 img/s and a long tail of words", line=True)
        bar.bar.refresh()
    assert "1234/1620" in narrow.file.getvalue()
