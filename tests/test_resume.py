"""Resuming a pretrain run: exactly where it stopped after a death mid-write, past damaged checkpoints to the newest
usable one, never with settings or data that differ from the run's (unless allowed), and never from a checkpoint
with non-finite weights, which a diverging run does not save.

The resumed runs are compared bit for bit with an uninterrupted run of the same seed (the `reference` fixture).
"""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import RUN, TINY, assert_same_run, env, invoke, one_line_error, rows
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


def test_resume_refuses_changed_data_unless_allowed(tmp_path, photo_dir):
    out = tmp_path / "run"
    args = ["--steps", "4", "--save-every", "2", "--previews", "0", *TINY]
    assert invoke("pretrain", photo_dir, "--out", out, *args).exit_code == 0
    moved = tmp_path / "same-files-elsewhere"
    shutil.copytree(photo_dir, moved)
    r = invoke("pretrain", moved, "--out", out, "--resume", "--steps", "6")  # the same files, moved: fine
    assert r.exit_code == 0, r.output

    first = sorted(p for p in moved.rglob("*") if p.is_file())[0]
    first.rename(first.with_name("renamed" + first.suffix))
    line = one_line_error(
        invoke("pretrain", moved, "--out", out, "--resume", "--steps", "8"),
        1,
        "1 file added",
        "'a/renamed",
        "1 file removed",
        "--allow-data-change",
    )
    assert "cannot resume" in line

    other = tmp_path / "other"
    shutil.copytree(photo_dir, other)
    for p in sorted(p for p in other.rglob("*") if p.is_file())[:3]:
        p.write_bytes(p.read_bytes() + b"\0" * 10)  # same names and count, other contents
    one_line_error(invoke("pretrain", other, "--out", out, "--resume", "--steps", "8"), 1, "3 files changed in size")

    r = invoke("pretrain", other, "--out", out, "--resume", "--steps", "8", "--allow-data-change")
    assert r.exit_code == 0 and "warning: the data differs" in r.stderr, r.output
    state = json.loads((out / "checkpoints" / "step-00000008" / "state.json").read_text())
    assert state["data"]["files"] == 8 and len(state["data"]["sha256"]) == 64
    saved = json.loads((out / "config.json").read_text())["train"]
    assert saved["allow_data_change"] is False  # an allowance for one resume, not for every later one
    r = invoke("pretrain", photo_dir, "--out", out, "--resume", "--steps", "10")  # back on the first data
    assert r.exit_code == 1 and "3 files changed in size" in r.stderr


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


def test_a_diverged_run_never_saves_or_names_a_non_finite_checkpoint(tmp_path, photo_dir):
    out = tmp_path / "run"
    r = invoke(
        "pretrain",
        photo_dir,
        "--out",
        out,
        "--steps",
        "20",
        "--save-every",
        "1",
        "--lr",
        "1e30",
        "--warmup-epochs",
        "0",
        "--previews",
        "0",
        *TINY,
    )
    line = one_line_error(r, 1, "non-finite")
    for ckpt in (out / "checkpoints").glob("step-*"):
        maecli.load(ckpt / "model.safetensors")  # refuses NaN or inf weights
    named = re.search(r"step-\d{8}", line)
    if named:
        assert (out / "checkpoints" / named.group()).is_dir()
    if (out / "model.safetensors").exists():
        maecli.load(out)


def test_resume_with_the_other_training_command_names_it(tiny_run, photo_dir):
    """finetune --resume on a pretraining run said its config.json was unreadable."""
    r = invoke("finetune", photo_dir, "--out", tiny_run, "--resume")
    assert r.exit_code == 1 and "maecli pretrain made it" in r.stderr and "unreadable" not in r.stderr, r.output
