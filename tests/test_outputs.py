"""Where results go: every output path through one helper (links kept, devices and pipes written to, permissions
of a replaced file kept, missing folders made), full disks and files too large, run folders that cannot be written,
and a run folder held by another run.

Each test checks the promise through the real CLI where it can: one line on stderr, the exit status of the README's
table, nothing the user made replaced or left half-written.
"""

import errno
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PHOTO, RUN, TINY, env, invoke, one_line_error

from maecli.errors import OutputError
from maecli.files import atomic_write, open_output, write_bytes


def cli(*args, stdin=None, **kwargs) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process (signals, file-size limits, stdin bytes and stdout devices need one)."""
    return subprocess.run(
        [sys.executable, "-m", "maecli", *map(str, args)],
        env=env(),
        capture_output=True,
        input=stdin,
        timeout=300,
        **kwargs,
    )


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_by_kind(tmp_path):
    target = tmp_path / "real.png"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    link = tmp_path / "link.png"
    link.symlink_to(target)
    write_bytes(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"  # written through, the link kept
    assert mode(target) == 0o640  # a replaced file keeps its permissions

    old = os.umask(0o027)
    try:
        write_bytes(tmp_path / "fresh.bin", b"x")
        atomic_write(tmp_path / "fresh2.bin", lambda tmp: Path(tmp).write_bytes(b"y"))
    finally:
        os.umask(old)
    assert mode(tmp_path / "fresh.bin") == 0o640 and mode(tmp_path / "fresh2.bin") == 0o640  # not mkstemp's 0600

    write_bytes("/dev/null", b"x")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    with pytest.raises(OutputError, match=r"cannot write /dev/full: No space left on device"):
        write_bytes("/dev/full", b"x" * 100_000)
    with pytest.raises(OutputError, match="it is a folder"):
        write_bytes(tmp_path, b"x")

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    write_bytes(fifo, b"through the pipe")
    assert reader.communicate(timeout=30)[0] == b"through the pipe" and stat.S_ISFIFO(os.stat(fifo).st_mode)

    write_bytes(tmp_path / "made" / "for" / "it.bin", b"z")  # missing folders are made, for every output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries


def test_a_failed_output_leaves_nothing_and_names_the_users_path(tmp_path):
    target = tmp_path / "emb.jsonl"
    target.write_text("the user's old file\n")
    with pytest.raises(RuntimeError), open_output(target, "w") as f:
        f.write("half")
        raise RuntimeError("the work failed midway")
    assert target.read_text() == "the user's old file\n"
    assert [p.name for p in tmp_path.iterdir()] == ["emb.jsonl"]

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device", tmp)

    with pytest.raises(OutputError) as e:
        atomic_write(target, full)
    assert str(e.value) == f"cannot write {target}: No space left on device" and ".tmp" not in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ["emb.jsonl"]


def test_cli_outputs_to_devices_links_and_missing_folders(tmp_path, tiny_weights, tiny_run):
    r = invoke("reconstruct", PHOTO, "-w", tiny_run, "-o", "/dev/null")
    assert r.exit_code == 0, r.output
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    one_line_error(invoke("reconstruct", PHOTO, "-w", tiny_run, "-o", "/dev/full"), 1, "/dev/full", "No space left")

    picture = tmp_path / "pictures" / "mine.png"
    picture.parent.mkdir()
    picture.write_bytes(b"old")
    link = tmp_path / "latest.png"
    link.symlink_to(picture)
    assert invoke("reconstruct", PHOTO, "-w", tiny_run, "-o", link).exit_code == 0
    assert link.is_symlink() and picture.read_bytes()[:4] == b"\x89PNG"

    for fmt in ("jsonl", "npy"):
        one_line_error(
            invoke("embed", PHOTO, "-w", tiny_weights, "-f", fmt, "-o", "/dev/full"), 1, "cannot write /dev/full"
        )
    assert invoke("embed", PHOTO, "-w", tiny_weights, "-o", "/dev/null").exit_code == 0

    export = tmp_path / "no" / "such" / "encoder.safetensors"
    r = invoke("export", tiny_run, export, "--format", "timm")
    assert r.exit_code == 0, r.output  # as --format hf makes its folder
    assert invoke("export", tiny_run, "/dev/null", "--format", "timm").exit_code == 0
    one_line_error(invoke("export", tiny_run, "/dev/full", "--format", "timm"), 1, "cannot write /dev/full")

    one_line_error(invoke("plot", tiny_run, "-o", "/dev/full"), 1, "cannot write /dev/full")
    assert invoke("plot", tiny_run, "-o", "/dev/null").exit_code == 0


def test_unwritable_output_is_refused_before_training(tmp_path, small_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out, why in [
        (blocker / "run", "cannot write to output folder"),
        (blocker, "it is a file"),
        (Path("/proc/maecli-run"), "cannot write to output folder"),
    ]:
        r = invoke("pretrain", small_dir, "--out", out, *TINY, "--steps", "2")
        assert r.exit_code == 1 and why in r.stderr and "Traceback" not in r.output, r.output
        assert "maecli pretrain:" not in r.stderr  # refused before training starts
    assert blocker.read_text() == "not a folder"


def limited(size: int):
    """preexec_fn: files may grow to `size` bytes; a write past it fails with EFBIG, as a full disk fails with
    ENOSPC (SIGXFSZ ignored so the write fails instead of killing the process)."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return apply


def test_a_full_disk_is_one_line_everywhere(tmp_path, tiny_weights, photo_dir):
    """Real write errors from every writer (safetensors, torch.save, PNG, npy, text, metrics), not mocks."""
    out = tmp_path / "run"
    # the tiny model's weights (~150 kB) fit; its optimizer state (~300 kB) does not
    r = cli(
        "pretrain", photo_dir, "--out", out, "--steps", "4", "--save-every", "2", *TINY, preexec_fn=limited(200_000)
    )
    assert r.returncode == 1, r.stderr
    err = r.stderr.decode()
    assert "error: cannot write to" in err and "File too large" in err and "Traceback" not in err, err
    assert not list((out / "checkpoints").glob("step-*")) and not list(out.rglob("*.tmp"))

    # (--workers 0: workers pass images through shared memory files, which the limit would cut too)
    for args in (
        ["reconstruct", PHOTO, "-w", tiny_weights, "-o", tmp_path / "r.png"],
        ["embed", photo_dir, "-w", tiny_weights, "--workers", "0", "-o", tmp_path / "e.jsonl"],
        ["embed", photo_dir, "-w", tiny_weights, "--workers", "0", "-f", "npy", "-o", tmp_path / "e.npy"],
        ["export", tiny_weights, tmp_path / "x.safetensors", "-f", "timm"],
    ):
        r = cli(*args, preexec_fn=limited(500))
        err = r.stderr.decode()
        assert r.returncode == 1 and err.count("error: ") == 1 and "Traceback" not in err, (args, err)
        assert f"cannot write {args[-3] if args[0] == 'export' else args[-1]}: File too large" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "run"]  # nothing left looking complete

    # stdout on a full device: one line, exit 1, no "Exception ignored" at exit
    with open("/dev/full", "wb") as full:
        for args in (
            ["embed", photo_dir, "-w", tiny_weights, "--workers", "0"],
            ["reconstruct", PHOTO, "-w", tiny_weights, "-o", "-"],
        ):
            r = subprocess.run(
                [sys.executable, "-m", "maecli", *map(str, args)],
                env=env(),
                stdout=full,
                stderr=subprocess.PIPE,
                timeout=300,
            )
            err = r.stderr.decode()
            assert r.returncode == 1 and "error: cannot write standard output: No space left" in err, err
            assert "Exception ignored" not in err and "Traceback" not in err


def test_a_full_disk_mid_run_is_one_line_and_keeps_the_last_checkpoint(tmp_path, small_dir, monkeypatch):
    import errno

    import maecli.train.loop as T

    real, calls = T.save_checkpoint, []

    def full_disk(out, model, optimizer, state, *args, **kwargs):
        calls.append(state.step)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(out, model, optimizer, state, *args, **kwargs)

    monkeypatch.setattr(T, "save_checkpoint", full_disk)
    out = tmp_path / "run"
    r = invoke("pretrain", small_dir, "--out", out, *RUN, "--steps", "12")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "No space left on device" in r.stderr and "step-00000005" in r.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000005"]


def test_a_second_writer_is_refused_while_a_run_holds_its_folder(tmp_path, photo_dir):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "maecli",
            "pretrain",
            str(photo_dir),
            "--out",
            str(out),
            "--steps",
            "100000",
            "--log-every",
            "1",
            "--previews",
            "0",
            *TINY,
        ],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 200
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        for extra in (["--overwrite"], ["--resume"]):
            one_line_error(
                invoke("pretrain", photo_dir, "--out", out, *extra, *TINY),
                1,
                "in use by another maecli run",
                f"process {proc.pid}",
            )
        assert proc.poll() is None and (out / "config.json").exists()  # the running one goes on, its folder whole
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    assert invoke("pretrain", photo_dir, "--out", out, "--resume", "--steps", "2").exit_code in (0, 1)  # free again
