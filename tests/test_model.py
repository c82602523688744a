"""The math: patching, masking, the loss, position embeddings, and the config's checks."""

import math

import pytest
import torch

from maecli.model import MAE, MAEConfig, num_visible, patchify, random_masking, sincos_pos_embed, unpatchify


def tiny_cfg(**kw):
    base = dict(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2
    )
    base.update(kw)
    return MAEConfig(**base)


@pytest.mark.parametrize("c", [1, 3])
def test_patchify_round_trip(c):
    imgs = torch.randn(2, c, 32, 32)
    x = patchify(imgs, 8)
    assert x.shape == (2, 16, 8 * 8 * c)
    assert torch.equal(unpatchify(x, 8, c), imgs)


def test_patchify_layout():
    imgs = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    x = patchify(imgs, 2)
    # first patch, first pixel holds both channels side by side (p, p, C order)
    assert x[0, 0, :2].tolist() == [0.0, 16.0]
    # second patch starts at column 2 of row 0
    assert x[0, 1, 0].item() == 2.0


@pytest.mark.parametrize("L,ratio", [(64, 0.75), (196, 0.75), (196, 0.95), (16, 0.5), (49, 0.9)])
def test_exact_hidden_count(L, ratio):
    x = torch.randn(3, L, 8)
    visible, mask, ids_restore = random_masking(x, ratio, generator=torch.Generator().manual_seed(0))
    keep = int(L * (1 - ratio))
    assert visible.shape == (3, keep, 8)
    assert (mask.sum(1) == L - keep).all()
    assert num_visible(L, ratio) == keep


def test_fixed_noise_gives_fixed_mask_and_visible_tokens():
    x = torch.randn(2, 16, 4)
    noise = torch.rand(2, 16)
    v1, m1, r1 = random_masking(x, 0.75, noise=noise)
    v2, m2, r2 = random_masking(x, 0.75, noise=noise.clone())
    assert torch.equal(m1, m2) and torch.equal(v1, v2)
    # the kept tokens are the ones with the lowest noise
    lowest = noise.argsort(1)[:, :4]
    assert torch.equal(v1, torch.gather(x, 1, lowest.unsqueeze(-1).expand(-1, -1, 4)))
    assert (m1.gather(1, lowest) == 0).all()
    # ids_restore undoes the shuffle
    assert torch.equal(noise.argsort(1).gather(1, r1), torch.arange(16).expand(2, -1))


def test_generator_reproduces_mask():
    x = torch.randn(2, 16, 4)
    _, m1, _ = random_masking(x, 0.75, generator=torch.Generator().manual_seed(3))
    _, m2, _ = random_masking(x, 0.75, generator=torch.Generator().manual_seed(3))
    _, m3, _ = random_masking(x, 0.75, generator=torch.Generator().manual_seed(4))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)


def test_loss_counts_hidden_patches_only():
    torch.manual_seed(0)
    model = MAE(tiny_cfg(norm_pix_loss=False))
    imgs = torch.randn(2, 3, 32, 32)
    target = patchify(imgs, 8)
    mask = torch.zeros(2, 16)
    mask[:, :4] = 1
    pred = target.clone()
    pred[:, :4] += 2.0  # error 4 per pixel on hidden patches
    pred[:, 4:] += 100.0  # visible patches: ignored however wrong
    assert model.forward_loss(imgs, pred, mask).item() == pytest.approx(4.0)


def test_norm_pix_loss_target():
    model = MAE(tiny_cfg(norm_pix_loss=True))
    imgs = torch.randn(1, 3, 32, 32) * 5 + 3
    t = model.target(imgs)
    assert torch.allclose(t.mean(-1), torch.zeros(1, 16), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(1, 16), atol=1e-3)


def test_forward_shapes_and_encoder_sees_visible_only():
    model = MAE(tiny_cfg())
    imgs = torch.randn(2, 3, 32, 32)
    latent, mask, _ = model.forward_encoder(imgs, 0.75, generator=torch.Generator().manual_seed(0))
    assert latent.shape == (2, 1 + 4, 32)
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    assert pred.shape == (2, 16, 8 * 8 * 3) and mask.shape == (2, 16)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.encode(imgs).shape == (2, 17, 32)


def test_original_parameter_names():
    names = set(MAE(tiny_cfg()).state_dict())
    for key in [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "blocks.0.norm1.weight",
        "blocks.1.attn.qkv.weight",
        "blocks.0.attn.proj.bias",
        "blocks.0.mlp.fc1.weight",
        "norm.weight",
        "mask_token",
        "decoder_embed.weight",
        "decoder_pos_embed",
        "decoder_blocks.0.attn.qkv.bias",
        "decoder_norm.bias",
        "decoder_pred.weight",
    ]:
        assert key in names


def test_sincos_matches_closed_form():
    emb = sincos_pos_embed(8, 3)
    assert emb.shape == (10, 8)
    assert torch.equal(emb[0], torch.zeros(8))
    # patch at row 1, column 2 -> index 1 + 1*3 + 2; first half encodes the column, second the row
    row, col = 1, 2
    e = emb[1 + row * 3 + col]
    omega = [1.0, 1.0 / 100.0]
    expect = [
        math.sin(col * omega[0]),
        math.sin(col * omega[1]),
        math.cos(col * omega[0]),
        math.cos(col * omega[1]),
        math.sin(row * omega[0]),
        math.sin(row * omega[1]),
        math.cos(row * omega[0]),
        math.cos(row * omega[1]),
    ]
    assert torch.allclose(e, torch.tensor(expect), atol=1e-6)


def test_config_errors_name_values():
    with pytest.raises(ValueError, match="image size 100 is not divisible by patch size 16"):
        MAEConfig(img_size=100, patch_size=16)
    with pytest.raises(ValueError, match="in_chans"):
        MAEConfig(in_chans=0)
    with pytest.raises(ValueError, match="mean has 3 values for 6 channels"):
        MAEConfig(in_chans=6, mean=(1, 2, 3), std=(1,) * 6)
    assert MAEConfig(in_chans=6).in_chans == 6  # any band count
    cfg = MAEConfig.preset("vit-huge")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (1280, 32, 16, 14)
    assert (cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads) == (512, 8, 16)


def test_wrong_input_size_is_clear():
    model = MAE(tiny_cfg())
    with pytest.raises(ValueError, match="doesn't match model"):
        model(torch.randn(1, 3, 64, 64))


def test_bf16_autocast_path_matches_fp32():
    torch.manual_seed(0)
    model = MAE(tiny_cfg())
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    loss32, _, _ = model(imgs, noise=noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, _, _ = model(imgs, noise=noise)
    assert abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()


@pytest.mark.parametrize("field,value", [("patch_size", 0), ("depth", -1), ("embed_dim", 1.5)])
def test_config_rejects_nonsense_dimensions(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a positive integer"):
        MAEConfig(**{field: value})
