"""Reliability of `maecli pretrain`: kills and signals, atomic saves, non-finite losses, output problems.

The kill tests run the real CLI in a subprocess, stop it mid-run, resume it and compare the final weights
bit for bit with an uninterrupted run of the same seed (every uninterrupted reference runs in-process).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import RUN, TINY, assert_same_run, env, invoke, last_step, rows
from safetensors.torch import load_file

import maecli

pytestmark = pytest.mark.usefixtures("one_thread")


DYING_WRITE = """
import os, sys
import maecli.weights as W
from maecli.cli import main

moment, out = sys.argv[1], sys.argv[2]
real, root_writes = W.save_file, []

def save_file(tensors, filename, metadata=None):
    # die like SIGKILL would: half the bytes on disk, no cleanup, no exception handlers
    real(tensors, filename, metadata=metadata)
    in_root = os.path.dirname(os.path.abspath(filename)) == os.path.abspath(out)
    root_writes.extend([filename] if in_root else [])
    if (moment == "checkpoint" and ".tmp-step-00000010" in filename) or (moment == "weights" and len(root_writes) == 2):
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        os._exit(137)

W.save_file = save_file
sys.argv = ["maecli", *sys.argv[3:]]
main()
"""


@pytest.mark.parametrize("moment,resumes_from", [("checkpoint", 5), ("weights", 24)])
def test_death_during_a_write_keeps_the_previous_files(tmp_path, small_dir, reference, moment, resumes_from):
    """The process dies halfway through writing a checkpoint, or the weights at an epoch end."""
    out = tmp_path / "run"
    args = ["pretrain", str(small_dir), "--out", str(out), *RUN, "--keep", "5"]
    p = subprocess.run(
        [sys.executable, "-c", DYING_WRITE, moment, str(out), *args],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 137, p.stderr
    ckpts = sorted(c.name for c in (out / "checkpoints").glob("step-*"))
    assert ckpts[-1] == f"step-{resumes_from:08d}"
    if moment == "weights":  # the weights of the epoch before are still whole
        assert torch.equal(
            load_file(out / "model.safetensors")["pos_embed"],
            load_file(out / "checkpoints/step-00000012/model.safetensors")["pos_embed"],
        )
        assert maecli.load(out) is not None
    r = invoke("pretrain", small_dir, "--out", out, "--resume")
    assert r.exit_code == 0, r.output
    assert f"from step {resumes_from}" in r.stderr
    assert_same_run(out, reference)
    assert not list((out / "checkpoints").glob(".tmp-*")) and not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("damage", ["truncate weights", "truncate optimizer", "garbage state", "missing file"])
def test_resume_falls_back_from_a_damaged_checkpoint(tmp_path, small_dir, damage):
    out = tmp_path / "run"
    r = invoke("pretrain", small_dir, "--out", out, *RUN, "--steps", "15", "--keep", "3")
    assert r.exit_code == 0, r.output
    newest = out / "checkpoints" / "step-00000015"
    if damage == "truncate weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif damage == "truncate optimizer":
        data = (newest / "optimizer.pt").read_bytes()
        (newest / "optimizer.pt").write_bytes(data[:100])
    elif damage == "garbage state":
        (newest / "state.json").write_text("{not json")
    else:
        (newest / "optimizer.pt").unlink()
    (out / "checkpoints" / ".tmp-step-00000020-999").mkdir()  # a save cut short by a kill: never a candidate
    # the same run, extended: --steps given again on --resume
    r = invoke("pretrain", small_dir, "--out", out, "--resume", "--steps", "16")
    assert r.exit_code == 0, r.output
    assert "from step 12" in r.stderr
    if damage != "missing file":  # an incomplete folder is simply not a checkpoint
        assert "step-00000015 is unusable" in r.stderr
    steps = [row["step"] for row in rows(out)]
    assert steps == list(range(1, 17))
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 16
    assert not (out / "checkpoints" / ".tmp-step-00000020-999").exists()  # swept by the next save


def test_resume_refuses_unusable_checkpoints_and_changed_settings(tmp_path, small_dir):
    out = tmp_path / "run"
    r = invoke("pretrain", small_dir, "--out", out, *RUN, "--steps", "5")
    assert r.exit_code == 0, r.output
    before = (out / "model.safetensors").read_bytes()
    r = invoke("pretrain", small_dir, "--out", out, "--resume", "--batch-size", "3")
    assert r.exit_code == 1 and "--batch-size 3 differs from the run's 2" in r.stderr
    r = invoke("pretrain", small_dir, "--out", out, "--resume", "--steps", "4")
    assert r.exit_code == 1 and "past the 4 steps" in r.stderr
    # repeating the original command with --resume is fine: a finished run stays finished
    r = invoke("pretrain", small_dir, "--out", out, *RUN, "--steps", "5", "--resume")
    assert r.exit_code == 0 and "already complete at step 5" in r.stderr, r.output
    assert (out / "model.safetensors").read_bytes() == before
    for ckpt in (out / "checkpoints").glob("step-*"):
        (ckpt / "model.safetensors").write_bytes(b"\0" * 64)
    r = invoke("pretrain", small_dir, "--out", out, "--resume", "--steps", "8")
    assert r.exit_code == 1 and "none of the 1 checkpoints" in r.stderr and "Traceback" not in r.output


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_non_finite_loss_stops_naming_the_step(tmp_path, small_dir, precision):
    out = tmp_path / "run"
    # lr 1e30 moves every weight by ~1e30 in the first step: the second step's activations overflow
    r = invoke(
        "pretrain",
        small_dir,
        "--out",
        out,
        *TINY,
        "--steps",
        "6",
        "--save-every",
        "1",
        "--log-every",
        "3",
        "--lr",
        "1e30",
        "--warmup-epochs",
        "0",
        "--precision",
        precision,
        "--no-norm-pix-loss",
    )
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "loss became non-finite at step 2" in err[0], r.stderr
    assert "step-00000001" in err[0]
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000001"]  # nothing after the blow-up was saved
    state = load_file(out / "checkpoints" / "step-00000001" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(args, timeout=240, stop_at: int | None = None, out: Path | None = None):
    """Two CPU processes in one gloo group; with `stop_at`, SIGTERM to the whole process group (launcher and
    ranks, as a scheduler sends it) once that step is logged in `out`. Returns (exit code, stderr).

    (`accelerate launch --cpu --num_processes 2` starts a single process in Accelerate 1.x; --multi_gpu
    runs torchrun, and maecli joins the ranks in a gloo group when there is no GPU.)
    """
    e = env()
    e["CUDA_VISIBLE_DEVICES"] = ""  # CPU even on a GPU machine: the test is about processes, not devices
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
        "-m",
        "maecli",
        *map(str, args),
    ]
    with open(Path(out or ".").parent / "launch.log", "w+") as log:
        proc = subprocess.Popen(cmd, env=e, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        try:
            if stop_at is not None:
                deadline = time.time() + timeout
                while last_step(out) < stop_at and proc.poll() is None and time.time() < deadline:
                    time.sleep(0.01)
                os.killpg(proc.pid, signal.SIGTERM)
            code = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.seek(0)
        return code, log.read()


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no gloo backend for CPU processes",
)
def test_two_processes_split_the_data_write_once_stop_together_and_resume(tmp_path, small_dir):
    pytest.importorskip("accelerate.commands.launch", reason="the accelerate launcher is not installed")
    data = tmp_path / "data"
    data.mkdir()
    good = sorted(small_dir.iterdir())
    for i in range(40):
        if i not in (9, 27):
            shutil.copy(good[i % len(good)], data / f"{i:02d}{good[i % len(good)].suffix}")
    (data / "09.jpg").write_bytes(b"")  # two unreadable files, not neighbours in the sorted order
    (data / "27.png").write_text("not a picture")
    # 40 files, 20 a rank, batches of 2: 10 steps make one epoch, and every file is read by exactly one rank
    args = [
        "pretrain",
        data,
        *TINY,
        "--batch-size",
        "2",
        "--steps",
        "10",
        "--save-every",
        "2",
        "--log-every",
        "1",
        "--lr",
        "1e-3",
    ]
    whole = tmp_path / "whole" / "run"
    whole.parent.mkdir()
    code, err = accelerate_launch([*args, "--out", whole], out=whole)
    assert code == 0, err[-3000:]
    assert "cpu x2" in err and "Traceback" not in err
    for name in ("09.jpg", "27.png"):  # ranks see disjoint data: each bad file is met once, by one rank
        assert err.count(f"/{name}: ") == 1, err
    assert "2 unreadable file(s) skipped" in err  # counted over both ranks
    assert err.count("done:") == 1 and "40 images seen" in err
    # only the main process writes: one set of files, one row a step
    assert {f.name for f in whole.iterdir()} <= {
        "config.json",
        "model.safetensors",
        "metrics.jsonl",
        "checkpoints",
        "previews",
        "curves.png",
        ".lock",
    }
    assert [r["step"] for r in rows(whole)] == list(range(1, 11)) and rows(whole)[-1]["images_seen"] == 40
    assert maecli.load(whole).cfg.depth == 2

    # a scheduler stops the job: the ranks agree on one step, save it, and exit
    out = tmp_path / "stopped" / "run"
    out.parent.mkdir()
    code, err = accelerate_launch([*args, "--out", out], stop_at=3, out=out)
    assert code != 0
    stopped = last_step(out)
    assert 3 <= stopped < 10, err[-3000:]
    assert err.count(f"SIGTERM: stopped at step {stopped}/10; checkpoint saved") == 1, err[-3000:]
    assert (out / "checkpoints" / f"step-{stopped:08d}").is_dir()
    code, err = accelerate_launch(["pretrain", data, "--out", out, "--resume"], out=out)
    assert code == 0, err[-3000:]
    assert err.count("resuming") == 1 and f"from step {stopped}" in err
    # the same weights, bit for bit, and the same bytes, written by other processes
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert [r["step"] for r in rows(out)] == list(range(1, 11))
