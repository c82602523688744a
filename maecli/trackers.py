"""What a training run shows while it runs, beside metrics.jsonl: experiment trackers (TensorBoard, trackio, MLflow,
Weights & Biases) through Accelerate's tracking API, and RUN/curves.png redrawn at epoch ends.

Every tracker writes inside RUN/logs/ and sends nothing anywhere unless the user's own settings for it say so
(WANDB_MODE, MLFLOW_TRACKING_URI, TRACKIO_DIR, ...). Each is an optional extra: `pip install "maecli[NAME]"`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path

from .console import warn
from .errors import UsageError, UserError
from .rundir import LOGS_DIR

TRACKERS = ("tensorboard", "trackio", "mlflow", "wandb")
PROJECT = "maecli"  # the project (wandb, trackio), experiment (MLflow) and folder (TensorBoard) every run logs to
STARTED_NAME = "trackers.json"  # RUN/logs/trackers.json: the trackers a run has started, with their run ids
# Names a tracker reserves, renamed as it would rename them itself (quietly, where it warns at each step)
RESERVED = {"trackio": {"time": "__time"}}
# A tracker counts as installed when one of these imports (Accelerate's TensorBoard writer falls back to tensorboardX).
MODULES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "trackio": ("trackio",),
    "mlflow": ("mlflow",),
    "wandb": ("wandb",),
}


def installed(name: str) -> bool:
    found = any(importlib.util.find_spec(module) is not None for module in MODULES[name])
    if name == "mlflow":  # mlflow-skinny alone has no local database store
        return found and importlib.util.find_spec("sqlalchemy") is not None
    return found


def resolve(log_with) -> list[str]:
    """The trackers `--log-with` asks for, in a fixed order: `all` means every one that is installed, `none` none.

    One that is not installed is a UserError naming its pip command, raised before any training.
    """
    asked = {str(getattr(name, "value", name)).lower() for name in log_with or ()}
    unknown = sorted(asked - set(TRACKERS) - {"all", "none"})
    if unknown:
        raise UsageError(
            f"--log-with {unknown[0]} is not a tracker maecli knows; choose from {', '.join(TRACKERS)}, all or none"
        )
    if "none" in asked:
        if len(asked) > 1:
            raise UsageError("--log-with none turns the trackers off; it cannot be combined with others")
        return []
    for name in TRACKERS:
        if name in asked and not installed(name):
            raise UserError(f'the {name} tracker is not installed: pip install "maecli[{name}]"')
    if "all" in asked:
        found = [name for name in TRACKERS if installed(name)]
        if not found:
            raise UserError(
                '--log-with all: no tracker is installed; pip install "maecli[tensorboard]" (or trackio, mlflow, wandb)'
            )
        asked |= set(found)
    return [name for name in TRACKERS if name in asked]


def logs_dir(run: Path) -> Path:
    return Path(run) / LOGS_DIR


def place_trackio_store(run: Path) -> None:
    """Point trackio's store at RUN/logs/trackio unless the user's TRACKIO_DIR says otherwise. trackio reads it
    once, when imported, and importing Accelerate imports every tracker installed: so this runs before that. In
    a process that imported either already (a notebook, a second run), trackio keeps the folder it has."""
    if os.environ.get("TRACKIO_DIR"):
        return
    if "trackio" in sys.modules:
        import trackio

        warn(f"trackio was imported before this run; it logs to {trackio.TRACKIO_DIR}")
        return
    os.environ["TRACKIO_DIR"] = str((logs_dir(run) / "trackio").resolve())


def flatten(config: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}: scalars and strings only, as TensorBoard's and MLflow's
    hyper-parameters need. Unset values (None) are left out; lists become comma-separated strings."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(str(v) for v in value)
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is not None:
            flat[name] = str(value)
    return flat


class Tracking:
    """The trackers of one training run on the main process (elsewhere `accelerator` is None: a no-op): started,
    or continued on a resume, from `step`; fed every metrics row and the epoch-end pictures; finished at the end.

    A resumed run logs only steps after its checkpoint's; what the killed part logged past it stays in the stores
    of trackers that cannot remove it (see docs/runs.md). A tracker that fails while logging is dropped with a
    warning: the run goes on.
    """

    def __init__(self, accelerator, run: Path, hparams: dict | None, step: int):
        self.acc, self.run, self.after = accelerator, Path(run), step
        self.names = [str(t) for t in accelerator.log_with] if accelerator is not None else []
        self.failed: set[str] = set()
        if not self.names:
            return
        self.thread_hook = threading.excepthook
        threading.excepthook = self.thread_failed
        started = self.read_started()
        try:
            logs_dir(run).mkdir(parents=True, exist_ok=True)
            with contextlib.redirect_stdout(sys.stderr):  # trackio and wandb print banners; stdout carries data only
                accelerator.init_trackers(PROJECT, init_kwargs=self.init_kwargs(started))
                # hyper-parameters once per tracker run (MLflow refuses to change them, TensorBoard would add a
                # folder each time), but at each start for trackio, whose resume starts the run's config afresh
                for name in self.names:
                    if name not in started or name == "trackio":
                        accelerator.get_tracker(name).store_init_configuration(flatten(hparams or {}))
            self.write_started(started)
        except Exception as e:  # noqa: BLE001 -- a tracker is not worth the run: its weights matter more
            self.warn_once(", ".join(self.names), e, "could not start")
            self.names = []

    def warn_once(self, name: str, error: BaseException, what: str = "failed") -> None:
        """One warning per tracker, naming the folder it writes to: the run goes on without it."""
        if name in self.failed:
            return
        self.failed.add(name)
        why = getattr(error, "strerror", None) or str(error) or type(error).__name__
        warn(f"the {name} tracker {what} in {logs_dir(self.run)} ({why}); training goes on without it")

    def thread_failed(self, args) -> None:
        """A tracker's writer thread that fails (TensorBoard's, on a full disk) says so once, not in a traceback;
        the tracker's next call fails too and drops it. Other threads' failures go to the usual hook."""
        module = type(args.thread).__module__ if args.thread is not None else ""
        if module.split(".")[0] in TRACKERS and args.exc_value is not None:
            self.warn_once(module.split(".")[0], args.exc_value)
        else:
            self.thread_hook(args)

    # -- starting and continuing

    def read_started(self) -> dict:
        try:
            started = json.loads((logs_dir(self.run) / STARTED_NAME).read_text())
            return started if isinstance(started, dict) else {}
        except (OSError, ValueError):
            return {}

    def write_started(self, started: dict) -> None:
        for name in self.names:
            started.setdefault(name, {})
            tracker = self.acc.get_tracker(name)
            if name == "wandb":
                started[name]["id"] = tracker.run.id
            elif name == "mlflow":
                started[name]["run_id"] = tracker.active_run.info.run_id
        from .files import atomic_write

        text = json.dumps(started, indent=1) + "\n"
        atomic_write(logs_dir(self.run) / STARTED_NAME, lambda tmp: Path(tmp).write_text(text))

    def init_kwargs(self, started: dict) -> dict:
        """Each tracker's settings: its store inside RUN/logs, offline, and the same tracker run on a resume."""
        logs, name = logs_dir(self.run).resolve(), self.run.resolve().name
        kwargs = {}
        if "tensorboard" in self.names:
            # TensorBoard hides the events of earlier files at and after purge_step: the killed part's steps
            # past the checkpoint this run resumes from
            kwargs["tensorboard"] = {"purge_step": self.after + 1}
        if "trackio" in self.names:
            import trackio

            wanted = {"name": name, "resume": "allow", "embed": False, "auto_log_cpu": False, "auto_log_gpu": False}
            accepted = inspect.signature(trackio.init).parameters
            kwargs["trackio"] = {k: v for k, v in wanted.items() if k in accepted}
        if "mlflow" in self.names:
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                mlflow.set_tracking_uri(f"sqlite:///{logs / 'mlflow.db'}")
            kwargs["mlflow"] = {
                "run_name": name,
                "logging_dir": str(logs / "mlartifacts"),
                "run_id": started.get("mlflow", {}).get("run_id"),
            }
        if "wandb" in self.names:
            run_id = started.get("wandb", {}).get("id") or secrets.token_hex(4)  # wandb: 8 of [a-z0-9]
            kwargs["wandb"] = {"name": name, "id": run_id, "resume": "allow"}
            if not os.environ.get("WANDB_MODE"):
                kwargs["wandb"]["mode"] = "offline"
            if not os.environ.get("WANDB_DIR"):
                kwargs["wandb"]["dir"] = str(logs)
        return kwargs

    # -- logging

    def log(self, row: dict, images: dict | None = None) -> None:
        """A metrics row (its numbers, at its step) and pictures (PIL images) at the same step."""
        step = row.get("step")
        if not self.names or not isinstance(step, int) or step <= self.after:
            return
        values = {
            k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for name in list(self.names):
            if values:
                renamed = {RESERVED.get(name, {}).get(k, k): v for k, v in values.items()}
                self.guarded(name, lambda t, renamed=renamed: t.log(renamed, step=step))
            for key, image in (images or {}).items():
                self.guarded(name, lambda t, key=key, image=image: log_image(t, key, image, step))

    def guarded(self, name: str, action) -> None:
        if name not in self.names:
            return
        try:
            with contextlib.redirect_stdout(sys.stderr):
                action(self.acc.get_tracker(name))
        except Exception as e:  # noqa: BLE001 -- a tracker is not worth the run
            self.warn_once(name, e)
            self.names.remove(name)

    def finish(self) -> None:
        """End every tracker's run; Accelerate's end_training() afterwards finds none left to end."""
        if self.acc is None or not hasattr(self, "thread_hook"):
            return
        for name in list(self.names):
            self.guarded(name, finish)
        self.acc.trackers = []
        self.names = []
        threading.excepthook = self.thread_hook


def finish(tracker) -> None:
    if tracker.name == "trackio":  # through trackio's own finish, or its exit hook finishes the run again
        import trackio

        trackio.finish()
    else:
        tracker.finish()


def log_image(tracker, key: str, image, step: int) -> None:
    """One picture on one tracker, in the form it takes."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    if tracker.name == "tensorboard":
        tracker.log_images({key: pixels[None]}, step=step, dataformats="NHWC")
    elif tracker.name == "wandb":
        tracker.log_images({key: [pixels]}, step=step)
    elif tracker.name == "trackio":
        import trackio

        tracker.tracker.log({key: trackio.Image(pixels)}, step=step)
    elif tracker.name == "mlflow":
        import mlflow

        mlflow.log_image(pixels, key=key, step=step)


class Curves:
    """RUN/curves.png, redrawn at epoch ends on the main process.

    Drawing takes a fraction of a second; with epochs shorter than that, drawing every one would slow training, so
    a picture waits until at least 20 times the last one's drawing time has passed (about 5% of the time at most).
    The last epoch's is always drawn. Without matplotlib: one warning, and no pictures.
    """

    def __init__(self, run: Path, enabled: bool = True):
        self.run, self.enabled = Path(run), enabled
        self.next_at = 0.0

    def update(self, final: bool = False) -> None:
        if not self.enabled or (not final and time.monotonic() < self.next_at):
            return
        from .plot import write_curves
        from .rundir import CURVES_NAME

        start = time.monotonic()
        try:
            drawn = write_curves(self.run)
        except UserError as e:
            warn(f"no {self.run / CURVES_NAME}: {e}")
            self.enabled = False
            return
        if drawn is None:
            warn(f"could not draw {self.run / CURVES_NAME}; training goes on without it")
            self.enabled = False
        self.next_at = time.monotonic() + 20 * (time.monotonic() - start)
