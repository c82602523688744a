"""The run folder: the name of every file a run holds, the one tolerant reader of its metrics, and the folder's life
(created or refused, locked against a second writer, cleared by --overwrite). Nothing here imports torch, so the
commands that only read runs (`info`, `plot`, the page) stay fast.

RUN/
  config.json        {"command": ..., "model": ..., "train" or "finetune": every argument}: rebuild and resume
  model.safetensors  the weights a command hands over (the final, or the best, epoch's)
  metrics.jsonl      one JSON object per logged row (read_metrics)
  checkpoints/       resumable state, step-NNNNNNNN/ (checkpoint.py)
  previews/          per-epoch pictures, epoch-NNNN.png
  curves.png         the metrics drawn, redrawn at epoch ends (trackers.Curves)
  logs/              the trackers' stores, with --log-with (trackers.py)
  per_class.json     finetune: accuracy per class at the best epoch
  baseline/          finetune --baseline: the scratch run, a run folder of its own
A sweep (finetune --fraction A,B --seeds N) holds sweep.json and one such run folder per pair,
fraction-F/seed-S/.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import stat
from datetime import datetime
from pathlib import Path

from .errors import TrainError, UserError
from .files import atomic_write

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
METRICS_NAME = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
PREVIEWS_DIR = "previews"
CURVES_NAME = "curves.png"
LOGS_DIR = "logs"
PER_CLASS_NAME = "per_class.json"
BASELINE_DIR = "baseline"
SWEEP_NAME = "sweep.json"  # finetune --fraction A,B --seeds N: the summary, beside one run folder per pair
LOCK_NAME = ".lock"
# inside checkpoints/step-N/
OPTIMIZER_NAME = "optimizer.pt"
STATE_NAME = "state.json"
DATA_LIST_NAME = "files.json.gz"
CHECKPOINT_FILES = (WEIGHTS_NAME, OPTIMIZER_NAME, STATE_NAME)
CHECKPOINT_PATTERN = re.compile(r"step-(\d+)")
PREVIEW_PATTERN = re.compile(r"epoch-(\d{1,9})\.png")

# what --overwrite clears: everything a training command writes into its folder
RUN_FILES = (
    CONFIG_NAME,
    WEIGHTS_NAME,
    METRICS_NAME,
    CHECKPOINTS_DIR,
    PREVIEWS_DIR,
    CURVES_NAME,
    LOGS_DIR,
    PER_CLASS_NAME,
    BASELINE_DIR,
)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def sweep_run_dir(fraction: float, seed: int) -> str:
    """The folder of one fine-tuning pair of a sweep, inside the sweep's RUN."""
    return f"fraction-{fraction:g}/seed-{seed}"


def preview_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.png"


# ----------------------------------------------------------------------------------------------
# Reading what a run wrote: tolerant of half-written, damaged and huge files


def regular_file(path: str | os.PathLike) -> Path | None:
    """`path` if it is a regular file (links followed); None if it does not exist. Anything else (a FIFO, a device,
    a folder) is a UserError: opening a FIFO for reading would wait forever for a writer."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise UserError(f"{path} is {kind}")
    return path


def read_json_object(path: str | os.PathLike) -> dict | None:
    """A JSON object from a small file (config.json, state.json); None if the file does not exist. A file that is not
    a regular file, not UTF-8 JSON or not an object is a UserError naming it."""
    found = regular_file(path)
    if found is None:
        return None
    try:
        with open(found, "rb") as f:
            raw = f.read(64 << 20)  # config files are kilobytes; a huge one is not ours
        obj = json.loads(raw.decode("utf-8"), parse_constant=lambda name: None)
    except (OSError, ValueError) as e:
        raise UserError(f"{found} is unreadable ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{found} is not a JSON object")
    return obj


MAX_STEP = 2**53  # steps are counted in float64 by every plotting and tracking tool
MAX_VALUE = 1e300  # beyond this a metric is damage, and squaring it in a plot would overflow
MAX_LINE = 1 << 20  # bytes; a longer line is damage and is skipped without being held whole


@dataclasses.dataclass
class Metrics:
    """Rows of a metrics.jsonl: each a dict with an integer "step" and finite numbers (other values kept as they
    are); `bad` counts the lines skipped, `lines` all lines read; `thinned` says rows were dropped to fit."""

    rows: list[dict]
    bad: int = 0
    lines: int = 0
    thinned: bool = False


def clean_row(line: bytes) -> dict | None:
    """One metrics line as a row, or None if it is not one: not a JSON object, no integer step in [0, 2^53].
    Numbers that are not finite or beyond ±1e300 are dropped from the row."""
    try:
        row = json.loads(line.decode("utf-8"), parse_constant=lambda name: None)
    except (ValueError, RecursionError):
        return None
    if not isinstance(row, dict):
        return None
    step = row.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        return None
    for key, value in list(row.items()):
        if value is None or (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and not (math.isfinite(value) and abs(value) <= MAX_VALUE)
        ):
            del row[key]
    return row


def _lines(f, start: int = 0):
    """The lines of a binary file from byte `start`, each at most MAX_LINE bytes (a longer one is yielded as None)."""
    f.seek(start)
    while True:
        line = f.readline(MAX_LINE)
        if not line:
            return
        if len(line) == MAX_LINE and not line.endswith(b"\n"):
            while (rest := f.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                pass
            line = None
        yield line


NUMBER_BYTES = b"0123456789.+-eE"  # what a line loses to leave its kind: its keys, in order, and its punctuation
THINNED_KINDS = 16  # kinds of row thinned apart; any further kinds share one stride


@dataclasses.dataclass
class _Kind:
    """The rows of one kind kept so far, as (line number, row): every `stride`-th line of the kind is parsed and
    kept; `last` is the kind's latest line when it was not, parsed at the end so each kind keeps its last row."""

    rows: list = dataclasses.field(default_factory=list)
    stride: int = 1
    seen: int = 0
    last: tuple[int, bytes] | None = None


def _lines_from(f, tail_bytes: int | None):
    """The lines of the open binary file `f`, or of its last `tail_bytes` bytes without the fragment they start in."""
    start = 0
    if tail_bytes is not None:
        size = os.fstat(f.fileno()).st_size
        start = max(0, size - tail_bytes)
    lines = _lines(f, start)
    if start:
        next(lines, None)  # the first line read from the middle of the file is a fragment
    return lines


def _add_row(result: Metrics, line: bytes | None) -> None:
    """Parse `line` into `result`'s rows, or count it as bad (None is a line too long to read)."""
    row = clean_row(line) if line is not None else None
    if row is None:
        result.bad += 1
    else:
        result.rows.append(row)


def _add_thinned(result: Metrics, kinds: dict[bytes | None, _Kind], number: int, line: bytes, max_rows: int) -> None:
    """Keep line `number` if it is the stride-th of its kind, halving that kind's rows each time they reach
    2 * max_rows; any other line is only remembered as its kind's latest."""
    kind = line.translate(None, NUMBER_BYTES)
    group = kinds.get(kind)
    if group is None:
        group = kinds.setdefault(kind if len(kinds) < THINNED_KINDS else None, _Kind())
    group.seen += 1
    if (group.seen - 1) % group.stride:
        group.last = (number, line)  # not parsed unless it stays the kind's last
        return
    group.last = None
    row = clean_row(line)
    if row is None:
        result.bad += 1
        return
    group.rows.append((number, row))
    if len(group.rows) >= 2 * max_rows:
        group.rows = group.rows[::2]  # keep every other: the stride doubles, memory stays bounded
        group.stride *= 2
        result.thinned = True


def _merge_kinds(result: Metrics, kinds: dict[bytes | None, _Kind]) -> None:
    """Parse each kind's last line if it was not kept, then set `result.rows` to every kind's rows in file order."""
    kept = []
    for group in kinds.values():
        if group.last is not None:
            row = clean_row(group.last[1])
            if row is None:
                result.bad += 1
            else:
                group.rows.append((group.last[0], row))
        kept += group.rows
    result.rows = [row for _, row in sorted(kept, key=lambda pair: pair[0])]


def read_metrics(path: str | os.PathLike, *, max_rows: int | None = None, tail_bytes: int | None = None) -> Metrics:
    """The rows of RUN/metrics.jsonl (or of the .jsonl file `path`), in file order, in bounded memory.

    A run killed mid-write, or still writing, leaves a partial last line; a damaged file may hold anything. Such
    lines are skipped and counted (`bad`), never raised. `tail_bytes` reads only the end of the file (for the
    latest values). `max_rows` keeps about that many rows (up to twice) of each kind of row, evenly spread with
    each kind's last one kept, and parses only the lines it keeps (for pictures of huge files): a kind is a line
    with its numbers taken out (the same keys in the same order), so a probe's one row an epoch keeps every
    point while the rows logged every few steps are thinned. `bad` then counts the damaged lines among those
    parsed; a damaged line is mostly a kind of its own, and so parsed. A missing file has no rows; one that is
    not a regular file (a FIFO) is a UserError.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    found = regular_file(path)
    if found is None:
        return Metrics([])
    result = Metrics([])
    kinds: dict[bytes | None, _Kind] = {}
    try:
        with open(found, "rb") as f:
            for number, line in enumerate(_lines_from(f, tail_bytes)):
                result.lines += 1
                if line is not None and not line.strip():
                    continue  # a blank line is not damage
                if line is None or max_rows is None:
                    _add_row(result, line)
                else:
                    _add_thinned(result, kinds, number, line, max_rows)
    except OSError as e:
        raise UserError(f"cannot read {found}: {e.strerror or e}") from None
    if kinds:
        _merge_kinds(result, kinds)
    return result


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


def trim_metrics(run: Path, step: int) -> None:
    """Drop the metrics rows a killed run logged after the checkpoint it resumes from (and damaged lines), so the
    resumed run's rows follow on without repeats."""
    path = Path(run) / METRICS_NAME
    if regular_file(path) is None:
        return
    keep = []
    with open(path, "rb") as f:
        for line in _lines(f):
            row = clean_row(line) if line and line.strip() else None
            if row is not None and row["step"] <= step:
                keep.append(line.rstrip(b"\n") + b"\n")
    data = b"".join(keep)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


# ----------------------------------------------------------------------------------------------
# The folder's life: created or refused, locked, cleared


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


class DataList:
    """The training files as (path relative to the data folder, size in bytes). Each checkpoint records its
    fingerprint in state.json, and the list itself in files.json.gz beside it (to say what changed), so `--resume`
    can tell whether it goes on with the data the run was trained on. The list is compressed and written once per
    run, and hard-linked from one checkpoint into the next."""

    NAME = DATA_LIST_NAME

    def __init__(self, files):
        self.files = files  # a list of (name, size) pairs, or a filelist.FileList (the same, in three arrays)
        self._fingerprint = None

    @classmethod
    def of(cls, root: str | os.PathLike, paths) -> DataList:
        root = Path(root)
        base = root if root.is_dir() else root.parent
        if hasattr(paths, "pairs") and Path(paths.base or ".") == base:
            return cls(paths)  # found by data.find_images: the names and sizes are there already
        files = []
        for p in paths:
            try:
                size = os.stat(p).st_size
            except OSError:  # vanished or unreadable since it was found: the loader skips it
                size = -1
            files.append((Path(p).relative_to(base).as_posix(), size))
        return cls(files)

    def pairs(self):
        return self.files.pairs() if hasattr(self.files, "pairs") else iter(self.files)

    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> dict:
        if hasattr(self.files, "fingerprint"):
            return self.files.fingerprint()
        import hashlib

        digest = hashlib.sha256()
        for name, size in self.files:
            digest.update(os.fsencode(name) + b"\0" + str(size).encode() + b"\n")
        return {"files": len(self.files), "bytes": sum(max(s, 0) for _, s in self.files), "sha256": digest.hexdigest()}

    def compressed(self) -> bytes:
        """The list as files.json.gz holds it."""
        if hasattr(self.files, "json_gz"):
            return self.files.json_gz()
        import gzip

        return gzip.compress(json.dumps(self.files).encode("utf-8", "surrogateescape"), compresslevel=1, mtime=0)

    def linker(self, run: Path):
        """A writer of files.json.gz into a new checkpoint folder: a hard link to the newest checkpoint's copy when
        that one lists the same files (its state.json has this fingerprint), else the list compressed and written
        (once per run, and once again after a resume on other data)."""

        def place(target: Path) -> None:
            source = self._saved_copy(Path(run) / CHECKPOINTS_DIR)
            if source is not None:
                try:
                    os.link(source, target)
                    return
                except OSError:  # a file system without hard links: write it
                    pass
            atomic_write(target, lambda tmp: Path(tmp).write_bytes(self.compressed()))

        return place

    def _saved_copy(self, checkpoints: Path) -> Path | None:
        """The newest checkpoint's files.json.gz if it holds this list."""
        try:
            names = [p.name for p in checkpoints.iterdir() if CHECKPOINT_PATTERN.fullmatch(p.name)]
        except OSError:
            return None
        for name in sorted(names, key=lambda n: int(n[5:]), reverse=True):
            try:
                state = read_json_object(checkpoints / name / STATE_NAME) or {}
            except UserError:
                continue
            data = state.get("data")
            if isinstance(data, dict) and data.get("sha256") == self.fingerprint()["sha256"]:
                copy = checkpoints / name / self.NAME
                return copy if copy.is_file() else None
        return None

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
        then, current = dict(old.files), dict(self.pairs())
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
