"""`maecli pretrain` end to end through the CLI on real images, plus the data layer it stands on."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TINY, invoke
from safetensors.torch import load_file

import maecli
from maecli.data import EpochBatches, decode, find_images


def test_run_folder_is_complete(tiny_run):
    assert {p.name for p in tiny_run.iterdir()} >= {"config.json", "model.safetensors", "metrics.jsonl", "checkpoints"}
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["model"]["embed_dim"] == 32 and cfg["train"]["steps"] == 4
    assert cfg["command"] == "pretrain" and cfg["schedule"]["total_steps"] == 4
    assert cfg["schedule"]["peak_lr"] == cfg["train"]["blr"] * cfg["schedule"]["effective_batch"] / 256
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4
    for row in rows:
        assert {"step", "epoch", "loss", "lr", "images_per_sec"} <= set(row)
    ckpts = sorted(p.name for p in (tiny_run / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004"]  # one per epoch end, --keep 2
    model = maecli.load(tiny_run)
    assert isinstance(model, maecli.MAE) and model.cfg.img_size == 32
    # the lone weights file carries its config too
    lone = tiny_run.parent / "lone.safetensors"
    shutil.copy(tiny_run / "model.safetensors", lone)
    assert maecli.load(lone).cfg.depth == 2


def test_loss_falls(tmp_path, photo_dir):
    out = tmp_path / "run"
    r = invoke(
        "pretrain",
        photo_dir,
        "--out",
        out,
        "--steps",
        "40",
        "--lr",
        "2e-3",
        "--warmup-epochs",
        "2",
        "--log-every",
        "5",
        "--previews",
        "0",
        *TINY,
        "--batch-size",
        "8",
    )
    assert r.exit_code == 0, r.output
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, losses


def test_existing_run_is_not_overwritten(tiny_run, photo_dir):
    before = (tiny_run / "model.safetensors").read_bytes()
    r = invoke("pretrain", photo_dir, "--out", tiny_run, "--steps", "2", *TINY)
    assert r.exit_code != 0
    assert "already holds a run" in r.stderr and "Traceback" not in r.output
    assert (tiny_run / "model.safetensors").read_bytes() == before
    r = invoke("pretrain", photo_dir, "--out", tiny_run, "--steps", "2", "--overwrite", *TINY)
    assert r.exit_code == 0, r.output
    assert json.loads((tiny_run / "config.json").read_text())["train"]["steps"] == 2


def test_resume_matches_uninterrupted_run(tmp_path, photo_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        r = invoke("pretrain", photo_dir, "--out", out, "--steps", "6", "--lr", "1e-3", *TINY)
        assert r.exit_code == 0, r.output
    # b "dies" after step 4: drop what came later, then resume
    shutil.rmtree(b / "checkpoints" / "step-00000006")
    (b / "model.safetensors").unlink()
    r = invoke("pretrain", photo_dir, "--out", b, "--resume")
    assert r.exit_code == 0, r.output
    assert "resuming" in r.stderr and "from step 4" in r.stderr
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_broken_files_are_skipped_and_counted(tmp_path, photo_dir):
    (photo_dir / "empty.jpg").write_bytes(b"")
    (photo_dir / "a" / "notes.jpg").write_text("this is not a picture")
    good = next(photo_dir.rglob("*.jpg"))
    (photo_dir / "a" / "truncated.jpg").write_bytes(good.read_bytes()[:300])
    (photo_dir / "readme.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "run"
    r = invoke("pretrain", photo_dir, "--out", out, "--steps", "3", "--batch-size", "11", *TINY[:-4], "--workers", "0")
    assert r.exit_code == 0, r.output
    for name in ("empty.jpg", "notes.jpg", "truncated.jpg"):
        assert "skipped" in r.stderr and name in r.stderr
    assert "3 unreadable files skipped" in r.stderr
    assert "3 files skipped" in r.stderr


def test_no_images_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = invoke("pretrain", empty, "--out", tmp_path / "run", *TINY)
    assert r.exit_code == 1 and "no image files found" in r.stderr and "Traceback" not in r.output
    (empty / "x.png").write_bytes(b"junk")
    r = invoke("pretrain", empty, "--out", tmp_path / "run", *TINY)
    assert r.exit_code == 1 and "could be read" in r.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--mask", "1.0"], "strictly between 0 and 1"),
        (["--mask", "0"], "strictly between 0 and 1"),
        (["--img-size", "30"], "image size 30 is not divisible by patch size 8"),
        (["--in-chans", "2"], "--in-chans 2, but"),
        (["--model", "vit-gigantic"], "vit-gigantic"),
        (["--batch-size", "0"], "batch-size"),
    ],
)
def test_bad_flags(tmp_path, photo_dir, args, message):
    r = invoke("pretrain", photo_dir, "--out", tmp_path / "run", *TINY, *args)
    assert r.exit_code != 0
    assert message in r.output and "Traceback" not in r.output


def test_missing_data_folder(tmp_path):
    r = invoke("pretrain", tmp_path / "nope", *TINY)
    assert r.exit_code == 1 and "does not exist" in r.stderr


def test_help_does_not_import_torch():
    code = "import sys; from maecli.cli import app; assert 'torch' not in sys.modules and 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "maecli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "pretrain" in out.stdout


# -- the data layer ---------------------------------------------------------------------------


def test_find_images_order_and_filters(tmp_path):
    for rel in ["b/2.JPG", "a/1.png", "a/.hidden.png", ".cache/x.jpg", "c/notes.txt", "z.TIFF", "a/d/3.webp"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    names = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert names == ["a/1.png", "a/d/3.webp", "b/2.JPG", "z.TIFF"]


def test_decode_modes(tmp_path):
    import numpy as np
    from PIL import Image

    cases = {
        "rgba.png": Image.new("RGBA", (10, 7), (255, 0, 0, 0)),
        "la.png": Image.new("LA", (10, 7), (100, 255)),
        "p.png": Image.new("P", (10, 7), 3),
        "cmyk.jpg": Image.new("CMYK", (10, 7), (0, 0, 0, 0)),
        "i16.png": Image.fromarray(np.full((7, 10), 65535, dtype=np.uint16)),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        for c in (1, 3):
            x = decode(tmp_path / name, c)
            assert x.dtype == torch.uint8 and x.shape == (c, 7, 10), name
    assert decode(tmp_path / "i16.png", 1).max().item() == 255
    assert decode(tmp_path / "rgba.png", 3)[:, 0, 0].tolist() == [255, 255, 255]  # transparent -> white


def test_decode_applies_exif_orientation(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (20, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    img.save(tmp_path / "r.jpg", exif=exif)
    assert decode(tmp_path / "r.jpg").shape == (3, 20, 10)


def test_epoch_batches_are_disjoint_across_ranks_and_resumable():
    full = [list(b) for b in EpochBatches(10, 3, seed=1, epochs=2)]
    ranks = [[i for b in EpochBatches(10, 2, seed=1, epochs=1, rank=r, world=2) for _, i in b] for r in (0, 1)]
    assert set(ranks[0]).isdisjoint(ranks[1]) and set(ranks[0]) | set(ranks[1]) == set(range(10))
    tail = [list(b) for b in EpochBatches(10, 3, seed=1, epochs=2, start_epoch=1, start_micro=2)]
    assert tail == full[4 + 2 :]
    assert len(EpochBatches(10, 3, seed=1, epochs=2)) == 8


def test_repeat_makes_an_epoch_several_passes(tmp_path, photo_dir):
    """--repeat 3 on 8 images: an epoch is 24 crops (6 steps of 4), with one checkpoint and one preview at its end."""
    out = tmp_path / "run"
    r = invoke("pretrain", photo_dir, "--out", out, "--epochs", "1", "--repeat", "3", "--previews", "1", *TINY)
    assert r.exit_code == 0, r.output
    assert "8 images (x3 an epoch)" in r.stderr and "6 steps (6/epoch, 1 epoch)" in r.stderr
    assert "ViT 32-d x 2, 2 heads at 32px" in r.stderr  # TINY's own shape, not the preset's name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and rows[-1]["images_seen"] == 24
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000006"]
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["epoch-0001.png"]


def test_init_from_continues_the_sources_architecture_at_another_size(tmp_path, photo_dir, tiny_weights):
    """No size flags: the source decides the architecture; --img-size 64 interpolates its position embeddings."""
    out = tmp_path / "continued"
    with pytest.warns(UserWarning, match="position embeddings resized from 4x4 to 8x8"):
        r = invoke("pretrain", photo_dir, "--out", out, "--steps", "2", "--img-size", "64", "--init-from", tiny_weights)
    assert r.exit_code == 0 and f"continuing {tiny_weights}" in r.stderr, r.output
    source, cfg = maecli.load(tiny_weights).cfg, json.loads((out / "config.json").read_text())["model"]
    mean, std = maecli.data.Pixels.of(source).norm()  # the source's (ImageNet's), now written out
    expected = json.loads(json.dumps({**source.to_dict(), "img_size": 64, "mean": mean, "std": std}))
    assert cfg == expected  # patch, widths, depths, heads, the loss target and the normalization kept
    state = json.loads((out / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["step"] == 2  # a fresh schedule: the source's step count is not carried over
    r = invoke("pretrain", photo_dir, "--out", out, "--resume", "--steps", "3")
    assert r.exit_code == 0 and "from step 2" in r.stderr, r.output


def test_init_from_an_encoder_gets_a_new_decoder_and_refuses_another_architecture(tmp_path, photo_dir, tiny_weights):
    encoder = tmp_path / "encoder.safetensors"
    assert invoke("export", tiny_weights, encoder, "--format", "timm").exit_code == 0
    out = tmp_path / "run"
    decoder = ["--decoder-dim", "16", "--decoder-depth", "1", "--decoder-heads", "2"]
    r = invoke("pretrain", photo_dir, "--out", out, "--steps", "1", "--img-size", "32", "--num-heads", "2", *decoder,
               "--init-from", encoder)  # fmt: skip
    assert r.exit_code == 0 and "has no decoder: a new one (16-d x 1)" in r.stderr, r.output
    trained, source = maecli.load(out), maecli.load(tiny_weights)
    assert trained.has_decoder and trained.cfg.embed_dim == source.cfg.embed_dim
    for flags, named in ((["--patch-size", "4"], "--patch-size"), (["--model", "vit-small"], "--model")):
        r = invoke("pretrain", photo_dir, "--out", tmp_path / "x", "--steps", "1", *flags, "--init-from", tiny_weights)
        assert r.exit_code == 2 and named in r.stderr and "leave the flag out" in r.stderr, r.output
        assert not (tmp_path / "x").exists()
