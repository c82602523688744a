"""Curves as a picture: read runs' metrics.jsonl and draw loss, learning rate and every other logged series.

matplotlib is an optional extra (`pip install "maecli[plot]"`), imported on first use; figures are drawn on
the Agg canvas directly, so plotting never touches pyplot's global state or a user's interactive backend.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .console import plural
from .errors import UserError
from .files import open_output
from .rundir import CURVES_NAME, METRICS_NAME, SWEEP_NAME, read_json_object, read_metrics, regular_file

# Counters and clocks: they describe a row, they are not curves worth a panel.
NOT_PLOTTED = {"step", "epoch", "time", "images_seen", "images_per_sec"}
# Rows of each kind drawn (up to twice as many): more points than a panel has pixels across. A longer file is read
# as an even spread of its rows, so a huge one draws in seconds and little memory (rundir.read_metrics).
PLOT_ROWS = 2000
TITLES = {
    "loss": "loss",
    "lr": "learning rate",
    "knn_top1": "kNN top-1",
    "knn_top5": "kNN top-5",
    "val_top1": "validation top-1",
    "val_top5": "validation top-5",
    "val_loss": "validation loss",
}
INSTALL_HINT = 'plotting needs matplotlib: pip install "maecli[plot]"'


# ----------------------------------------------------------------------------------------------
# Series from metrics.jsonl's rows (rundir.read_metrics reads the file)


def finite_number(value) -> int | float | None:
    """`value` if it is a finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def metric_series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{name: (steps, values)} for every numeric value logged against an integer step, in step order.

    A row whose step is not after the series' last one starts that series again from there (a resumed run
    whose killed predecessor logged past its last checkpoint): the newer rows win.
    """
    series: dict[str, tuple[list[int], list[int | float]]] = {}
    for row in rows:
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            continue
        for name, value in row.items():
            value = finite_number(value)
            if name in ("step", "epoch") or value is None:
                continue
            steps, values = series.setdefault(name, ([], []))
            while steps and steps[-1] >= step:
                steps.pop()
                values.pop()
            steps.append(step)
            values.append(value)
    return series


# ----------------------------------------------------------------------------------------------
# The figure


@dataclass
class RunCurves:
    label: str
    path: Path
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)


def run_labels(runs: list[Path]) -> list[str]:
    """Each run's folder name; where names repeat, as many parent folders as tell them apart."""
    folders = [(p if p.is_dir() else p.parent).resolve() for p in runs]
    labels = []
    for i, folder in enumerate(folders):
        parts = folder.parts
        for depth in range(1, len(parts) + 1):
            label = "/".join(parts[-depth:])
            others = ["/".join(f.parts[-depth:]) for j, f in enumerate(folders) if j != i]
            if label not in others:
                break
        if folders.count(folder) > 1:  # the same run given twice
            label = f"{label} #{folders[: i + 1].count(folder)}"
        labels.append(label)
    return labels


def panel_names(curves: list[RunCurves]) -> list[str]:
    """Which series get a panel, in order: loss, learning rate, then the rest by name."""
    names = {name for c in curves for name in c.series if name not in NOT_PLOTTED}
    first = [n for n in ("loss", "lr") if n in names]
    return first + sorted(names - set(first))


def metrics_file(run: Path) -> Path:
    """RUN/metrics.jsonl for a run folder; any other path is taken as the metrics file itself."""
    return run / METRICS_NAME if run.is_dir() else run


def load_curves(runs: list[str | os.PathLike], warn: Callable[[str], None] | None = None) -> list[RunCurves]:
    """Read every run's series. A run with nothing to plot is left out with a warning, and damaged lines skipped
    in a metrics file are counted in one; if no run has anything, or a path does not exist or is not a regular file
    (a FIFO), that is a UserError."""
    if not runs:
        raise UserError("no runs to plot; give one or more run folders")
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
    paths = [Path(r) for r in runs]
    for p in paths:
        if not p.exists():
            raise UserError(f"run not found: {p}")
    curves, empty = [], []
    for path, label in zip(paths, run_labels(paths)):
        metrics = metrics_file(path)
        read = read_metrics(metrics, max_rows=PLOT_ROWS)  # a FIFO or a device is refused before it is opened
        if read.bad:
            warn(f"{metrics}: {plural(read.bad, 'damaged line')} skipped")
        series = {k: v for k, v in metric_series(read.rows).items() if k not in NOT_PLOTTED}
        if series:
            curves.append(RunCurves(label, path, series))
        elif regular_file(metrics) is None:
            empty.append(f"{path} has no {METRICS_NAME}")
        else:
            empty.append(f"{path} has no metrics rows yet")
    if not curves:
        raise UserError(f"nothing to plot: {', '.join(empty)}")
    for why in empty:
        warn(f"{why}; left out of the plot")
    return curves


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return Figure, FigureCanvasAgg


def _log_scale_helps(values: list[float]) -> bool:
    """A loss that falls through more than a decade reads better on a log axis."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def make_figure(curves: list[RunCurves]):
    """A matplotlib Figure (on an Agg canvas) with one panel per series and the runs overlaid."""
    Figure, FigureCanvasAgg = _matplotlib()
    names = panel_names(curves)
    cols = 1 if len(names) == 1 else 2 if len(names) <= 4 else 3
    rows = math.ceil(len(names) / cols)
    width, height = 5.2 * cols, 3.6 * rows
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    # fixed margins in inches: a layout engine would cost a second draw (about 0.4 s a picture, each epoch)
    fig.subplots_adjust(
        left=0.85 / width, right=1 - 0.25 / width, bottom=0.6 / height, top=1 - 0.4 / height, wspace=0.3, hspace=0.5
    )
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_title(TITLES.get(name, name))
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        everything = []
        for color, run in enumerate(curves):  # one color per run on every panel
            if name not in run.series:
                continue
            steps, values = run.series[name]
            marker = "o" if len(steps) <= 30 else None  # sparse series (a probe per epoch) show their points
            ax.plot(steps, values, color=f"C{color % 10}", label=run.label, marker=marker, markersize=3, linewidth=1.2)
            everything += values
        if name.endswith("loss") and _log_scale_helps(everything):
            ax.set_yscale("log")
        if name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if i == 0:
            ax.legend(loc="upper right", fontsize="small")
    return fig


def figure_panels(runs: list[str | os.PathLike]) -> list[str]:
    """The panel titles `plot_runs` would draw for these runs, in order: what the picture shows, without pixels."""
    fig = make_figure(load_curves(runs, warn=lambda message: None))
    return [ax.get_title() for ax in fig.axes]


def save_png(fig, out: Path) -> None:
    """Write the figure as PNG through files.open_output: atomically for a file, directly into a device or FIFO."""
    with open_output(out) as f:
        fig.savefig(f, format="png", dpi=110)


def plot_runs(runs: list[str | os.PathLike], out: str | os.PathLike, warn: Callable[[str], None] | None = None) -> Path:
    """Draw the runs' curves into one PNG at `out` and return its path.

    Panels: loss against step (log y when it spans more than a decade), learning rate, and one for every
    other numeric series in metrics.jsonl (kNN top-1, validation accuracy, ...); runs are overlaid, labelled
    by folder name. Runs without rows are left out with `warn` (default: warnings.warn).
    """
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out} is a folder; give a file name for the picture, e.g. {out / CURVES_NAME}")
    sweeps = [Path(run) / SWEEP_NAME for run in runs if (Path(run) / SWEEP_NAME).is_file()]
    if sweeps:
        if len(sweeps) != len(runs):
            raise UserError("give either sweep folders (finetune --fraction A,B) or runs, not both")
        save_png(sweep_figure([read_sweep(path) for path in sweeps], run_labels([Path(r) for r in runs])), out)
        return out
    curves = load_curves(runs, warn)
    save_png(make_figure(curves), out)  # an OutputError names `out` and why
    return out


def read_sweep(path: Path) -> list[dict]:
    """The per-fraction rows of a sweep.json; a damaged file is a UserError naming it."""
    rows = (read_json_object(path) or {}).get("rows")
    ok = isinstance(rows, list) and all(
        isinstance(r, dict)
        and finite_number(r.get("fraction")) is not None
        and all(isinstance(r.get(k), dict) and finite_number(r[k].get("mean")) is not None for k in INITS)
        for r in rows
    )
    if not ok or not rows:
        raise UserError(f"{path} holds no sweep rows")
    return sorted(rows, key=lambda r: r["fraction"])


INITS = ("pretrained", "scratch")


def sweep_figure(sweeps: list[list[dict]], labels: list[str]):
    """Top-1 against the fraction of labels, one line per init (and per sweep), with the seeds' std as bars."""
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.13, top=0.9)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title("did pretraining pay? top-1 by the labels used")
    ax.set_xlabel("fraction of the training labels")
    ax.set_ylabel("top-1 (%)")
    ax.grid(True, alpha=0.3)
    for i, (rows, label) in enumerate(zip(sweeps, labels)):
        x = [r["fraction"] for r in rows]
        for j, init in enumerate(INITS):
            y = [100 * r[init]["mean"] for r in rows]
            err = [100 * (finite_number(r[init].get("std")) or 0) for r in rows]
            name = init if len(sweeps) == 1 else f"{label}: {init}"
            style = "-" if init == "pretrained" else "--"
            ax.errorbar(x, y, yerr=err, fmt=style + "o", color=f"C{(2 * i + j) % 10}", label=name, capsize=3)
    fractions = [r["fraction"] for rows in sweeps for r in rows]
    if max(fractions) / min(fractions) > 10:
        ax.set_xscale("log")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def write_curves(run: str | os.PathLike) -> Path | None:
    """RUN/curves.png from the run's metrics, for the training loop at each epoch end.

    Returns None when there is nothing to draw or drawing fails (the caller warns: a picture is not worth a
    run); only a missing matplotlib raises, as a UserError naming the pip command.
    """
    _matplotlib()
    try:
        return plot_runs([run], Path(run) / CURVES_NAME, warn=lambda message: None)
    except Exception:  # noqa: BLE001 -- any failure to draw is the caller's warning, never the run's end
        return None
