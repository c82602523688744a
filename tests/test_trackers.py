"""`pretrain --log-with`: the trackers' own stores read back (values, previews, hyper-parameters, a resume without
repeated steps), the one-line error for a tracker that is not installed, and RUN/curves.png at epoch ends."""

import io
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY
from PIL import Image
from typer.testing import CliRunner

from maecli import plot, trackers
from maecli.cli import app
from maecli.errors import UserError

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def logged_losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def cli(*args):
    r = invoke(*args)
    return r.exit_code, r.stdout, r.stderr


def train_then_kill_and_resume(run, photo_dir, steps: int, tracker: str, kill_after: int):
    """A run of `steps` (2 steps an epoch: 8 photos, batch 4), cut back to its checkpoint at `kill_after` as if
    killed there after logging the later steps, then resumed to the end."""
    code, out, err = cli(
        "pretrain", photo_dir, "--out", run, "--steps", steps, "--log-every", "1", "--log-with", tracker, *TINY
    )
    assert code == 0, err
    assert out == ""  # the trackers' banners go to stderr
    for ckpt in (run / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > kill_after:
            shutil.rmtree(ckpt)
    (run / "model.safetensors").unlink()
    code, out, err = cli("pretrain", photo_dir, "--out", run, "--resume")
    assert code == 0, err
    assert f"from step {kill_after}" in err and out == ""


def test_tensorboard_holds_the_metrics_previews_and_config_once_after_a_resume(tmp_path, photo_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train_then_kill_and_resume(run, photo_dir, steps=6, tracker="tensorboard", kill_after=4)
    logs = run / "logs" / "maecli"
    assert len(list(logs.glob("events.out.tfevents.*"))) == 2  # the killed part's file and the resumed part's
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    # the killed part also logged steps 5 and 6; the resumed part's file purges them, so each step reads once
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]
    expected = logged_losses(run)
    for e in loss:
        assert math.isclose(e.value, expected[e.step], rel_tol=1e-6), (e.step, e.value, expected[e.step])
    assert {"lr", "epoch", "images_seen"} <= set(events.Tags()["scalars"])
    previews = events.Images("preview")
    assert [e.step for e in previews] == [2, 4, 6]  # one per epoch end
    picture = Image.open(io.BytesIO(previews[-1].encoded_image_string))
    assert picture.size == Image.open(run / "previews" / "epoch-0003.png").size
    # hyper-parameters once, at the start: the resume continued the same tracker run
    hparams = list(logs.glob("*/hparams.yml"))
    assert len(hparams) == 1
    text = hparams[0].read_text()
    assert "train.steps: 6" in text and "model.embed_dim: 32" in text
    assert json.loads((run / "logs" / "trackers.json").read_text()) == {"tensorboard": {}}


@pytest.mark.parametrize("when", ["start", "later"])
def test_a_tracker_on_a_full_disk_is_one_warning_and_the_run_finishes(tmp_path, photo_dir, monkeypatch, when):
    """TensorBoard writes in a thread of its own: its failure must not become a traceback or the run's exit status."""
    import errno

    from tensorboard.summary.writer import record_writer

    calls = []

    def full(self, data):
        calls.append(1)
        if when == "start" or len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    run = tmp_path / "run"
    code, out, err = cli(
        "pretrain", photo_dir, "--out", run, "--steps", "4", "--log-every", "1", "--log-with", "tensorboard", *TINY
    )
    assert code == 0 and "Traceback" not in err, err
    assert err.count("warning: the tensorboard tracker") == 1 and f"{run / 'logs'}" in err, err
    assert "No space left on device" in err and (run / "model.safetensors").exists()


def test_trackio_local_store_holds_the_metrics_and_previews(tmp_path, photo_dir):
    if not trackers.installed("trackio"):
        pytest.skip('trackio is not installed (pip install "maecli[trackio]")')
    run = tmp_path / "run"
    # in a fresh process: trackio reads its store's folder once, when imported (Accelerate imports it), so only a
    # process that had not imported Accelerate yet puts the store in the run folder
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import test_trackers as t; "
        "t.train_then_kill_and_resume(Path(sys.argv[2]), Path(sys.argv[3]), 4, 'trackio', 2)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRACKIO_DIR"}
    done = subprocess.run(
        [sys.executable, "-c", code, Path(__file__).parent, run, photo_dir], env=env, text=True, capture_output=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    store = run / "logs" / "trackio"
    db = sqlite3.connect(store / "maecli.db")
    assert [name for (name,) in db.execute("SELECT DISTINCT run_name FROM metrics")] == ["run"]  # one run, resumed
    rows = [(step, json.loads(values)) for step, values in db.execute("SELECT step, metrics FROM metrics ORDER BY id")]
    expected = logged_losses(run)
    # trackio keeps what the killed part logged after the checkpoint (steps 3 and 4, the same values: a run is
    # a pure function of its settings); the last value at each step is the resumed run's
    last = {step: values["loss"] for step, values in rows if "loss" in values}
    assert sorted(last) == [1, 2, 3, 4]
    for step, value in last.items():
        assert math.isclose(value, expected[step], rel_tol=1e-6)
    assert {step for step, values in rows if "preview" in values} == {2, 4}
    assert len(list((store / "media").rglob("*.png"))) >= 2
    (config,) = db.execute("SELECT config FROM configs").fetchone()
    config = json.loads(config)
    assert config["train.steps"] == 4 and config["model.depth"] == 2


def test_mlflow_local_store_holds_the_metrics_and_continues_the_run(tmp_path, photo_dir, monkeypatch):
    if not trackers.installed("mlflow"):
        pytest.skip('mlflow is not installed (pip install "maecli[mlflow]")')
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    train_then_kill_and_resume(run, photo_dir, steps=4, tracker="mlflow", kill_after=2)
    run_id = json.loads((run / "logs" / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'logs' / 'mlflow.db'}")
    assert [r.info.run_id for r in client.search_runs([client.get_experiment_by_name("maecli").experiment_id])] == [
        run_id
    ]
    expected = logged_losses(run)
    history = client.get_metric_history(run_id, "loss")
    assert {m.step for m in history} == {1, 2, 3, 4}
    for m in history:
        assert math.isclose(m.value, expected[m.step], rel_tol=1e-6)
    assert client.get_run(run_id).data.params["train.steps"] == "4"


def test_wandb_runs_offline_inside_the_run_folder(tmp_path, photo_dir, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train_then_kill_and_resume(run, photo_dir, steps=4, tracker="wandb", kill_after=2)
    run_id = json.loads((run / "logs" / "trackers.json").read_text())["wandb"]["id"]
    parts = sorted((run / "logs" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert parts  # offline, and both parts under the one id (wandb sync merges them)
    assert list((run / "logs" / "wandb").rglob("preview_*.png"))


def test_a_tracker_not_installed_is_one_line_before_training(tmp_path, photo_dir, monkeypatch):
    monkeypatch.setattr(trackers, "installed", lambda name: False)
    run = tmp_path / "run"
    r = invoke("pretrain", photo_dir, "--out", run, "--steps", "2", "--log-with", "trackio", *TINY)
    assert r.exit_code == 1
    assert r.stderr == 'error: the trackio tracker is not installed: pip install "maecli[trackio]"\n'
    assert not run.exists()  # nothing started
    r = invoke("pretrain", photo_dir, "--out", run, "--steps", "2", "--log-with", "all", *TINY)
    assert r.exit_code == 1 and "no tracker is installed" in r.stderr and 'pip install "maecli[' in r.stderr
    r = invoke("pretrain", photo_dir, "--out", run, "--log-with", "none", "--log-with", "wandb", *TINY)
    assert r.exit_code == 2 and "cannot be combined" in r.stderr
    r = invoke("pretrain", photo_dir, "--out", run, "--log-with", "comet", *TINY)
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_resolve_and_flatten():
    assert trackers.resolve([]) == [] and trackers.resolve(["none"]) == []
    real = trackers.installed
    try:
        trackers.installed = lambda name: name in ("wandb", "tensorboard")
        assert trackers.resolve(["all"]) == ["tensorboard", "wandb"]
        assert trackers.resolve(["wandb", "tensorboard", "wandb"]) == ["tensorboard", "wandb"]
        with pytest.raises(UserError, match=r'pip install "maecli\[mlflow\]"'):
            trackers.resolve(["all", "mlflow"])
    finally:
        trackers.installed = real
    flat = trackers.flatten({"model": {"depth": 2}, "train": {"lr": None, "log_with": ("a", "b"), "norm": True}})
    assert flat == {"model.depth": 2, "train.log_with": "a,b", "train.norm": True}


def test_curves_png_is_drawn_at_epoch_ends(tmp_path, photo_dir):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    r = invoke("pretrain", photo_dir, "--out", run, "--steps", "4", "--previews", "0", *TINY)
    assert r.exit_code == 0, r.output
    assert (run / "curves.png").stat().st_size > 0
    assert plot.figure_panels([run])[:2] == ["loss", "learning rate"]
    # the picture waits while the last one took more than about 5% of the time since; the last epoch's is drawn
    curves = trackers.Curves(run)
    (run / "curves.png").unlink()
    curves.update()
    assert (run / "curves.png").exists()
    (run / "curves.png").unlink()
    curves.next_at = float("inf")
    curves.update()
    assert not (run / "curves.png").exists()
    curves.update(final=True)
    assert (run / "curves.png").exists()


def test_training_goes_on_without_matplotlib(tmp_path, photo_dir, monkeypatch):
    def missing():
        raise UserError(plot.INSTALL_HINT)

    monkeypatch.setattr(plot, "_matplotlib", missing)
    run = tmp_path / "run"
    r = invoke("pretrain", photo_dir, "--out", run, "--steps", "4", "--previews", "0", *TINY)
    assert r.exit_code == 0, r.output
    assert r.stderr.count(plot.INSTALL_HINT) == 1  # warned once, at the first epoch end
    assert not (run / "curves.png").exists() and (run / "model.safetensors").exists()
