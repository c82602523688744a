"""The run folder of a training command: creating it (or refusing to clobber one), holding it against a second
writer, its metrics log, and which settings a resumed run may change.

RUN/
  config.json        {"model": ..., "train": every argument}: enough to rebuild the model and to resume
  model.safetensors  the weights a command hands over (the final, or the best, epoch's)
  metrics.jsonl      one JSON object per logged row
  checkpoints/       resumable state (checkpoint.py)
  previews/          per-epoch pictures
  curves.png         the metrics drawn, redrawn at epoch ends (trackers.Curves)
  logs/              the trackers' stores, with --log-with (trackers.py)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from datetime import datetime
from pathlib import Path

from .errors import TrainError
from .files import atomic_write
from .weights import CONFIG_NAME, WEIGHTS_NAME

METRICS_NAME = "metrics.jsonl"
RUN_FILES = (CONFIG_NAME, WEIGHTS_NAME, METRICS_NAME, "checkpoints", "previews", "curves.png", "logs")
LOCK_NAME = ".lock"


def default_out() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


class RunLock:
    """An exclusive OS lock on RUN/.lock for as long as a run writes the folder; the kernel drops it when the
    process dies, so a killed run never leaves the folder locked. A POSIX record lock (lockf), not flock: loader
    workers forked from the run do not inherit it, so a killed run's last workers cannot hold the folder."""

    def __init__(self, run: Path):
        self.path = Path(run) / LOCK_NAME
        self.fd = None

    def acquire(self) -> RunLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TrainError(
                f"{self.path.parent} is in use by another maecli run (process {holder}); wait for it "
                f"to end or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


def prepare(run: Path, resume: bool, overwrite: bool) -> RunLock:
    """Create or reuse `run` and lock it; refuse to clobber an earlier run; check that it is writable; clear what
    --overwrite replaces. All before any training."""
    if run.exists() and not run.is_dir():
        raise TrainError(f"cannot use {run} as the output folder: it is a file")
    existing = run.exists() and any((run / name).exists() for name in RUN_FILES)
    if existing and not (resume or overwrite):
        raise TrainError(f"{run} already holds a run; pass --resume to continue it or --overwrite to replace it")
    if resume and not (run / CONFIG_NAME).exists():
        raise TrainError(f"cannot resume: {run} holds no {CONFIG_NAME}")
    try:
        run.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run).acquire()
    except OSError as e:
        raise TrainError(f"cannot write to output folder {run}: {e.strerror or e}") from None
    for name in (CONFIG_NAME, WEIGHTS_NAME, METRICS_NAME):  # atomic_write's temp files from a killed run
        for stale in run.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    if overwrite and not resume:
        for name in RUN_FILES:
            p = run / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return lock


def trim_metrics(run: Path, step: int) -> None:
    """Drop the metrics rows a killed run logged after the checkpoint it resumes from (and a half-written last
    line), so the resumed run's rows follow on without repeats."""
    path = Path(run) / METRICS_NAME
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or row.get("step", 0) <= step:
            keep.append(line)
    text = "".join(line + "\n" for line in keep)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class MetricsLog:
    """Appends rows to RUN/metrics.jsonl, each flushed at once (on the main process only; elsewhere a no-op)."""

    def __init__(self, run: Path, enabled: bool = True):
        self.file = open(Path(run) / METRICS_NAME, "a") if enabled else None

    def write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:  # a full disk: the write that failed has said so already
                pass
            self.file = None


def saved_settings(run: Path, section: str = "train") -> dict:
    """The arguments saved in RUN/config.json under `section`."""
    path = Path(run) / CONFIG_NAME
    if not path.exists():
        raise TrainError(f"cannot resume: {run} holds no {CONFIG_NAME}")
    try:
        saved = json.loads(path.read_text())[section]
        if not isinstance(saved, dict):
            raise TypeError("not an object")
        return saved
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainError(f"cannot resume: {path} is unreadable ({e})") from None


# What any resumed training run may change (each command adds its own): none alters the model or the steps taken.
RESUME_MAY_CHANGE = (
    "epochs",
    "steps",
    "workers",
    "log_every",
    "save_every",
    "keep",
    "precision",
    "log_with",
    "allow_data_change",
)


def resumed_args(args, given: set[str], may_change: tuple[str, ...], section: str = "train"):
    """The settings saved with the run in args.out, updated with those the user gave again and may change.

    `args` is a dataclass of a command's arguments; `given` names the ones the user set explicitly. One that
    differs from the saved run and is not in `may_change` is refused rather than silently ignored or applied.
    """
    saved = saved_settings(Path(args.out), section)
    known = {f.name for f in dataclasses.fields(args)}
    merged = {k: v for k, v in saved.items() if k in known}
    merged.update(data=args.data, out=str(args.out), resume=True, overwrite=False)
    for name in sorted(set(given) & known - {"data", "out", "resume", "overwrite"}):
        now, before = getattr(args, name), merged.get(name)
        if now == before:
            continue
        if name not in may_change:
            may = ", ".join("--" + n.replace("_", "-") for n in may_change[:7])
            raise TrainError(
                f"--{name.replace('_', '-')} {now} differs from the run's {before}; --resume keeps a "
                f"run's settings and may change only {may}"
            )
        merged[name] = now
    if "epochs" in given and "steps" not in given and merged.get("epochs") != saved.get("epochs"):
        merged["steps"] = None  # a new epoch count replaces the step count the run was started with
    return type(args)(**merged)


class DataList:
    """The training files as (path relative to the data folder, size in bytes). Each checkpoint records its
    fingerprint in state.json, and the list itself in files.json.gz beside it (to say what changed), so `--resume`
    can tell whether it goes on with the data the run was trained on."""

    NAME = "files.json.gz"

    def __init__(self, files: list[tuple[str, int]]):
        self.files = files

    @classmethod
    def of(cls, root: str | os.PathLike, paths: list[Path] | list[str]) -> DataList:
        root = Path(root)
        base = root if root.is_dir() else root.parent
        files = []
        for p in paths:
            try:
                size = os.stat(p).st_size
            except OSError:  # vanished or unreadable since it was found: the loader skips it
                size = -1
            files.append((Path(p).relative_to(base).as_posix(), size))
        return cls(files)

    def fingerprint(self) -> dict:
        import hashlib

        digest = hashlib.sha256()
        for name, size in self.files:
            digest.update(os.fsencode(name) + b"\0" + str(size).encode() + b"\n")
        return {"files": len(self.files), "bytes": sum(max(s, 0) for _, s in self.files), "sha256": digest.hexdigest()}

    def compressed(self) -> bytes:
        """The list as files.json.gz holds it (compressed once per run, written with every checkpoint)."""
        import gzip

        return gzip.compress(json.dumps(self.files).encode("utf-8", "surrogateescape"), compresslevel=1, mtime=0)

    @classmethod
    def saved(cls, checkpoint: Path) -> DataList | None:
        import gzip

        try:
            text = gzip.decompress((Path(checkpoint) / cls.NAME).read_bytes()).decode("utf-8", "surrogateescape")
            return cls([(str(name), int(size)) for name, size in json.loads(text)])
        except (OSError, ValueError, TypeError, EOFError):
            return None

    def changes_since(self, before: dict, checkpoint: Path) -> str | None:
        """None when this list has the fingerprint `before` (the checkpoint's); else what changed, in words."""
        now = self.fingerprint()
        if not before or before.get("sha256") == now["sha256"]:
            return None  # the same files (or a checkpoint from before fingerprints were kept)
        old = DataList.saved(checkpoint)
        if old is None:
            return (
                f"the data differs from the run's: {before.get('files')} files of {before.get('bytes')} bytes "
                f"then, {now['files']} files of {now['bytes']} bytes now"
            )
        then, current = dict(old.files), dict(self.files)
        added = [n for n in current if n not in then]
        removed = [n for n in then if n not in current]
        changed = [n for n in current if n in then and current[n] != then[n]]
        parts = []
        for label, names in (("added", added), ("removed", removed), ("changed in size", changed)):
            if names:
                parts.append(f"{len(names)} {'file' if len(names) == 1 else 'files'} {label} (e.g. {names[0]!r})")
        if not parts:  # the same names and sizes in another order cannot happen (both lists are sorted)
            parts.append("the file order differs")
        return "the data differs from the run's: " + ", ".join(parts)
