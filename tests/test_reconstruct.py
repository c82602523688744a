"""`maecli reconstruct` and the pretraining previews, end to end on a tiny pretrained model and real photos."""

import io
import json
import math

import numpy as np
import pytest
import torch
from conftest import EXAMPLES, TINY, invoke
from PIL import Image
from safetensors.torch import save_file

import maecli
from maecli.model import MAE, MAEConfig, patchify
from maecli.reconstruct import GREY, layout, preview_paths, reconstruct
from maecli.weights import save_weights, state_dict_for_saving

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PHOTOS = [EXAMPLES / n for n in ("skimage_chelsea.jpg", "skimage_coffee.jpg", "skimage_camera_gray.png")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model pretrained for 6 steps (2 epochs of 3 steps) on the example photos, with previews on."""
    out = tmp_path_factory.mktemp("recon") / "run"
    r = invoke("pretrain", EXAMPLES, "--out", out, "--steps", "6", *TINY, "--batch-size", "6", "--previews", "3")
    assert r.exit_code == 0, r.output
    return out, r


def tiny_cfg(**kw):
    base = dict(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2
    )
    return MAEConfig(**{**base, **kw})


def saved_model(path, **kw):
    """A freshly initialised model saved as a lone weights file (config in the header)."""
    torch.manual_seed(0)
    save_weights(MAE(tiny_cfg(**kw)), path)
    return path


def test_previews_written_during_pretrain(run):
    out, result = run
    previews = sorted(p.name for p in (out / "previews").iterdir())
    assert previews == ["epoch-0001.png", "epoch-0002.png"]
    assert "latest preview" in result.stderr and "epoch-0002.png" in result.stderr
    img = Image.open(out / "previews" / "epoch-0002.png")
    img.load()
    assert img.format == "PNG" and img.mode == "RGB"
    # the same three training images each epoch, and the model changed in between
    assert (out / "previews" / "epoch-0001.png").read_bytes() != (out / "previews" / "epoch-0002.png").read_bytes()


def test_preview_images_are_spread_and_skip_unreadable(tmp_path):
    paths = []
    for i in range(8):
        p = tmp_path / f"{i}.png"
        if i == 4:
            p.write_bytes(b"not a picture")
        else:
            Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(p)
        paths.append(p)
    assert [p.name for p in preview_paths(paths, 2, 3)] == ["0.png", "5.png"]
    assert [p.name for p in preview_paths(paths, 4, 3)] == ["0.png", "2.png", "5.png", "6.png"]
    assert len(preview_paths(paths, 20, 3)) == 7


def test_grid_rows_and_model_size_tiles(run, tmp_path):
    out, _ = run
    png = tmp_path / "grid.png"
    r = invoke("reconstruct", *PHOTOS, "--weights", out, "--out", png)
    assert r.exit_code == 0 and "256 px tiles" in r.stderr, r.output  # 32 px enlarged 8 times by default
    r = invoke("reconstruct", *PHOTOS, "--weights", out, "--mask", "0.75", "--out", png, "--zoom", "1")
    assert r.exit_code == 0, r.output
    assert f"wrote {png}" in r.stderr and r.stdout == ""
    grid = Image.open(png).convert("RGB")
    model = maecli.load(out)
    rec = reconstruct(model, PHOTOS, mask_ratio=0.75, seed=0)
    lay, _ = layout(rec)
    assert grid.size == (lay.width, lay.height)
    assert lay.rows == 3 and lay.tile == 32
    for row in range(3):
        boxes = [lay.tile_box(row, col) for col in range(4)]
        assert all(b[2] - b[0] == 32 and b[3] - b[1] == 32 for b in boxes)
        # first column is the original as the model sees it, pixel for pixel
        tile = torch.from_numpy(np.array(grid.crop(boxes[0]))).float()
        expected = (rec.original[row].permute(1, 2, 0) * 255).round()
        assert torch.equal(tile, expected)
        # second column: exactly the hidden patches are grey
        masked = torch.from_numpy(np.array(grid.crop(boxes[1]))).permute(2, 0, 1)[None]
        grey = (patchify(masked, 8) == round(GREY * 255)).all(-1)[0]
        assert torch.equal(grey, rec.mask[row].bool())


@pytest.mark.parametrize("ratio", [0.75, 0.95, 0.5])
def test_exact_hidden_count(run, ratio):
    out, _ = run
    r = invoke("reconstruct", *PHOTOS[:2], "--weights", out, "--mask", ratio, "--out", "-")
    assert r.exit_code == 0, r.output
    L = 16
    hidden = L - int(L * (1 - ratio))
    assert r.stderr.count(f"({hidden} of {L} patches hidden)") == 2
    rec = reconstruct(maecli.load(out), PHOTOS[:2], mask_ratio=ratio)
    assert rec.mask.sum(1).tolist() == [hidden, hidden]


def test_same_seed_same_bytes_other_seed_other_mask(run):
    out, _ = run
    a = invoke("reconstruct", *PHOTOS, "--weights", out, "--seed", "7", "--out", "-")
    b = invoke("reconstruct", *PHOTOS, "--weights", out, "--seed", "7", "--out", "-")
    c = invoke("reconstruct", *PHOTOS, "--weights", out, "--seed", "8", "--out", "-")
    assert a.exit_code == b.exit_code == c.exit_code == 0
    assert a.stdout_bytes == b.stdout_bytes
    assert a.stdout_bytes != c.stdout_bytes
    model = maecli.load(out)
    m7 = reconstruct(model, PHOTOS, mask_ratio=0.75, seed=7).mask
    m8 = reconstruct(model, PHOTOS, mask_ratio=0.75, seed=8).mask
    assert torch.equal(m7, reconstruct(model, PHOTOS, mask_ratio=0.75, seed=7).mask)
    assert not torch.equal(m7, m8)


def test_png_on_stdout(run, tmp_path, monkeypatch):
    out, _ = run
    monkeypatch.chdir(tmp_path)
    r = invoke("reconstruct", PHOTOS[0], "--weights", out / "model.safetensors", "--out", "-")
    assert r.exit_code == 0, r.output
    assert r.stdout_bytes.startswith(PNG_SIGNATURE)
    img = Image.open(io.BytesIO(r.stdout_bytes))
    img.verify()
    assert "hidden-patch MSE" in r.stderr and "borrow" in r.stderr  # the default model uses norm-pix-loss
    assert not (tmp_path / "reconstruction.png").exists()


def test_json_one_object_per_image(run):
    out, _ = run
    r = invoke("reconstruct", *PHOTOS, "--weights", out, "--json", "--out", str(out.parent / "j.png"))
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["image"] for row in rows] == [str(p) for p in PHOTOS]
    for row in rows:
        assert {"image", "mse", "hidden", "patches", "mask", "seed"} <= set(row)
        # the mask the run was trained with (pretrain's default)
        assert row["patches"] == 16 and row["hidden"] == 16 - int(16 * 0.25) and row["mask"] == 0.75
        assert math.isfinite(row["mse"]) and row["mse"] > 0
        assert f"{row['mse']:.4f}" in r.stderr
    r = invoke("reconstruct", *PHOTOS, "--weights", out, "--json", "--out", "-")
    assert r.exit_code == 2 and "pick one" in r.stderr


def test_mse_is_the_models_loss(run):
    model = maecli.load(run[0])
    rec = reconstruct(model, PHOTOS[:1], mask_ratio=0.75, seed=3)
    from maecli.reconstruct import load_images, mask_noise

    x = load_images(PHOTOS[:1], 32, 3)
    with torch.no_grad():
        loss, _, _ = model(x, mask_ratio=0.75, noise=mask_noise(1, 16, 3))
    assert rec.mse[0] == pytest.approx(loss.item(), rel=1e-5)


def test_patch_stats_are_borrowed_only_when_asked(run):
    model = maecli.load(run[0])
    borrowed = reconstruct(model, PHOTOS[:2], mask_ratio=0.75, seed=1)
    raw = reconstruct(model, PHOTOS[:2], mask_ratio=0.75, seed=1, use_patch_stats=False)
    assert borrowed.mse == raw.mse and torch.equal(borrowed.masked, raw.masked)
    assert not torch.allclose(borrowed.prediction, raw.prediction)
    assert "true mean and variance" in borrowed.legend() and "not predicted" in raw.legend()
    # visible patches come from the original, hidden ones from the prediction
    hidden = borrowed.mask.bool().unsqueeze(-1)
    pasted, orig, pred = (patchify(t, 8) for t in (borrowed.pasted, borrowed.original, borrowed.prediction))
    assert torch.equal(torch.where(hidden, pred, orig), pasted)


def test_plain_pixel_model_borrows_nothing(tmp_path):
    weights = saved_model(tmp_path / "pixels.safetensors", norm_pix_loss=False)
    r = invoke("reconstruct", PHOTOS[0], "--weights", weights, "--out", tmp_path / "p.png", "--no-patch-stats")
    assert r.exit_code == 0, r.output
    assert "note:" not in r.stderr
    rec = reconstruct(maecli.load(weights), PHOTOS[:1])
    assert "nothing borrowed" in rec.legend()


def test_one_channel_model_gives_grayscale_tiles(tmp_path):
    weights = saved_model(tmp_path / "gray.safetensors", in_chans=1)
    png = tmp_path / "gray.png"
    r = invoke("reconstruct", *PHOTOS, "--weights", weights, "--out", png, "--zoom", "2")
    assert r.exit_code == 0, r.output
    img = Image.open(png)
    assert img.mode == "L"
    rec = reconstruct(maecli.load(weights), PHOTOS)
    assert rec.original.shape == (3, 1, 32, 32)
    lay, _ = layout(rec, zoom=2)
    assert img.size == (lay.width, lay.height) and lay.tile == 64


def test_encoder_only_weights_are_refused(run, tmp_path):
    model = maecli.load(run[0])
    state = {
        k: v for k, v in state_dict_for_saving(model).items() if not (k.startswith("decoder_") or k == "mask_token")
    }
    path = tmp_path / "encoder.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "maecli_config": json.dumps(model.cfg.to_dict())})
    assert maecli.load(path).has_decoder is False
    r = invoke("reconstruct", PHOTOS[0], "--weights", path, "--out", tmp_path / "x.png")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "this checkpoint holds only the encoder" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_clear_errors(run, tmp_path):
    out, _ = run
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a jpeg")
    not_mae = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(not_mae), metadata={"maecli_config": json.dumps(tiny_cfg().to_dict())})
    cases = [
        ([PHOTOS[0], tmp_path / "missing.jpg", "--weights", out], "missing.jpg"),
        ([broken, "--weights", out], "cannot read image"),
        ([tmp_path, "--weights", out], "is a folder"),
        ([PHOTOS[0], "--weights", PHOTOS[1]], "is not a "),  # a JPEG given as weights
        ([PHOTOS[0], "--weights", not_mae], "does not match the MAE architecture"),
        ([PHOTOS[0], "--weights", tmp_path / "nope"], "weights not found"),
        ([PHOTOS[0], "--weights", out, "--out", tmp_path], "cannot write"),  # a folder (a missing one is made)
    ]
    for args, message in cases:
        r = invoke("reconstruct", *args)
        assert r.exit_code == 1, (args, r.output)
        assert message in r.stderr and r.stderr.startswith("error: "), (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    r = invoke("reconstruct", PHOTOS[0], "--weights", out, "--mask", "1")
    assert r.exit_code == 2 and "--mask" in r.stderr
