"""Shared fixtures: real images in temporary folders, and a tiny model config that trains in seconds; helpers for
the one-line error promise and for runs started, stopped and resumed in a subprocess."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Tiny test models run fastest on one thread, and CI shares two cores between pytest and its subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "images"
SHARED_DATA = ROOT.parent / "shared" / "data"
PHOTO = next(p for p in sorted(EXAMPLES.iterdir()) if p.suffix == ".jpg")

# A model small enough that a few CLI steps take seconds on 2 cores.
TINY = [
    "--model",
    "vit-tiny",
    "--img-size",
    "32",
    "--patch-size",
    "8",
    "--embed-dim",
    "32",
    "--depth",
    "2",
    "--num-heads",
    "2",
    "--decoder-dim",
    "32",
    "--decoder-depth",
    "1",
    "--decoder-heads",
    "2",
    "--batch-size",
    "4",
    "--workers",
    "0",
]


def invoke(*args, input=None):
    """The real CLI, in this process: invoke("embed", path, "-w", weights); stdout and stderr kept apart."""
    from typer.testing import CliRunner

    from maecli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def one_line_error(r, code: int = 1, *words: str) -> str:
    """The promise for every failure: exit `code`, exactly one "error: " line naming `words`, no traceback."""
    assert r.exit_code == code, r.output
    assert r.stderr.startswith("error: ") or "\nerror: " in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def env(**extra) -> dict:
    """For a CLI subprocess: it imports this checkout of maecli, whatever is installed, uses one thread, and is no
    rank of a launcher that may have started pytest."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.pop("RANK", None)
    return e


def answers_each_path_in_turn(command: list[str], paths: list, timeout: float = 60) -> list[str]:
    """Run `maecli COMMAND -` and feed it one path at a time, each only once the previous one's line came out (as
    an interactive pipeline does): a command that waits for a full batch never answers and fails here."""
    import select
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "maecli", *command, "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env(),
    )
    lines = []
    try:
        for path in paths:
            proc.stdin.write(f"{path}\n".encode())
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], timeout)
            assert ready, f"no output within {timeout}s after {path}"
            lines.append(proc.stdout.readline().decode())
        proc.stdin.close()
        assert proc.wait(timeout=timeout) == 0
    finally:
        proc.kill()
    return lines


@pytest.fixture
def photo_dir(tmp_path) -> Path:
    """Real photos (RGB JPEGs and grayscale PNGs) in nested folders."""
    root = tmp_path / "photos"
    files = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".jpg", ".png"))
    for i, f in enumerate(files[:8]):
        sub = root / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, sub / f.name)
    return root


@pytest.fixture
def tiny_run(tmp_path, photo_dir):
    """A finished 4-step pretrain through the CLI; returns its run folder."""
    out = tmp_path / "run"
    result = invoke("pretrain", photo_dir, "--out", out, "--steps", "4", *TINY)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def bad_images_dir(tmp_path) -> Path:
    """Broken and awkward image files (zero bytes, truncated, bombs, symlink loops, a FIFO, ...).

    `bad_images.CORPUS` says what each file is and whether it must decode; `bad_images.describe(root)`
    prints that list. deleted.jpg is whole: a test removes it after discovery.
    """
    from bad_images import make_bad_images

    root = tmp_path / "bad_images"
    make_bad_images(root)
    yield root
    os.chmod(root / "no_permission.jpg", 0o644)  # so the temporary folder can be removed without root


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A lone model.safetensors of a tiny seeded MAE (its config in the header), for inference tests."""
    import torch

    from maecli.model import MAE, MAEConfig
    from maecli.weights import save_weights

    torch.manual_seed(0)
    cfg = MAEConfig(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2
    )
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_weights(MAE(cfg), path)
    return path


# ----------------------------------------------------------------------------------------------
# A short pretrain run that is stopped and resumed, and compared bit for bit with one never stopped

# 24 images in batches of 2: 12 steps an epoch, 5 epochs; a checkpoint every 5 steps lands mid-epoch.
RUN = [
    *TINY,
    "--batch-size",
    "2",
    "--steps",
    "60",
    "--save-every",
    "5",
    "--log-every",
    "1",
    "--lr",
    "1e-3",
    "--warmup-epochs",
    "1",
]
STEPS = 60


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread here and in the runs started from here (see env()): runs compared bit for bit
    must use the same count, a tiny model gains nothing from more, and a busy CI box loses a lot to threads
    waiting on each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    """24 small images (RGB and grayscale, JPEG and PNG, various sizes): cheap to decode, many steps a second."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    for i in range(24):
        h, w = rng.integers(36, 72, size=2)
        gray = i % 3 == 0
        arr = rng.integers(0, 256, size=(h, w) if gray else (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def reference(one_thread, small_dir, tmp_path_factory):
    """The uninterrupted RUN every interrupted one must match: its weights, metrics rows and weights file bytes."""
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("reference") / "run"
    r = invoke("pretrain", small_dir, "--out", out, *RUN)
    assert r.exit_code == 0, r.output
    return load_file(out / "model.safetensors"), rows(out), (out / "model.safetensors").read_bytes()


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(out: Path, reference):
    """Bit-identical weights, and the metrics rows of every step exactly once with the same losses."""
    import torch
    from safetensors.torch import load_file

    weights, ref_rows, _ = reference
    mine = load_file(out / "model.safetensors")
    assert mine.keys() == weights.keys()
    for k in weights:
        assert torch.equal(mine[k], weights[k]), f"{k} differs from the uninterrupted run"
    got = rows(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, ref_rows):
        assert (a["loss"], a["lr"], a["images_seen"]) == (b["loss"], b["lr"], b["images_seen"]), a["step"]


def last_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):  # not there yet, or a line half written
        return 0


def start(args, log: Path) -> subprocess.Popen:
    # A session of its own: the test can signal the whole process group, as a terminal or scheduler does.
    return subprocess.Popen(
        [sys.executable, "-m", "maecli", *map(str, args)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
        start_new_session=True,
    )


def stop_midway(proc: subprocess.Popen, out: Path, sig: int, group: bool, after_step: int = 8) -> int:
    """Once a --save-every checkpoint exists and a later step is logged, send `sig`; returns the exit code."""
    deadline = time.time() + 120
    while not (
        (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*")) and last_step(out) >= after_step
    ):
        assert proc.poll() is None, f"the run ended before it could be stopped:\n{(out.parent / 'log').read_text()}"
        assert time.time() < deadline, "the run never got going"
        time.sleep(0.01)
    (os.killpg if group else os.kill)(proc.pid, sig)
    try:
        return proc.wait(timeout=120)
    finally:
        try:  # orphaned loader workers of a SIGKILLed run
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
