"""What the page may read: the images under --images by their path relative to it, and the run folder's
previews and metrics. Every path from a request is checked here, and nowhere else."""

import os
import stat
from collections import Counter
from pathlib import Path

from .. import rundir
from ..errors import DataError, UserError
from .errors import Refused

METRIC_POINTS = 2000  # rows of metrics.jsonl sent to the page at most (about: read_metrics keeps up to twice)
CURVE_KEYS = ("step", "loss", "lr", "epoch")


def check_relative(rel: str) -> None:
    """Refuse what is not a plain relative path inside a folder: `..`, absolute paths, NULs. (Only listed files are
    served anyway; this says why, where a lookup would only say "not found". A backslash is an ordinary character
    of a POSIX file name, listed and served as such; on Windows no listed name holds one.)"""
    if not rel:
        raise Refused(400, "no path given")
    if "\x00" in rel or rel.startswith("/") or ".." in rel.split("/"):
        raise Refused(403, f"refused {rel!r}: give a path relative to the image folder, without '..'")


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every symlink followed, lies in `root` (already resolved)."""
    try:
        return path.resolve(strict=True).is_relative_to(root)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return False


def regular(path: Path) -> bool:
    """Whether `path` (links followed) is a regular file: a FIFO would block whoever opens it, a device never ends."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


class Folder:
    """The images under --images that may be served: found once, each a regular file that resolves inside the folder.

    A symlink that points out of the folder (a file, or a folder that find_images follows), a FIFO or a device named
    like an image, and a name that is not UTF-8 are left out (`left_out` counts each reason). The checks run again
    on every request, in case the file changed since.
    """

    def __init__(self, root: str | os.PathLike):
        from .. import data as D

        given = Path(root)
        if not given.is_dir():
            raise DataError(f"--images {given} is not a folder")
        self.given = given
        self.root = given.resolve()
        self.files: dict[str, Path] = {}
        self.left_out: Counter[str] = Counter()
        for path in D.find_images(self.root):
            rel = path.relative_to(self.root).as_posix()
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:  # a name that is not UTF-8 cannot travel in JSON
                self.left_out["names that are not UTF-8"] += 1
            else:
                if not inside(path, self.root):
                    self.left_out["links out of the folder, or to nothing"] += 1
                elif not regular(path):
                    self.left_out["not regular files (FIFOs, devices)"] += 1
                else:
                    self.files[rel] = path

    def file(self, rel: str) -> tuple[Path, os.stat_result]:
        """The file for a relative path from the page, resolved, and its stat; Refused for anything else."""
        check_relative(rel)
        path = self.files.get(rel)
        if path is None:
            raise Refused(404, f"{rel} is not an image in the folder")
        try:
            real = path.resolve(strict=True)
            st = os.stat(real)
        except FileNotFoundError:
            raise Refused(404, f"{rel} no longer exists (deleted or moved since the server started)") from None
        except (OSError, RuntimeError) as e:  # a symlink loop, no permission on a folder
            raise Refused(403, f"refused {rel}: {getattr(e, 'strerror', None) or e}") from None
        if not real.is_relative_to(self.root):
            raise Refused(403, f"refused {rel}: it now leads out of the folder")
        if not stat.S_ISREG(st.st_mode):
            raise Refused(403, f"refused {rel}: it is no longer a regular file (a FIFO or a device?)")
        return real, st

    def path(self, rel: str) -> Path:
        """The file for a relative path from the page, resolved; Refused for anything else."""
        return self.file(rel)[0]

    def stats(self) -> dict[str, tuple[int, int]]:
        """(size, mtime_ns) of each file, what the embedding cache is keyed by; a vanished file is left out."""
        out = {}
        for rel, path in self.files.items():
            try:
                st = path.stat()
            except OSError:
                continue
            out[rel] = (st.st_size, st.st_mtime_ns)
        return out


def run_folder(weights: Path) -> Path:
    """The run folder of the weights: the folder given, or the one holding the weights file."""
    return weights if weights.is_dir() else weights.parent


def preview_files(run: Path) -> dict[int, Path]:
    """epoch -> previews/epoch-NNNN.png, only regular files inside the run folder."""
    folder = run / rundir.PREVIEWS_DIR
    if not folder.is_dir():
        return {}
    root = run.resolve()
    out = {}
    for path in folder.iterdir():
        m = rundir.PREVIEW_PATTERN.fullmatch(path.name)
        if m and inside(path, root) and path.resolve().is_file():
            out[int(m.group(1))] = path
    return dict(sorted(out.items()))


def loss_points(run: Path) -> list[dict]:
    """The loss curve of RUN/metrics.jsonl: [{step, loss, lr, epoch}] for the rows that have a loss, thinned evenly
    (the last one kept). Training may be writing the file: rundir.read_metrics skips a half-written last line and
    any damaged one. A metrics file that leads out of the run folder, or is not a regular file, has no points."""
    path = run / rundir.METRICS_NAME
    if not inside(path, run.resolve()):
        return []
    try:
        rows = rundir.read_metrics(path, max_rows=METRIC_POINTS).rows
    except UserError:  # a FIFO or a folder named metrics.jsonl: nothing to draw
        return []
    points = ({k: row.get(k) for k in CURVE_KEYS} for row in rows)
    points = ({k: v for k, v in p.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} for p in points)
    return [p for p in points if "loss" in p]


def progress(run: Path) -> dict:
    """What the page shows of a run: its folder, the epochs that have a preview, the loss curve."""
    return {"run": str(run), "previews": list(preview_files(run)), "metrics": loss_points(run)}
