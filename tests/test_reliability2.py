"""Reliability, second round (issue 18): outputs that are not regular files, full disks, weights that would compute
nonsense, changed data on resume, flag abuse, hostile stdin, signals in teardown, folders of junk.

Each test covers a class of failure through the real CLI where it can, and checks the promise: one line on stderr,
the exit status of the README's table, nothing the user made replaced or left half-written.
"""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import PHOTO, ROOT, env, invoke, one_line_error

# ----------------------------------------------------------------------------------------------
# 1, 14, 18: every output path goes through one helper


# ----------------------------------------------------------------------------------------------
# 5, 8, 11, 15: weights that would compute nonsense, or cost far more than they are


# ----------------------------------------------------------------------------------------------
# 13: every numeric flag of every command is range-checked at the boundary (exit 2)


# ----------------------------------------------------------------------------------------------
# 4: resume on different data


# ----------------------------------------------------------------------------------------------
# 12: stdin bytes, and loader workers that stop whatever ends the command


def test_stdin_paths_are_bytes_and_nothing_hangs(tmp_path, tiny_weights):
    odd = os.fsencode(tmp_path) + b"/caf\xe9 \x01.jpg"  # Latin-1, not UTF-8, and a control character
    with open(odd, "wb") as f:
        f.write(PHOTO.read_bytes())
    stdin = odd + b"\n" + str(PHOTO).encode() + b"\n"
    r = subprocess.run(
        [sys.executable, "-m", "maecli", "embed", "-", "-w", str(tiny_weights), "--workers", "2"],
        input=stdin,
        capture_output=True,
        env=env(PYTHONIOENCODING="utf-8"),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr.decode()
    paths = [os.fsencode(json.loads(line)["path"]) for line in r.stdout.decode().splitlines()]
    assert paths == [odd, str(PHOTO).encode()]

    r = subprocess.run(
        [sys.executable, "-m", "maecli", "embed", "-", "-w", str(tiny_weights), "--workers", "2"],
        input=stdin + b"/no/such.jpg\n",
        capture_output=True,
        env=env(PYTHONIOENCODING="utf-8"),
        timeout=120,
    )
    assert r.returncode == 1 and r.stderr.decode().count("error: ") == 1 and "such.jpg" in r.stderr.decode()


def test_loader_workers_stop_when_the_sources_fail():
    import multiprocessing

    from maecli.data import eval_batches

    def sources():
        yield from [PHOTO] * 5
        raise ValueError("the list of inputs broke")

    seen = []
    with pytest.raises(ValueError, match="broke"):
        for items, _ in eval_batches(sources(), 32, 3, batch_size=2, workers=2):
            seen += items
    assert seen == [PHOTO] * 5  # everything before the failure came through, in order
    deadline = time.time() + 30
    while multiprocessing.active_children() and time.time() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children()


# ----------------------------------------------------------------------------------------------
# 16: SIGTERM at any moment, teardown included, is exit 143 with temporaries gone


# ----------------------------------------------------------------------------------------------
# 17: a folder of junk is read once per process, not once per image


def test_known_bad_files_are_not_read_again(tmp_path, monkeypatch):
    from maecli import data

    paths = []
    for i in range(300):
        (tmp_path / f"{i:03d}.jpg").write_bytes(b"")
        paths.append(tmp_path / f"{i:03d}.jpg")
    paths.append(PHOTO)
    reads = []
    decode = data.decode
    monkeypatch.setattr(data, "decode", lambda path, *a, **k: (reads.append(path), decode(path, *a, **k))[1])
    dataset = data.PretrainDataset(paths, 32, 3, seed=0)
    items = dataset.__getitems__([(0, i) for i in range(len(paths))])
    assert all(x.shape == (3, 32, 32) for x, _ in items)
    assert len(reads) <= 2 * len(paths)  # each bad file once, the good one per slot (was 300 x 301 / 2 reads)
    failed = [f for _, fs in items for f in fs]
    assert len(failed) == 300 and len({path for path, _ in failed}) == 300  # each reported once


# ----------------------------------------------------------------------------------------------
# Done by the lead (2, 3, 7, 9): checked here through the CLI


def test_a_class_left_without_a_readable_image_is_refused(tmp_path, tiny_weights):
    data = tmp_path / "labelled"
    (data / "cats").mkdir(parents=True)
    (data / "junk").mkdir()
    for i, photo in enumerate(sorted((ROOT / "examples" / "images").glob("*.jpg"))[:5]):
        (data / "cats" / f"{i}.jpg").write_bytes(photo.read_bytes())
        (data / "junk" / f"{i}.jpg").write_bytes(b"not an image")
    one_line_error(invoke("probe", data, "-w", tiny_weights, "--workers", "0"), 1, "junk")
