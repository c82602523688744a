"""Writing outputs: a kill or a full disk never leaves a half-written file under the final name, and a path that
is not a regular file is written the way its kind needs, never replaced.

A leaf module (no torch): the run folder, exports, pictures and embeddings all write through `atomic_write` or
`open_output`, which treat the path the user named by what it is:
- a regular file, or a new name: written to a temporary file beside it, fsynced, then renamed over it (missing
  parent folders are created). The file gets the permissions the umask gives, or keeps those of the file it
  replaces.
- a symbolic link: the file it points to is replaced that way; the link stays a link.
- a character device or a FIFO (/dev/null, /dev/stdout, a pipe): written directly, never replaced.
- anything else (a folder, a block device, a socket): refused.
Every failure is an OutputError naming the user's path (never a temporary name), and leaves no temporary file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import OutputError


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (best effort: some file systems refuse to fsync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else set and put back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _through_descriptor(path: Path) -> bool:
    """Whether `path` is a link to an open file descriptor (/dev/stdout, /dev/fd/N, /proc/self/fd/N): what it
    names is already open elsewhere, so it is written in place rather than replaced by another file."""
    for _ in range(40):
        if str(path).startswith(("/proc/", "/dev/fd/")):
            return True
        if not path.is_symlink():
            return False
        path = path.parent / os.readlink(path)
    return False


def output_target(path: str | os.PathLike) -> tuple[Path, bool]:
    """(the file to write, whether to replace it atomically) for an output path the user gave.

    OutputError for a path that cannot be an output (a folder, a block device, a socket, a link loop).
    """
    path = Path(path)
    try:
        st = os.stat(path)  # follows symlinks: what matters is what they point to
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(e.errno, e.strerror, str(path)) from None
    if st is not None and (stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        return path, False
    if st is not None and not stat.S_ISREG(st.st_mode):
        what = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file, a character device or a FIFO"
        raise OutputError(None, f"it is {what}", str(path))
    if _through_descriptor(path):
        return path, False
    return (Path(os.path.realpath(path)) if path.is_symlink() else path), True


def _failed(e: OSError, path: Path) -> OutputError:
    return e if isinstance(e, OutputError) else OutputError(e.errno, e.strerror or str(e), str(path))


def _os_error_in(e: Exception) -> int | None:
    """The errno a library quoted in its own exception ("... (os error 28)", as safetensors writes)."""
    m = re.search(r"os error (\d+)", str(e))
    return int(m.group(1)) if m else None


class _Guarded:
    """A file whose write errors become OutputError for the user's path, and are remembered: a library that
    catches them (torch.save reports "unexpected pos") cannot hide why the write failed."""

    def __init__(self, f, path: Path):
        self._f, self._path, self.error = f, path, None

    def _call(self, name, *args):
        try:
            return getattr(self._f, name)(*args)
        except BrokenPipeError:  # the reader has what it wanted (`head`): the caller decides, as for stdout
            raise
        except OSError as e:
            self.error = self.error or _failed(e, self._path)
            raise self.error from None

    def write(self, data):
        return self._call("write", data)

    def writelines(self, lines):
        return self._call("writelines", lines)

    def flush(self):
        return self._call("flush")

    def seek(self, *args):  # a buffered file writes what it holds before it moves
        return self._call("seek", *args)

    def __getattr__(self, name):
        return getattr(self._f, name)


def guarded(stream, name: str):
    """`stream` (stdout, say) with its write errors as OutputError naming `name`; a closed pipe stays
    BrokenPipeError."""
    return _Guarded(stream, Path(name))


def _temp_beside(target: Path) -> str:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise _failed(e, target) from None
    os.close(fd)
    return tmp


def _publish(tmp: str, target: Path, user_path: Path) -> None:
    """fsync `tmp`, give it the mode a new file gets (or the replaced file's), rename it over `target`."""
    try:
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~umask()  # mkstemp makes files private (0600); an output is not
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as e:
        raise _failed(e, user_path) from None
    fsync_dir(target.parent)


def _copy_into(tmp: str, target: Path) -> None:
    """Stream a finished temporary file into a device or FIFO, which keeps its place in the file system."""
    try:
        with open(tmp, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except OSError as e:
        raise _failed(e, target) from None


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), then put the result at `path` as its kind needs (see the module's docstring): a
    regular file sees the old content or the new one, never part of it.

    For a device or FIFO the temporary file lives in the temporary folder and is copied in at the end.
    """
    path = Path(path)
    target, replace = output_target(path)
    if replace:
        tmp = _temp_beside(target)
    else:
        fd, tmp = tempfile.mkstemp(prefix="maecli-", suffix=".tmp")
        os.close(fd)
    try:
        try:
            write(tmp)
        except OSError as e:
            raise _failed(e, path) from None
        except Exception as e:  # safetensors quotes the errno in its own exception class
            code = _os_error_in(e)
            if code is None:
                raise
            raise OutputError(code, os.strerror(code), str(path)) from None
        if replace:
            _publish(tmp, target, path)
        else:
            _copy_into(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def open_output(path: str | os.PathLike, mode: str = "wb", *, seekable: bool = False, **kwargs) -> Iterator:
    """A file to stream an output into (`open`'s `mode` and keyword arguments); it appears at `path` whole when
    the block ends without an error, and not at all otherwise.

    A device or FIFO is written as the block goes (a pipe's reader sees each line at once), unless `seekable`
    asks for a file that can go back: then it is copied in at the end.
    """
    path = Path(path)
    target, replace = output_target(path)
    direct = not replace and not seekable
    if direct:
        tmp = None
    elif replace:
        tmp = _temp_beside(target)
    else:
        fd, tmp = tempfile.mkstemp(prefix="maecli-", suffix=".tmp")
        os.close(fd)
    try:
        try:
            f = open(target if direct else tmp, mode, **kwargs)
        except OSError as e:
            raise _failed(e, path) from None
        guarded = _Guarded(f, path)
        try:
            yield guarded
            guarded.flush()
        except BaseException as e:
            if guarded.error is not None and not isinstance(e, OutputError):
                raise guarded.error from None
            raise
        finally:
            with contextlib.suppress(OSError):  # a failed flush already said why
                f.close()
        if guarded.error is not None:
            raise guarded.error
        if replace:
            _publish(tmp, target, path)
        elif not direct:
            _copy_into(tmp, target)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with open_output(path) as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())
