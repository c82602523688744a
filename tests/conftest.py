"""Shared fixtures: real images in temporary folders, and a tiny model config that trains in seconds."""

import os
import shutil
from pathlib import Path

import pytest

# Tiny test models run fastest on one thread, and CI shares two cores between pytest and its subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "images"
SHARED_DATA = ROOT.parent / "shared" / "data"

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
