"""What the page may read: the images under --images by their path relative to it, and the run folder's
previews and metrics. Every path from a request is checked here, and nowhere else."""

import json
import math
import os
import re
from pathlib import Path

from ..errors import DataError
from .errors import Refused

METRIC_POINTS = 2000  # points of the loss curve sent to the page at most
PREVIEW_NAME = re.compile(r"epoch-(\d{1,9})\.png")


def check_relative(rel: str) -> None:
    """Refuse what is not a plain relative path inside a folder: `..`, absolute paths, backslashes, NULs. (Only
    listed files are served anyway; this says why, where a lookup would only say "not found".)"""
    if not rel:
        raise Refused(400, "no path given")
    if "\x00" in rel or "\\" in rel or rel.startswith("/") or ".." in rel.split("/"):
        raise Refused(403, f"refused {rel!r}: give a path relative to the image folder, without '..'")


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every symlink followed, lies in `root` (already resolved)."""
    try:
        return path.resolve(strict=True).is_relative_to(root)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return False


class Folder:
    """The images under --images that may be served: found once, each checked to resolve inside the folder.

    A symlink that points out of the folder (a file, or a folder that find_images follows) is left out, and the
    check runs again on every request, in case a link changed since.
    """

    def __init__(self, root: str | os.PathLike):
        from .. import data as D

        given = Path(root)
        if not given.is_dir():
            raise DataError(f"--images {given} is not a folder")
        self.given = given
        self.root = given.resolve()
        self.files: dict[str, Path] = {}
        self.left_out = 0
        for path in D.find_images(self.root):
            rel = path.relative_to(self.root).as_posix()
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:  # a name that is not UTF-8 cannot travel in JSON
                self.left_out += 1
                continue
            if inside(path, self.root):
                self.files[rel] = path
            else:
                self.left_out += 1

    def path(self, rel: str) -> Path:
        """The file for a relative path from the page, resolved; Refused for anything else."""
        check_relative(rel)
        path = self.files.get(rel)
        if path is None:
            raise Refused(404, f"{rel} is not an image in the folder")
        if not inside(path, self.root):
            raise Refused(403, f"refused {rel}: it now leads out of the folder")
        return path.resolve()

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
    folder = run / "previews"
    if not folder.is_dir():
        return {}
    root = run.resolve()
    out = {}
    for path in folder.iterdir():
        m = PREVIEW_NAME.fullmatch(path.name)
        if m and inside(path, root) and path.resolve().is_file():
            out[int(m.group(1))] = path
    return dict(sorted(out.items()))


def read_metrics(path: Path, limit: int = METRIC_POINTS) -> list[dict]:
    """metrics.jsonl -> [{step, loss, lr, epoch}], thinned evenly to `limit` points (the last one kept).

    Training may be writing the file: a half-written last line, or any line that is not a JSON object with a
    finite step and loss, is skipped.
    """
    points = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(row, dict):
                    continue
                point = {k: row.get(k) for k in ("step", "loss", "lr", "epoch")}
                if all(isinstance(point[k], (int, float)) and math.isfinite(point[k]) for k in ("step", "loss")):
                    points.append({k: v for k, v in point.items() if isinstance(v, (int, float)) and math.isfinite(v)})
    except OSError:
        return []
    if len(points) > limit:
        stride = len(points) / limit
        points = [points[int(i * stride)] for i in range(limit - 1)] + [points[-1]]
    return points
