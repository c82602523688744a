"""The training file list at scale: one pass over a folder (os.scandir) that finds every image with its size, and
`FileList`, which keeps them as one byte buffer of encoded names, their offsets and sizes (three numpy arrays).

A million paths as Python objects would be a million objects that every forked loader worker copies page by page
as it touches their reference counts; three arrays are three objects, and their data stays shared.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import numpy as np

CHUNK = 1 << 16  # names decoded at a time when the whole list is read (fingerprint, JSON): bounded memory


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # os.fsencode's bytes on Linux: any name round-trips


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _join(folder: str, name: str) -> str:
    return f"{folder}{name}" if folder.endswith("/") else f"{folder}/{name}"


class FileList(Sequence):
    """Image files as paths relative to `base`, sorted, each with its size in bytes (-1: it could not be read).

    `files[i]` is a Path (made on demand), `files.name(i)` the relative name; iterating yields Paths, as a list of
    them would. The arrays are read-only once built, so forked workers share them as they are.
    """

    def __init__(self, base: str, names: list[str], sizes: list[int] | np.ndarray):
        self.base = base
        joined = _encode("\0".join(names) + "\0") if names else b""
        self.data = np.frombuffer(joined, dtype=np.uint8)
        ends = np.flatnonzero(self.data == 0)
        self.offsets = np.concatenate([[0], ends + 1]).astype(np.int64)  # name i: data[offsets[i] : offsets[i+1]-1]
        self.sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
        if len(self.sizes) != len(names) or len(ends) != len(names):
            raise ValueError("a file name holds a NUL byte, or the sizes do not match the names")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def name(self, i: int) -> str:
        """The i-th file's path relative to `base`, with / between folders."""
        i = range(len(self))[i]  # negative indices and bounds, as a list's
        return _decode(self.data[self.offsets[i] : self.offsets[i + 1] - 1].tobytes())

    def path(self, i: int) -> str:
        return _join(self.base, self.name(i)) if self.base else self.name(i)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        return Path(self.path(i))

    def __iter__(self) -> Iterator[Path]:
        for names in self.name_chunks():
            yield from (Path(_join(self.base, n) if self.base else n) for n in names)

    def name_chunks(self, chunk: int = CHUNK) -> Iterator[list[str]]:
        """The names, a list of up to `chunk` at a time (decoded from the buffer in one go each)."""
        for start in range(0, len(self), chunk):
            end = min(start + chunk, len(self))
            raw = self.data[self.offsets[start] : self.offsets[end] - 1].tobytes()
            yield _decode(raw).split("\0")

    def pairs(self) -> Iterator[tuple[str, int]]:
        """(relative name, size) of every file, in order."""
        start = 0
        for names in self.name_chunks():
            yield from zip(names, self.sizes[start : start + len(names)].tolist())
            start += len(names)

    def fingerprint(self) -> dict:
        """What rundir.DataList records in each checkpoint: the count, the bytes, and a SHA-256 over
        `name NUL size LF` for each file in order (the same bytes as a list of (name, size) pairs gives)."""
        digest, start = hashlib.sha256(), 0
        for names in self.name_chunks():
            sizes = self.sizes[start : start + len(names)].tolist()
            digest.update(_encode("".join(map("{}\0{}\n".format, names, sizes))))
            start += len(names)
        total = int(self.sizes[self.sizes > 0].sum()) if len(self) else 0
        return {"files": len(self), "bytes": total, "sha256": digest.hexdigest()}

    def json_gz(self) -> bytes:
        """`[[name, size], ...]` as JSON, gzip-compressed, built a chunk at a time (what files.json.gz holds)."""
        gz = zlib.compressobj(1, zlib.DEFLATED, 31)  # 31: the gzip container, with no time stamp in it
        out, start = [gz.compress(b"[")], 0
        for names in self.name_chunks():
            sizes = self.sizes[start : start + len(names)].tolist()
            text = json.dumps(list(map(list, zip(names, sizes))))[1:-1]
            out.append(gz.compress(((", " if start else "") + text).encode("ascii")))
            start += len(names)
        out += [gz.compress(b"]"), gz.flush()]
        return b"".join(out)


def scan_images(root: str | os.PathLike, suffixes: Collection[str]) -> FileList:
    """Every file named like an image (its last suffix, any case, in `suffixes`) under `root` at any depth with
    its size, sorted by path relative to `root`, in one pass of os.scandir; `root` may also be a single file.
    Hidden files and folders are left out; symlinked folders are followed, each folder visited once (a loop is
    not followed round), in the order os.walk visits them."""
    root_path = Path(root)
    if root_path.is_file():
        base = "" if str(root_path.parent) == "." else str(root_path.parent)
        if root_path.suffix.lower() not in suffixes:
            return FileList(base, [], [])
        return FileList(base, [root_path.name], [_size(root_path)])
    names, sizes = _walk(str(root_path), frozenset(suffixes))
    order = sorted(range(len(names)), key=names.__getitem__)  # nearly sorted already: timsort runs through it
    return FileList(str(root_path), [names[i] for i in order], np.asarray(sizes, dtype=np.int64)[order])


def _size(path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # vanished or unreadable since it was found: the loader skips it
        return -1


def _walk(top: str, suffixes: frozenset[str]) -> tuple[list[str], list[int]]:
    """(names relative to `top`, sizes) of the image files below it, depth first with the folders of each in sorted
    order (as os.walk(followlinks=True) with sorted dirnames), each folder (device, inode) once."""
    names, sizes, seen = [], [], set()
    stack = [(top, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            st = os.stat(folder)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        subfolders = _scan_folder(folder, rel, suffixes, names, sizes)
        stack.extend((_join(folder, d), f"{rel}{d}/") for d in sorted(subfolders, reverse=True))
    return names, sizes


def _scan_folder(folder: str, rel: str, suffixes: frozenset[str], names: list, sizes: list) -> list[str]:
    """Add the image files of one folder to `names` and `sizes`; return its visible subfolders."""
    subfolders = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # unreadable: os.walk skips it the same way
        return subfolders
    for entry in entries:
        name = entry.name
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if is_dir:
            if not name.startswith("."):
                subfolders.append(name)
        elif not name.startswith(".") and (dot := name.rfind(".")) > 0 and name[dot:].lower() in suffixes:
            try:
                size = entry.stat().st_size
            except OSError:
                size = -1
            names.append(rel + name)
            sizes.append(size)
    return subfolders
