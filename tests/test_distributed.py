"""Two training processes launched by `accelerate launch`: the data split between them, each unreadable file met and
reported once, one process writing the run folder, both stopping at one agreed step on a scheduler's SIGTERM, and a
resume that ends with the same weights, bit for bit, as a run never stopped.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, env, last_step, rows

import maecli


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
    assert "2 unreadable files skipped" in err  # counted over both ranks
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
