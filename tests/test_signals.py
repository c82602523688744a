"""Signals: SIGKILL mid-epoch, Ctrl-C (SIGINT) and a scheduler's SIGTERM to the whole process group, a relayed
signal that is not a second Ctrl-C, SIGTERM over and over through saving and teardown, and SIGTERM while an output
is half written.

The run tests start the real CLI in a subprocess, stop it mid-run, resume it and compare the final weights bit for
bit with an uninterrupted run of the same seed (the `reference` fixture, run in-process).
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import PHOTO, RUN, STEPS, TINY, assert_same_run, env, invoke, last_step, start, stop_midway

import maecli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("workers", [0, 1])
def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path, small_dir, reference, workers):
    out, log = tmp_path / "run", tmp_path / "log"
    proc = start(["pretrain", small_dir, "--out", out, *RUN, "--workers", workers], log)
    code = stop_midway(proc, out, signal.SIGKILL, group=False)
    assert code == -signal.SIGKILL
    killed_at = last_step(out)
    assert 8 <= killed_at < STEPS, "the kill must land mid-run"
    r = invoke("pretrain", small_dir, "--out", out, "--resume", "--workers", workers)
    assert r.exit_code == 0, r.output
    assert "resuming" in r.stderr
    assert_same_run(out, reference)
    # the same bytes, too: a checksum of the weights file tells two runs apart only if their weights differ
    assert (out / "model.safetensors").read_bytes() == reference[2]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert len(list((out / "checkpoints").glob("step-*"))) == 2  # --keep 2


@pytest.mark.parametrize("sig,code,name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_signal_saves_a_checkpoint_and_exits(tmp_path, small_dir, reference, sig, code, name):
    """Ctrl-C in a terminal and a scheduler's SIGTERM reach the whole process group, loader workers too."""
    out, log = tmp_path / "run", tmp_path / "log"
    proc = start(["pretrain", small_dir, "--out", out, *RUN, "--workers", "1"], log)
    assert stop_midway(proc, out, sig, group=True) == code, log.read_text()
    err = log.read_text()
    assert "Traceback" not in err and "Error" not in err, err
    stopped = last_step(out)
    assert f"{name}: stopped at step {stopped}/{STEPS}; checkpoint saved" in err
    assert f"--out {out} --resume" in err
    assert (out / "checkpoints" / f"step-{stopped:08d}").is_dir()
    assert maecli.load(out).cfg.embed_dim == 32  # the weights at the stop are usable right away
    r = invoke("pretrain", small_dir, "--out", out, "--resume")
    assert r.exit_code == 0, r.output
    assert f"from step {stopped}" in r.stderr
    assert_same_run(out, reference)


def test_a_relayed_signal_is_not_a_second_ctrl_c(monkeypatch):
    """A launcher relays the terminal's Ctrl-C to its processes; a scheduler may send SIGTERM twice. Only a
    second Ctrl-C from the user, a moment later, aborts without a checkpoint."""
    import maecli.train.loop as T

    clock = [100.0]
    monkeypatch.setattr(T.time, "monotonic", lambda: clock[0])
    with T.StopSignal(verbose=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT  # handled at once, so the next one is a second delivery
        os.kill(os.getpid(), signal.SIGINT)  # relayed within the same instant
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGINT
        clock[0] += 2.0
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    with T.StopSignal(verbose=False) as stop:
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGTERM)
        clock[0] += 5.0
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM


def test_sigterm_in_teardown_exits_143(tmp_path, photo_dir):
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
            "200",
            "--log-every",
            "1",
            "--previews",
            "0",
            *TINY,
        ],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 200
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    while proc.poll() is None:  # SIGTERM again and again: in the loop, while saving, while tearing down
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.02)
    err = proc.stderr.read().decode()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and not list(out.rglob("*.tmp"))


def test_sigterm_removes_a_half_written_output(tmp_path, tiny_weights):
    target = tmp_path / "emb.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "maecli", "embed", "-", "-w", str(tiny_weights), "-o", str(target), "--workers", "0"],
        env=env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    proc.stdin.write(f"{PHOTO}\n".encode())
    proc.stdin.flush()  # then nothing more: it waits for the next path with its output half written
    deadline = time.time() + 120
    while not list(tmp_path.glob(".emb.jsonl.*")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert "terminated (SIGTERM)" in proc.stderr.read().decode()
    assert list(tmp_path.iterdir()) == []
