"""`maecli plot` and `maecli info` on run folders written by hand (config.json, metrics.jsonl, checkpoints and a
real tiny model's weights), so they test the reading, not the training loop."""

import contextlib
import json
import math
import os
import shutil
import signal
import sys

import pytest
from conftest import EXAMPLES

from maecli.errors import UserError
from maecli.info import format_info, preset_name, run_info
from maecli.plot import metric_series
from maecli.rundir import read_metrics

CFG = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "decoder_dim": 32,
    "decoder_depth": 1,
    "decoder_heads": 2,
}
TOTAL = 40  # steps of a whole hand-made run: 4 epochs of 10


def model_config() -> dict:
    from maecli.model import MAEConfig

    return MAEConfig(**CFG).to_dict()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A real tiny MAE's model.safetensors (with the decoder), written once and copied into each run."""
    from maecli.model import MAE, MAEConfig
    from maecli.weights import save_weights

    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_weights(MAE(MAEConfig(**CFG)), path)
    return path


def train_rows(first: int, last: int, every: int = 2, scale: float = 1.0) -> list[dict]:
    """Training rows as pretrain logs them: the loss falls through two decades, the lr warms up then decays."""
    rows = []
    for step in range(first, last + 1, every):
        rows.append(
            {
                "step": step,
                "epoch": step / 10,
                "loss": scale * math.exp(-step / 8.0),
                "lr": 1e-3 * min(step / 10, 1.0) * (1 + math.cos(math.pi * step / TOTAL)) / 2,
                "images_per_sec": 100.0,
                "images_seen": step * 4,
                "time": step * 0.5,
            }
        )
    return rows


def probe_rows(epochs) -> list[dict]:
    return [{"step": e * 10, "epoch": e, "knn_top1": 0.2 + 0.1 * e, "knn_top5": 0.6 + 0.05 * e} for e in epochs]


def write_metrics(run, rows, tail: str = ""):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def make_run(
    root,
    weights,
    *,
    logged=TOTAL,
    checkpoints=(20, 40),
    rows=None,
    data=None,
    with_weights=True,
    skipped=None,
    config_extra=None,
):
    """A pretrain run folder: config.json, metrics.jsonl up to step `logged`, complete checkpoints at the given
    steps, the weights file."""
    root.mkdir(parents=True, exist_ok=True)
    train = {
        "data": str(data or root / "no-such-photos"),
        "out": str(root),
        "model": "vit-tiny",
        "img_size": 32,
        "epochs": 4,
        "steps": None,
        "batch_size": 4,
        "blr": 1.5e-4,
        "lr": None,
        "mask": 0.75,
        "seed": 0,
        "warmup_epochs": 1,
        "accum_iter": 1,
    }
    config = {"model": model_config(), "train": train, **(config_extra or {})}
    (root / "config.json").write_text(json.dumps(config))
    write_metrics(root, train_rows(2, logged) + probe_rows(range(1, logged // 10 + 1)) if rows is None else rows)
    for step in checkpoints:
        add_checkpoint(root, weights, step, skipped=skipped)
    if with_weights:
        shutil.copy(weights, root / "model.safetensors")
    return root


def add_checkpoint(run, weights, step, skipped=None, files=("model.safetensors", "optimizer.pt", "state.json")):
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    ckpt.mkdir(parents=True, exist_ok=True)
    if "model.safetensors" in files:
        shutil.copy(weights, ckpt / "model.safetensors")
    if "optimizer.pt" in files:
        (ckpt / "optimizer.pt").write_bytes(b"\0" * 1000)
    if "state.json" in files:
        state = {
            "step": step,
            "epoch": step / 10,
            "images_seen": step * 4,
            "total_steps": TOTAL,
            "seconds": step * 0.5,
            "images": 8,
            "processes": 1,
            "skipped": skipped or {},
        }
        (ckpt / "state.json").write_text(json.dumps(state))
    return ckpt


# Lines of a damaged metrics.jsonl: a null step, a byte that is not UTF-8, a step of 10^400 (three lines skipped),
# and a loss of +-1e308 (dropped from its row, which stays).
DAMAGED = [
    b'{"step": null, "loss": 1.0}',
    b'{"step": 41, "loss": 0.5, "note": "\xff"}',
    b'{"step": 1' + b"0" * 400 + b', "loss": 0.5}',
    b'{"step": 42, "loss": 1e308, "lr": 1e-4}',
    b'{"step": 43, "loss": -1e308, "lr": 1e-4}',
]


def damage(run):
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"".join(line + b"\n" for line in DAMAGED))


@contextlib.contextmanager
def within(seconds: int):
    """Fail, rather than hang the suite, when the body blocks (opening a FIFO waits for a writer forever)."""

    def stuck(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- reading metrics.jsonl --------------------------------------------------------------------------


def test_half_written_last_line_is_dropped(tmp_path):
    write_metrics(tmp_path, train_rows(2, 10), tail='{"step": 12, "epoch": 1.2, "lo')
    m = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in m.rows] == [2, 4, 6, 8, 10] and m.bad == 1
    assert read_metrics(tmp_path / "missing.jsonl").rows == []


def test_thinning_keeps_every_row_of_a_sparse_kind_and_parses_few_lines(tmp_path, monkeypatch):
    """A huge metrics.jsonl is read for a picture in bounded memory and time: the rows logged every few steps are
    thinned, a probe's row an epoch is kept whole, each kind's last row is kept, and only kept lines are parsed."""
    from maecli import rundir

    rows = []
    for step in range(1, 5001):
        rows.append({"step": step, "epoch": step / 100, "loss": 1 / step, "lr": 1e-4})
        if step % 250 == 0:
            rows.append({"step": step, "epoch": step // 250, "knn_top1": step / 5000})
    write_metrics(tmp_path, rows[:2600], tail='{"step": null, "loss": 1}\n')
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows[2600:]))
    parsed, clean_row = [], rundir.clean_row
    monkeypatch.setattr(rundir, "clean_row", lambda line: parsed.append(line) or clean_row(line))
    m = read_metrics(tmp_path, max_rows=100)
    assert m.thinned and m.lines == len(rows) + 1 and m.bad == 1  # the damaged line is a kind of its own
    knn = [r["step"] for r in m.rows if "knn_top1" in r]
    assert knn == list(range(250, 5001, 250))
    steps = [r["step"] for r in m.rows if "loss" in r]
    assert 100 <= len(steps) < 200 and steps[0] == 1 and steps[-1] == 5000 and steps == sorted(steps)
    assert len(parsed) < 1000  # of 5021 lines: 2 x max_rows, then max_rows more each time the stride doubles
    assert [r["step"] for r in m.rows] == sorted(r["step"] for r in m.rows)


def test_resumed_metrics_keep_the_newer_rows(tmp_path):
    """A killed run logged up to step 30 past its checkpoint at 20; the resumed run logs 22.. again."""
    rows = train_rows(2, 30) + train_rows(22, 40, scale=2.0) + probe_rows([1, 2, 3, 2, 3, 4])
    steps, losses = metric_series(rows)["loss"]
    assert steps == list(range(2, 41, 2))
    assert losses[steps.index(30)] == pytest.approx(2.0 * math.exp(-30 / 8))  # the resumed run's value
    assert losses[steps.index(20)] == pytest.approx(math.exp(-20 / 8))
    assert metric_series(rows)["knn_top1"][0] == [10, 20, 30, 40]
    # rows without an integer step, and values that are not finite numbers, are not series
    series = metric_series([{"step": "x", "loss": 1.0}, {"step": 3, "loss": float("nan"), "note": "hi", "flag": True}])
    assert series == {}


# -- plot ---------------------------------------------------------------------------------------------


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib")


def figure(runs):
    from maecli.plot import load_curves, make_figure

    return make_figure(load_curves(runs, warn=lambda message: None))


def test_plot_writes_a_png_with_a_panel_per_series(tmp_path, weights, mpl):
    from maecli.plot import figure_panels, plot_runs

    run = make_run(tmp_path / "run", weights)
    out = plot_runs([run], tmp_path / "pics" / "curves.png")
    assert out == tmp_path / "pics" / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary file left behind
    assert figure_panels([run]) == ["loss", "learning rate", "kNN top-1", "kNN top-5"]
    fig = figure([run])
    loss, lr, knn = fig.axes[:3]
    assert loss.get_yscale() == "log"  # two decades of loss
    assert lr.get_yscale() == "linear"
    assert [ax.get_xlabel() for ax in fig.axes] == ["step"] * 4
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "lr", "knn_top1", "knn_top5"]
    assert list(knn.lines[0].get_xdata()) == [10, 20, 30, 40]
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["run"]


def test_a_narrow_loss_stays_linear(tmp_path, mpl):
    write_metrics(tmp_path / "run", [{"step": s, "loss": 0.5 + 0.01 * s, "lr": 1e-4} for s in range(1, 20)])
    assert figure([tmp_path / "run"]).axes[0].get_yscale() == "linear"


def test_two_runs_overlay_with_a_legend(tmp_path, weights, mpl):
    """Two recipes whose folders share a name; the second also logs finetune-style validation rows."""
    a = make_run(tmp_path / "a" / "run", weights)
    b = make_run(
        tmp_path / "b" / "run",
        weights,
        rows=train_rows(2, 30)
        + [
            {"step": 10, "epoch": 1, "val_top1": 0.5, "val_loss": 1.2},
            {"step": 20, "epoch": 2, "val_top1": 0.6, "val_loss": 1.0},
        ],
    )
    fig = figure([a, b])
    assert [ax.get_title() for ax in fig.axes] == [
        "loss",
        "learning rate",
        "kNN top-1",
        "kNN top-5",
        "validation loss",
        "validation top-1",
    ]
    loss = fig.axes[0]
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["a/run", "b/run"]
    assert [line.get_label() for line in loss.lines] == ["a/run", "b/run"]
    assert loss.lines[0].get_color() != loss.lines[1].get_color()
    assert [line.get_label() for line in fig.axes[-1].lines] == ["b/run"]  # only b has validation rows
    assert fig.axes[-1].lines[0].get_color() == loss.lines[1].get_color()  # a run keeps its color


def test_the_same_run_twice_gets_two_labels(tmp_path, weights, mpl):
    run = make_run(tmp_path / "run", weights)
    labels = [t.get_text() for t in figure([run, run]).axes[0].get_legend().get_texts()]
    assert len(set(labels)) == 2 and all("run" in label for label in labels)


def test_plot_a_run_in_progress(tmp_path, weights, mpl):
    """Halfway through, the last line being written: the rows so far are drawn."""
    run = make_run(tmp_path / "run", weights, logged=24, checkpoints=[20], with_weights=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 26, "epoch": 2.6, "loss": 0.0')
    loss = figure([run]).axes[0]
    assert list(loss.lines[0].get_xdata()) == list(range(2, 25, 2))


def test_plot_resumed_metrics(tmp_path, weights, mpl):
    run = make_run(tmp_path / "run", weights, rows=train_rows(2, 30) + train_rows(22, 40))
    xs = list(figure([run]).axes[0].lines[0].get_xdata())
    assert xs == sorted(set(xs)) == list(range(2, 41, 2))


def test_empty_or_missing_metrics(tmp_path, weights, mpl):
    from maecli.plot import load_curves, plot_runs

    empty = tmp_path / "empty"
    write_metrics(empty, [])
    missing = tmp_path / "missing"
    missing.mkdir()
    with pytest.raises(UserError, match="nothing to plot: .*empty has no metrics rows yet, .*missing has no metrics"):
        plot_runs([empty, missing], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
    with pytest.raises(UserError, match="not found"):
        plot_runs([tmp_path / "nowhere"], tmp_path / "c.png")
    with pytest.raises(UserError, match="no runs"):
        plot_runs([], tmp_path / "c.png")
    # with one good run, the empty one is left out with a warning
    good = make_run(tmp_path / "good", weights)
    warned = []
    assert [c.path for c in load_curves([empty, good, missing], warn=warned.append)] == [good]
    assert len(warned) == 2 and "no metrics rows" in warned[0] and "no metrics.jsonl" in warned[1]
    with pytest.warns(UserWarning, match="left out of the plot"):  # the default: a Python warning
        load_curves([empty, good])
    with pytest.raises(UserError, match="is a folder"):
        plot_runs([good], tmp_path)


def test_plot_skips_damaged_lines_and_counts_them(tmp_path, weights, mpl):
    from maecli.plot import plot_runs

    run = make_run(tmp_path / "run", weights)
    damage(run)
    warned = []
    plot_runs([run], tmp_path / "c.png", warn=warned.append)
    assert warned == [f"{run / 'metrics.jsonl'}: 3 damaged lines skipped"]
    loss, lr = figure([run]).axes[:2]
    assert list(loss.lines[0].get_xdata()) == list(range(2, 41, 2))  # +-1e308 is not a loss
    assert list(lr.lines[0].get_xdata())[-2:] == [42, 43]  # the rest of those rows stays
    write_metrics(run, train_rows(2, 10), tail='{"step": null}\n')
    warned.clear()
    plot_runs([run], tmp_path / "c.png", warn=warned.append)
    assert warned == [f"{run / 'metrics.jsonl'}: 1 damaged line skipped"]


def test_plot_refuses_a_fifo_without_opening_it(tmp_path, weights, mpl):
    from maecli.plot import plot_runs

    run = make_run(tmp_path / "run", weights)
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")
    os.mkfifo(tmp_path / "pipe.jsonl")
    for given in (run, tmp_path / "pipe.jsonl"):
        with within(10), pytest.raises(UserError, match="not a regular file"):
            plot_runs([given], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_write_curves(tmp_path, weights, mpl):
    from maecli.plot import write_curves

    run = make_run(tmp_path / "run", weights)
    assert write_curves(run) == run / "curves.png"
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    write_metrics(run, [])
    assert write_curves(run) is None  # nothing to draw: the caller warns, the run goes on


def test_missing_matplotlib_names_the_extra(tmp_path, weights, monkeypatch):
    from maecli.plot import plot_runs, write_curves

    run = make_run(tmp_path / "run", weights)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r'pip install "maecli\[plot\]"'):
        plot_runs([run], tmp_path / "c.png")
    with pytest.raises(UserError, match="matplotlib"):
        write_curves(run)


# -- info ---------------------------------------------------------------------------------------------


def images(root, n=3):
    root.mkdir(parents=True)
    for f in sorted(EXAMPLES.glob("*.jpg"))[:n]:
        shutil.copy(f, root / f.name)
    return root


def state_dict_size() -> int:
    from maecli.model import MAE, MAEConfig

    return sum(t.numel() for t in MAE(MAEConfig(**CFG)).state_dict().values())


def said(info) -> str:
    """format_info's text with runs of spaces as one, so the checks do not depend on column widths."""
    return " ".join(format_info(info).split())


def test_info_finished_run(tmp_path, weights):
    run = make_run(tmp_path / "run", weights, data=images(tmp_path / "photos"))
    info = run_info(run)
    json.dumps(info, allow_nan=False)
    assert info["kind"] == "pretrain run" and info["status"] == "finished"
    assert info["command"] == "pretrain" and info["scratch"] is False  # guessed: the config does not say
    assert info["model"]["config"] == model_config() and info["model"]["preset"] is None
    assert info["model"]["has_decoder"] is True
    assert info["model"]["parameters"]["total"] == state_dict_size()
    assert info["data"] == {"path": str(tmp_path / "photos"), "exists": True, "images": 3, "images_at_start": 8}
    assert info["progress"]["step"] == info["progress"]["total_steps"] == TOTAL
    assert info["progress"]["epoch"] == 4 and info["progress"]["epochs"] == 4
    assert info["progress"]["images_seen"] == TOTAL * 4 and info["progress"]["seconds"] == TOTAL * 0.5
    loss = info["metrics"]["loss"]
    assert loss["last_step"] == TOTAL and loss["best_step"] == TOTAL and loss["best"] == loss["last"]
    assert info["metrics"]["knn_top1"]["best"] == pytest.approx(0.6) and info["metrics"]["knn_top1"]["best_epoch"] == 4
    assert [(c["step"], c["resumable"]) for c in info["checkpoints"]] == [(20, True), (40, True)]
    assert info["weights"]["bytes"] == weights.stat().st_size and info["weights"]["has_decoder"]
    text = said(info)
    for part in (
        "pretrain run, finished",
        "custom: 32 wide, 2 deep, 2 heads",
        "3 images; 8 when the run started",
        "4 epochs, batch 4, blr 0.00015, mask 0.75",
        "step 40 of 40, epoch 4 of 4, 160 images seen",
        "knn_top1",
        "step-00000040",
        "resumable (newest)",
        str(run / "model.safetensors"),
    ):
        assert part in text, (part, text)
    assert "--resume" not in text


def test_info_in_progress_run(tmp_path, weights):
    """Step 24 of 40 logged, the checkpoint at 20, a save under way, no weights yet, data folder gone."""
    run = make_run(tmp_path / "run", weights, logged=24, checkpoints=[20], with_weights=False)
    tmp_save = run / "checkpoints" / ".tmp-step-00000030-123"
    tmp_save.mkdir()
    (tmp_save / "model.safetensors").write_bytes(b"partial")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 26, "lo')
    info = run_info(run)
    json.dumps(info, allow_nan=False)
    assert info["status"] == "unfinished"
    assert info["progress"]["step"] == 24 and info["progress"]["checkpoint_step"] == 20
    assert info["progress"]["seconds_since_last_write"] < 60
    assert info["weights"] is None
    assert info["model"]["parameters"]["total"] == state_dict_size()  # from the newest checkpoint's header
    assert info["data"]["exists"] is False and info["data"]["images"] is None
    assert [(c["name"], c["complete"], c["resumable"]) for c in info["checkpoints"]] == [
        ("step-00000020", True, True),
        (".tmp-step-00000030-123", False, False),
    ]
    text = said(info)
    for part in (
        "unfinished (in progress, or stopped; last write",
        "step 24 of 40",
        "resumes from step 20",
        "--resume",
        "incomplete: an unfinished save",
        "weights none yet",
        "(not found here)",
    ):
        assert part in text, (part, text)


def test_info_killed_run(tmp_path, weights):
    """Killed long ago at step 30, its last checkpoint missing a file; two files skipped on the way."""
    skipped = {"photos/bad.jpg": "truncated file", "photos/empty.png": "zero bytes"}
    run = make_run(tmp_path / "run", weights, logged=30, checkpoints=[10, 20], skipped=skipped)
    add_checkpoint(run, weights, 30, files=("model.safetensors", "state.json"))
    old = 1_000_000_000
    for p in [run / "metrics.jsonl", run / "model.safetensors", run / "checkpoints", *(run / "checkpoints").iterdir()]:
        os.utime(p, (old, old))
    info = run_info(run)
    assert info["status"] == "unfinished" and info["progress"]["checkpoint_step"] == 20
    assert info["progress"]["seconds_since_last_write"] > 3600
    assert info["skipped"] == skipped
    assert info["checkpoints"][-1]["step"] == 30 and not info["checkpoints"][-1]["resumable"]
    text = said(info)
    for part in (
        "h ",
        "2 unreadable files: photos/bad.jpg (truncated file)",
        "incomplete: missing optimizer.pt",
        "resumes from step 20",
    ):
        assert part in text, (part, text)


def test_info_on_a_run_does_not_import_torch(tmp_path, weights):
    """info reads a run (its headers, its data folder) without the seconds torch takes to import."""
    import subprocess

    from conftest import ROOT

    photos = images(tmp_path / "photos")
    run = make_run(tmp_path / "run", weights, logged=24, checkpoints=[20], with_weights=False, data=photos)
    code = (
        "import sys; from maecli.info import run_info; info = run_info(sys.argv[1]); "
        "assert info['model']['parameters'] and info['data']['images'] == 3, info; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm')))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout == "[]\n", done.stderr


def test_info_shows_the_data_statistics_a_run_records(tmp_path, weights):
    """The bands, units, per-band mean and std and the bands chosen, in the text and --json; none for an old run."""
    run = make_run(tmp_path / "run", weights)
    config = json.loads((run / "config.json").read_text())
    stats = {"mean": [30120.5, 0.25, 7.0], "std": [80.25, 0.125, 2.0], "bands": [4, 3, 2], "units": "native"}
    config["model"].update(stats)
    (run / "config.json").write_text(json.dumps(config))
    r = invoke("info", run, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["statistics"] == {"in_chans": 3, **stats}
    r = invoke("info", run)
    assert r.exit_code == 0, r.output
    line = next(line for line in r.stdout.splitlines() if line.strip().startswith("statistics"))
    assert " ".join(line.split()) == (
        "statistics 3 bands (bands 4,3,2 of the files), native units; mean 3.012e+04, 0.25, 7; std 80.25, 0.125, 2"
    )
    config["model"].update(bands=None, mean=[float(i) for i in range(12)], std=[1.0] * 12)
    (run / "config.json").write_text(json.dumps(config))
    text = said(run_info(run))
    assert "statistics 12 bands (all the files' bands), native units; mean 0, 1, 2, 3, 4, 5, 6, 7, ...;" in text
    config["model"].update(mean=None, std=None)  # a run from before the statistics: ImageNet's, nothing to show
    (run / "config.json").write_text(json.dumps(config))
    assert run_info(run)["statistics"] is None and "statistics" not in said(run_info(run))
    config["model"].update(mean="lots", std=[1.0])  # damaged: not shown rather than a traceback
    (run / "config.json").write_text(json.dumps(config))
    assert run_info(run)["statistics"] is None


def test_info_lr_says_highest_logged_and_the_schedules_peak(tmp_path, weights):
    """A run in warmup has logged less than the schedule's peak: "peak" was read as the schedule's."""
    run = make_run(tmp_path / "run", weights, logged=8, checkpoints=[])
    lr = run_info(run)["metrics"]["lr"]
    assert (lr["highest_step"], lr["schedule_peak"]) == (8, None) and lr["highest"] == lr["last"] < 1e-3
    text = said(run_info(run))
    assert f"highest logged {lr['highest']:.3g} (step 8)" in text and "peak" not in text
    config = json.loads((run / "config.json").read_text())
    config["train"]["lr"] = 1e-3  # set by hand: the schedule's peak is known
    (run / "config.json").write_text(json.dumps(config))
    assert run_info(run)["metrics"]["lr"]["schedule_peak"] == 1e-3
    assert f"highest logged {lr['highest']:.3g} (step 8); the schedule's peak 0.001" in said(run_info(run))
    config["schedule"] = {"peak_lr": 2e-3}  # as a training command plans it (batch and blr on its machine)
    (run / "config.json").write_text(json.dumps(config))
    assert run_info(run)["metrics"]["lr"]["schedule_peak"] == 2e-3


def test_info_counts_in_words(tmp_path, weights):
    """One of a thing is singular: "1 image", "1 unreadable file", "1 image seen", "1 damaged line"."""
    run = make_run(tmp_path / "run", weights, skipped={"a.jpg": "truncated"}, data=images(tmp_path / "photos", n=1))
    write_metrics(run, [{"step": 1, "loss": 1.0, "images_seen": 1}], tail="{\n")
    text = said(run_info(run))
    for part in ("(1 image;", "1 image seen", "1 unreadable file: a.jpg", "1 damaged line skipped"):
        assert part in text, (part, text)


def test_info_and_plot_read_a_long_file_as_a_spread(tmp_path, weights, monkeypatch):
    """Past INFO_ROWS (PLOT_ROWS) rows of a kind, a metrics.jsonl is read as an even spread of them: each kind's
    last row and every probe row are kept, and info says the best of the rest is of a spread."""
    from maecli import info as info_module
    from maecli import plot

    run = make_run(tmp_path / "run", weights, rows=train_rows(1, 2000, every=1) + probe_rows(range(1, 5)))
    monkeypatch.setattr(info_module, "INFO_ROWS", 50)
    info = run_info(run)
    spread = "2,004 lines, read as an even spread of rows; a lowest or best value may fall between them"
    assert info["notes"] == [f"{run / 'metrics.jsonl'}: {spread}"]
    assert info["metrics"]["loss"]["last_step"] == 2000 and info["progress"]["step"] == 2000
    assert info["metrics"]["knn_top1"]["best"] == pytest.approx(0.6) and info["metrics"]["knn_top1"]["best_step"] == 40
    monkeypatch.setattr(plot, "PLOT_ROWS", 50)
    curves = plot.load_curves([run], warn=lambda message: None)[0].series
    assert 50 <= len(curves["loss"][0]) < 100 and curves["loss"][0][-1] == 2000
    assert curves["knn_top1"][0] == [10, 20, 30, 40]


def test_info_not_started(tmp_path, weights):
    run = make_run(tmp_path / "run", weights, rows=[], checkpoints=[], with_weights=False)
    info = run_info(run)
    assert info["status"] == "not started" and info["metrics"] == {} and info["checkpoints"] == []
    assert info["model"]["parameters"] is None and info["model"]["has_decoder"] is None  # no weights to count yet
    assert "checkpoints none" in said(info) and "custom: 32 wide, 2 deep, 2 heads; 32 px" in said(info)


def test_info_finetune_run(tmp_path, weights):
    """A finetune-style run: its args under "finetune", class names, validation rows, keys info does not know."""
    run = tmp_path / "ft"
    run.mkdir()
    config = {
        "model": {**model_config(), "num_classes": 2, "global_pool": True},
        "classes": ["cat", "dog"],
        "finetune": {"data": str(tmp_path / "pets"), "epochs": 2, "batch_size": 8, "lr": 1e-3, "label_smoothing": 0.1},
        "head": {"something": "new"},
    }
    (run / "config.json").write_text(json.dumps(config))
    rows = [
        {"step": 5, "epoch": 1, "loss": 0.9, "lr": 1e-3},
        {"step": 5, "epoch": 1, "val_top1": 0.7, "val_loss": 0.8},
        {"step": 10, "epoch": 2, "loss": 0.5, "lr": 1e-4},
        {"step": 10, "epoch": 2, "val_top1": 0.65, "val_loss": 0.6},
    ]
    write_metrics(run, rows)
    shutil.copy(weights, run / "model.safetensors")
    info = run_info(run)
    json.dumps(info, allow_nan=False)
    assert info["kind"] == "finetune run" and info["classes"] == ["cat", "dog"] and info["command"] == "finetune"
    assert info["metrics"]["val_top1"]["best"] == 0.7 and info["metrics"]["val_top1"]["best_epoch"] == 1
    assert info["metrics"]["val_loss"]["best"] == 0.6 and info["metrics"]["val_loss"]["best_step"] == 10
    assert info["recipe"]["label_smoothing"] == 0.1
    text = said(info)
    for part in (
        "finetune run",
        "classes 2: cat, dog",
        "val_top1",
        "best 0.7000 (step 5, epoch 1)",
        "val_loss",
        "lowest 0.6000",
        "2 epochs, batch 8, lr 0.001",
    ):
        assert part in text, (part, text)


def test_info_takes_the_command_from_the_config(tmp_path, weights):
    """config.json's "command" says which command made the run; without it (older runs) info guesses from the
    sections, and the guess can be wrong where the key settles it."""
    run = make_run(tmp_path / "run", weights, config_extra={"classes": ["cat", "dog"]})
    assert run_info(run)["kind"] == "finetune run"  # the guess: class names mean finetune
    make_run(run, weights, config_extra={"command": "pretrain", "classes": ["cat", "dog"]})
    info = run_info(run)
    assert info["kind"] == "pretrain run" and info["command"] == "pretrain" and info["recipe"]["epochs"] == 4

    recipe = {"data": str(tmp_path / "pets"), "epochs": 2, "batch_size": 8, "lr": 1e-3}
    ft = tmp_path / "ft"
    write_metrics(ft, [{"step": 5, "epoch": 1, "loss": 0.9}])
    baseline = {**recipe, "scratch": True}
    for config, kind, scratch in [
        ({"command": "finetune", "finetune": recipe}, "finetune run", False),
        ({"command": "finetune", "finetune": baseline}, "finetune run", True),
        ({"finetune": baseline}, "finetune run", True),  # guessed
        ({"command": "serve", "train": recipe}, "pretrain run", False),  # a command info does not know: guessed
    ]:
        (ft / "config.json").write_text(json.dumps({"model": model_config(), **config}))
        info = run_info(ft)
        assert (info["kind"], info["scratch"], info["recipe"]["epochs"]) == (kind, scratch, 2), config
        assert ("finetune run from scratch (a baseline)," in said(info)) == scratch


def test_info_plain_weights(tmp_path, weights):
    info = run_info(weights)
    json.dumps(info, allow_nan=False)
    assert info["kind"] == "weights" and info["model"]["has_decoder"] is True
    assert info["model"]["config"] == model_config()
    assert info["model"]["parameters"]["total"] == state_dict_size()
    assert info["weights"]["bytes"] == weights.stat().st_size
    assert "weights, with the decoder" in format_info(info)


def test_info_encoder_only_weights_in_a_folder(tmp_path):
    from maecli.model import MAE, MAEConfig
    from maecli.weights import save_weights

    folder = tmp_path / "exported"
    folder.mkdir()
    save_weights(MAE(MAEConfig(**CFG), decoder=False), folder / "model.safetensors")
    info = run_info(folder)
    assert info["kind"] == "weights" and info["model"]["has_decoder"] is False
    assert info["model"]["parameters"]["decoder"] == 0
    assert "encoder only" in format_info(info)


def test_preset_names():
    assert preset_name({"embed_dim": 192, "depth": 12, "num_heads": 3}) == "vit-tiny"
    assert preset_name({"embed_dim": 768, "depth": 12, "num_heads": 12}) == "vit-base"
    assert preset_name(CFG) is None


def test_info_bad_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run_info(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError) as e:
        run_info(tmp_path / "notes.txt")
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):
        run_info(tmp_path / "empty")


def test_info_skips_damaged_metrics_lines_and_says_how_many(tmp_path, weights):
    run = make_run(tmp_path / "run", weights)
    damage(run)
    info = run_info(run)
    assert info["notes"] == [f"{run / 'metrics.jsonl'}: 3 damaged lines skipped"]
    assert info["metrics"]["loss"]["last_step"] == TOTAL  # +-1e308 is no loss
    assert info["metrics"]["lr"]["last_step"] == 43 and info["progress"]["step"] == 43
    assert f"note: {run / 'metrics.jsonl'}: 3 damaged lines skipped" in said(info)
    write_metrics(run, train_rows(2, 10), tail="\xff\n")
    assert run_info(run)["notes"] == [f"{run / 'metrics.jsonl'}: 1 damaged line skipped"]


def test_info_tolerates_wrong_types_in_config_and_state(tmp_path, weights):
    """Hand-edited or damaged files: a word where a size belongs, a list where the recipe belongs, strings and
    lists in state.json. Each is left out or shown as written, never a TypeError."""
    run = make_run(tmp_path / "run", weights)
    config = json.loads((run / "config.json").read_text())
    config["model"]["img_size"] = "big"
    config["train"] = {**config["train"], "accum_iter": "2", "batch_size": [4], "epochs": {"a": 1}, "lr": "hi"}
    (run / "config.json").write_text(json.dumps(config))
    state_file = run / "checkpoints" / "step-00000040" / "state.json"
    state = json.loads(state_file.read_text())
    state.update(images=[8], images_seen="many", epoch="four", seconds=None, skipped=["x"], total_steps="all")
    state_file.write_text(json.dumps(state))
    info = run_info(run)
    assert info["progress"]["step"] == TOTAL and info["skipped"] == {}
    assert "big px in 8 px patches" in said(info) and "recipe blr 0.00015, mask 0.75" in said(info)
    for recipe in ([1], "fast", None):
        config["train"] = recipe
        (run / "config.json").write_text(json.dumps(config))
        info = run_info(run)
        assert info["kind"] == "pretrain run" and info["recipe"] == {} and info["data"] is None
        said(info)
    (run / "config.json").write_text("[1]")
    assert run_info(run)["notes"] == [f"{run / 'config.json'} is not a JSON object"]


def test_info_refuses_fifos_without_opening_them(tmp_path, weights):
    """As weights, as a weights folder's file or as a run's metrics.jsonl, a FIFO is an error; as one of a run's
    small files (config.json, a checkpoint's state.json, the weights) it is a note. Nothing waits on it."""
    os.mkfifo(tmp_path / "model.safetensors")
    folder = tmp_path / "exported"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors")
    run = make_run(tmp_path / "run", weights)
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")
    for given in (tmp_path / "model.safetensors", folder, run):
        with within(10), pytest.raises(UserError, match="not a regular file"):
            run_info(given)

    run = make_run(tmp_path / "run2", weights)
    for name in ("config.json", "model.safetensors", "checkpoints/step-00000040/state.json"):
        (run / name).unlink()
        os.mkfifo(run / name)
    with within(10):
        info = run_info(run)
    assert info["checkpoints"][-1]["why"] == "missing state.json" and info["progress"]["checkpoint_step"] == 20
    assert info["weights"] is None and info["status"] == "unfinished"
    assert [n.split(str(run))[-1] for n in info["notes"]] == [
        "/config.json is not a regular file",
        "/model.safetensors is not a regular file",
    ]


# -- the commands -------------------------------------------------------------------------------------


def invoke(*args):
    from typer.testing import CliRunner

    from maecli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_plot(tmp_path, weights, mpl, monkeypatch):
    a = make_run(tmp_path / "a", weights)
    b = make_run(tmp_path / "b", weights, logged=24, checkpoints=[20])
    write_metrics(tmp_path / "empty", [])
    monkeypatch.chdir(tmp_path)
    r = invoke("plot", a, b, tmp_path / "empty")
    assert r.exit_code == 0, r.output
    assert r.stdout == "curves.png\n" and (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "curves of 3 runs" in r.stderr and "warning:" in r.stderr and "empty has no metrics rows" in r.stderr
    r = invoke("plot", a, "-o", tmp_path / "pics" / "a.png")
    assert r.exit_code == 0 and r.stdout == f"{tmp_path / 'pics' / 'a.png'}\n"


def test_cli_plot_errors(tmp_path, mpl):
    write_metrics(tmp_path / "empty", [])
    for args, message in [((tmp_path / "empty",), "nothing to plot"), ((tmp_path / "nowhere",), "run not found")]:
        r = invoke("plot", *args, "-o", tmp_path / "c.png")
        assert r.exit_code == 1 and r.stdout == ""
        assert r.stderr.startswith("error: ") and message in r.stderr, r.stderr
        assert "Traceback" not in r.output and r.stderr.count("\n") == 1


def test_cli_plot_damaged_and_fifo(tmp_path, weights, mpl):
    run = make_run(tmp_path / "run", weights)
    damage(run)
    r = invoke("plot", run, "-o", tmp_path / "c.png")
    assert r.exit_code == 0, r.output
    assert "3 damaged lines skipped" in r.stderr and "Traceback" not in r.output
    os.mkfifo(tmp_path / "pipe.jsonl")
    with within(10):
        r = invoke("plot", tmp_path / "pipe.jsonl", "-o", tmp_path / "c.png")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr == f"error: {tmp_path / 'pipe.jsonl'} is not a regular file\n"


def test_cli_info_on_a_fifo_ends_at_once(tmp_path):
    """A FIFO given as weights used to block `maecli info` forever, deaf to SIGTERM: now one line and exit 1."""
    import subprocess

    from conftest import ROOT

    os.mkfifo(tmp_path / "pipe.safetensors")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "maecli", "info", str(tmp_path / "pipe.safetensors")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"error: {tmp_path / 'pipe.safetensors'} is not a regular file\n"


def test_cli_info_on_a_damaged_run(tmp_path, weights):
    run = make_run(tmp_path / "run", weights)
    damage(run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model": {**config["model"], "img_size": "big"}}))
    r = invoke("info", run)
    assert r.exit_code == 0 and r.stderr == "", r.output
    assert "pretrain run, finished" in r.stdout and "3 damaged lines skipped" in r.stdout


def refuse(name):
    raise ValueError(f"{name} is not JSON")


def test_cli_info_json_is_valid_json(tmp_path, weights):
    """Numbers too large for a float (1e999 reads as infinity) and NaN in the files become null, not a bare NaN or
    Infinity that JSON parsers refuse."""
    run = make_run(tmp_path / "run", weights)
    config = json.loads((run / "config.json").read_text())
    config["train"].update(lr=float("nan"), mask=float("inf"))
    config["model"]["norm_eps"] = float("-inf")
    (run / "config.json").write_text(json.dumps(config).replace("Infinity", "1e999"))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 44, "loss": NaN, "lr": Infinity, "knn_top1": 1e999}\n')
    r = invoke("info", run, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout, parse_constant=refuse)
    assert info["recipe"]["lr"] is None and info["recipe"]["mask"] is None
    assert info["model"]["config"]["norm_eps"] is None
    assert info["metrics"]["loss"]["last_step"] == TOTAL and "knn_top1" in info["metrics"]  # the row's values dropped
    json.loads(invoke("info", weights, "--json").stdout, parse_constant=refuse)


def test_cli_info(tmp_path, weights):
    run = make_run(tmp_path / "run", weights, logged=24, checkpoints=[20])
    r = invoke("info", run)
    assert r.exit_code == 0, r.output
    assert "pretrain run, unfinished" in r.stdout and "--resume" in r.stdout
    r = invoke("info", run, "--json")
    assert r.exit_code == 0
    info = json.loads(r.stdout)
    assert info["status"] == "unfinished" and info["progress"]["step"] == 24
    r = invoke("info", weights, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["kind"] == "weights"
    for bad in (tmp_path / "nowhere", tmp_path / "run" / "config.json"):
        r = invoke("info", bad)
        assert r.exit_code == 1 and r.stdout == "" and r.stderr.startswith("error: "), r.output
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.output
