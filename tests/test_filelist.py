"""The file list at scale: one scandir pass that finds what os.walk found, in the same order, with the same resume
fingerprint; kept as three arrays; written once per run and hard-linked into each checkpoint."""

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import TINY, invoke

from maecli.data import IMAGE_SUFFIXES, find_images
from maecli.filelist import FileList
from maecli.rundir import DataList


def walked(root: Path) -> list[tuple[str, int]]:
    """The reference: os.walk(followlinks) with each folder once, sorted by relative path, each with its size."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                path = Path(dirpath) / name
                size = os.stat(path).st_size if os.path.exists(path) else -1
                found.append((path.relative_to(root).as_posix(), size))
    return sorted(found)


@pytest.fixture
def tricky(tmp_path) -> Path:
    """Names whose order depends on how "/" sorts ("a", "a.b", "a-c"), hidden files and folders, a name that is not
    UTF-8, a broken link, a link to a folder already seen and a link loop."""
    root = tmp_path / "tricky"
    for rel in ["a/x.jpg", "a.b/y.PNG", "a-c/z.jpeg", "é/ü.jpg", ".hid/h.jpg", "b/c/d/w.gif", "b/.h.jpg", "top.jpg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * len(rel))
    (root / "notes.txt").write_text("not an image")
    (root / "b" / "link").symlink_to("../a")
    (root / "b" / "c" / "loop").symlink_to("..")
    (root / "broken.jpg").symlink_to("nowhere.jpg")
    with open(os.fsencode(root) + b"/bad\xff.jpg", "wb") as f:
        f.write(b"xyz")
    return root


def test_find_images_matches_os_walk_and_its_fingerprint(tricky):
    files = find_images(tricky)
    reference = walked(tricky)
    assert [(files.name(i), int(files.sizes[i])) for i in range(len(files))] == reference
    assert list(files) == [tricky / name for name, _ in reference]
    assert files[-1] == tricky / reference[-1][0] and files[1:3] == [tricky / n for n, _ in reference[1:3]]
    digest = hashlib.sha256()
    for name, size in reference:  # the bytes every earlier checkpoint's fingerprint was made of
        digest.update(os.fsencode(name) + b"\0" + str(size).encode() + b"\n")
    assert DataList.of(tricky, files).fingerprint()["sha256"] == digest.hexdigest()
    assert DataList.of(tricky, list(files)).fingerprint() == DataList.of(tricky, files).fingerprint()


def test_the_list_is_three_arrays_and_reads_back_whole(tricky):
    files = find_images(tricky)
    assert isinstance(files, FileList)
    assert {k: type(v).__name__ for k, v in vars(files).items()} == {
        "base": "str",
        "data": "ndarray",
        "offsets": "ndarray",
        "sizes": "ndarray",
    }
    import gzip

    assert json.loads(gzip.decompress(files.json_gz())) == [list(pair) for pair in walked(tricky)]
    empty = FileList("x", [], [])
    assert len(empty) == 0 and list(empty) == [] and empty.fingerprint()["files"] == 0
    with pytest.raises(IndexError):
        files[len(files)]


def test_checkpoints_hard_link_one_file_list(tmp_path, photo_dir):
    out = tmp_path / "run"
    args = ["--steps", "3", "--save-every", "1", "--keep", "3", "--previews", "0", *TINY]
    assert invoke("pretrain", photo_dir, "--out", out, *args).exit_code == 0
    lists = sorted((out / "checkpoints").glob("step-*/files.json.gz"))
    assert len(lists) == 3 and len({p.stat().st_ino for p in lists}) == 1
    assert lists[0].stat().st_nlink == 3  # written once, linked into the next checkpoints
    inode = lists[-1].stat().st_ino
    r = invoke("pretrain", photo_dir, "--out", out, "--resume", "--steps", "4", "--save-every", "1")
    assert r.exit_code == 0, r.output
    assert (out / "checkpoints" / "step-00000004" / "files.json.gz").stat().st_ino == inode
