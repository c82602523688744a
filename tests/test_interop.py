"""Weights in and out: the original release's checkpoints, timm and Hugging Face transformers, compared numerically."""

import argparse
import json
import re
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

from maecli.cli import app
from maecli.errors import UsageError
from maecli.export import export_hf, export_timm, timm_create_call
from maecli.model import MAE, MAEConfig, sincos_pos_embed
from maecli.weights import WeightsError, load

TOL = 1e-4


def tiny_cfg(**kw):
    base = dict(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2
    )
    base.update(kw)
    return MAEConfig(**base)


def scramble(module: torch.nn.Module, seed: int = 0):
    """Random values everywhere (norm weights too), so a tensor loaded into the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "pos_embed" in name or "position_embeddings" in name:
                continue  # keep the fixed sin-cos embeddings
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 and "weight" in name else 0.0))
    return module


def inputs(cfg: MAEConfig, n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g), torch.rand(
        n, cfg.num_patches, generator=g
    )


# ----------------------------------------------------------------------------------------------
# The original release's layout, built here from its key names and shapes, and its math written out


def release_state(dim, depth, *, p=8, grid=4, c=3, decoder_dim=None, decoder_depth=1, seed=0):
    """A state dict in the layout of the release's MaskedAutoencoderViT (encoder-only without decoder_dim)."""
    shapes = {"cls_token": (1, 1, dim), "patch_embed.proj.weight": (dim, c, p, p), "patch_embed.proj.bias": (dim,)}

    def block(prefix, d):
        return {
            f"{prefix}.norm1.weight": (d,),
            f"{prefix}.norm1.bias": (d,),
            f"{prefix}.attn.qkv.weight": (3 * d, d),
            f"{prefix}.attn.qkv.bias": (3 * d,),
            f"{prefix}.attn.proj.weight": (d, d),
            f"{prefix}.attn.proj.bias": (d,),
            f"{prefix}.norm2.weight": (d,),
            f"{prefix}.norm2.bias": (d,),
            f"{prefix}.mlp.fc1.weight": (4 * d, d),
            f"{prefix}.mlp.fc1.bias": (4 * d,),
            f"{prefix}.mlp.fc2.weight": (d, 4 * d),
            f"{prefix}.mlp.fc2.bias": (d,),
        }

    for i in range(depth):
        shapes.update(block(f"blocks.{i}", dim))
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    if decoder_dim:
        shapes.update(
            {
                "mask_token": (1, 1, decoder_dim),
                "decoder_embed.weight": (decoder_dim, dim),
                "decoder_embed.bias": (decoder_dim,),
                "decoder_norm.weight": (decoder_dim,),
                "decoder_norm.bias": (decoder_dim,),
                "decoder_pred.weight": (p * p * c, decoder_dim),
                "decoder_pred.bias": (p * p * c,),
            }
        )
        for i in range(decoder_depth):
            shapes.update(block(f"decoder_blocks.{i}", decoder_dim))
    g = torch.Generator().manual_seed(seed)
    state = {
        k: torch.randn(s, generator=g) * 0.2 + (1.0 if k.endswith("norm1.weight") else 0.0) for k, s in shapes.items()
    }
    state["pos_embed"] = sincos_pos_embed(dim, grid)[None]
    if decoder_dim:
        state["decoder_pos_embed"] = sincos_pos_embed(decoder_dim, grid)[None]
    return state


def ref_blocks(sd, prefix, x, heads, eps):
    """Pre-norm ViT blocks computed straight from the tensors: attention with fused qkv, then a GELU MLP."""
    N, T, D = x.shape
    i = 0
    while f"{prefix}.{i}.attn.qkv.weight" in sd:
        w = lambda name, i=i: sd[f"{prefix}.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (D,), w("norm1.weight"), w("norm1.bias"), eps)
        q, k, v = F.linear(h, w("attn.qkv.weight"), w("attn.qkv.bias")).reshape(N, T, 3, heads, D // heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (N, heads, T, D/heads)
        a = torch.softmax(q @ k.transpose(-2, -1) / (D // heads) ** 0.5, dim=-1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(N, T, D), w("attn.proj.weight"), w("attn.proj.bias"))
        h = F.layer_norm(x, (D,), w("norm2.weight"), w("norm2.bias"), eps)
        x = x + F.linear(
            F.gelu(F.linear(h, w("mlp.fc1.weight"), w("mlp.fc1.bias"))), w("mlp.fc2.weight"), w("mlp.fc2.bias")
        )
        i += 1
    return x


def ref_encode(sd, imgs, heads, keep=None, eps=1e-6):
    """The release's encoder; `keep` (N, K) selects the visible patches in order."""
    p = sd["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    x = x + sd["pos_embed"][:, 1:]
    if keep is not None:
        x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(x.shape[0], -1, -1)
    x = ref_blocks(sd, "blocks", torch.cat([cls, x], dim=1), heads, eps)
    return F.layer_norm(x, x.shape[-1:], sd["norm.weight"], sd["norm.bias"], eps)


def ref_forward(sd, imgs, noise, mask_ratio, heads, decoder_heads, eps=1e-6):
    """The release's forward with norm_pix_loss off: (loss, pred)."""
    N, L = noise.shape
    order = noise.argsort(dim=1)
    keep = order[:, : int(L * (1 - mask_ratio))]
    x = F.linear(ref_encode(sd, imgs, heads, keep, eps), sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    tokens = sd["mask_token"].expand(N, L, -1).clone()
    tokens.scatter_(1, keep[..., None].expand(-1, -1, x.shape[-1]), x[:, 1:])  # visible tokens back in place
    x = torch.cat([x[:, :1], tokens], dim=1) + sd["decoder_pos_embed"]
    x = ref_blocks(sd, "decoder_blocks", x, decoder_heads, eps)
    x = F.layer_norm(x, x.shape[-1:], sd["decoder_norm.weight"], sd["decoder_norm.bias"], eps)
    pred = F.linear(x, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, 1:]
    p = sd["patch_embed.proj.weight"].shape[-1]
    target = imgs.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 4, 5, 1).reshape(N, L, -1)  # (p, p, C) order
    hidden = torch.ones(N, L).scatter_(1, keep, 0.0)
    loss = (((pred - target) ** 2).mean(-1) * hidden).sum() / hidden.sum()
    return loss, pred


def test_release_checkpoint_with_decoder_matches_the_release_math(tmp_path):
    sd = release_state(32, 2, decoder_dim=32, decoder_depth=2)
    path = tmp_path / "checkpoint-799.pth"
    # a training checkpoint of the release: settings as an argparse Namespace beside the weights
    torch.save({"model": sd, "epoch": 799, "args": argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.75)}, path)
    with pytest.raises(WeightsError, match="32 wide.*heads"):
        load(path)
    model = load(path, num_heads=2)
    assert model.has_decoder and model.cfg.decoder_heads == 16 and not model.cfg.norm_pix_loss
    imgs, noise = inputs(model.cfg)
    with torch.no_grad():
        loss, pred, _ = model(imgs, 0.75, noise=noise)
        ref_loss, ref_pred = ref_forward(sd, imgs, noise, 0.75, heads=2, decoder_heads=16)
    assert (pred - ref_pred).abs().max() < TOL and abs(loss - ref_loss) < TOL


def test_release_encoder_only_checkpoint_serves_embeddings(tmp_path):
    sd = release_state(192, 1)  # 192 wide: ViT-Tiny's width, so the heads (3) are known without a hint
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": sd}, path)
    model = load(path)
    assert not model.has_decoder and model.cfg.num_heads == 3 and (model.cfg.img_size, model.cfg.patch_size) == (32, 8)
    imgs, _ = inputs(model.cfg)
    with torch.no_grad():
        assert (model.encode(imgs) - ref_encode(sd, imgs, heads=3)).abs().max() < TOL
    with pytest.raises(RuntimeError, match="decoder"):
        model(imgs)
    with pytest.raises(WeightsError, match="vit-base is 768 wide"):
        load(path, model_hint="vit-base")


def test_loaded_parameters_own_their_memory(tmp_path):
    """Weights are loaded without initializing first (meta device + assign): half-precision tensors and tensors
    saved as views of one buffer must still become separate fp32 parameters that training can update."""
    sd = release_state(192, 1)
    flat = torch.cat([v.flatten() for v in sd.values()]).half()
    views, at = {}, 0
    for k, v in sd.items():  # every tensor a view into one fp16 buffer, as torch.save keeps them
        views[k] = flat[at : at + v.numel()].view(v.shape)
        at += v.numel()
    path = tmp_path / "views.pth"
    torch.save({"model": views}, path)
    model = load(path)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 and p.is_contiguous() and not p.is_meta for p in params.values())
    assert len({p.untyped_storage().data_ptr() for p in params.values()}) == len(params)
    qkv = params["blocks.0.attn.qkv.weight"]
    assert torch.equal(qkv, views["blocks.0.attn.qkv.weight"].float())
    assert qkv.requires_grad and not model.pos_embed.requires_grad
    with torch.no_grad():
        qkv.add_(1.0)  # updating one parameter leaves its neighbours alone
    assert torch.equal(params["blocks.0.attn.qkv.bias"], views["blocks.0.attn.qkv.bias"].float())


def test_timm_state_dict_with_head_and_fc_norm(tmp_path):
    sd = release_state(32, 1)
    sd["fc_norm.weight"], sd["fc_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")  # global-pool models
    sd["head.weight"], sd["head.bias"] = torch.randn(10, 32), torch.randn(10)
    path = tmp_path / "vit.safetensors"
    save_file(sd, str(path))
    with pytest.warns(UserWarning, match="fc_norm"):
        model = load(path, num_heads=4)
    sd["norm.weight"], sd["norm.bias"] = sd["fc_norm.weight"], sd["fc_norm.bias"]
    imgs, _ = inputs(model.cfg)
    with torch.no_grad():
        assert (model.encode(imgs) - ref_encode(sd, imgs, heads=4)).abs().max() < TOL


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    victim = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(victim), "w"))  # would create a file if unpickling ran code

    path = tmp_path / "evil.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 8)}, "x": Payload()}, path)
    with pytest.raises(WeightsError, match="refused .*could run code"):
        load(path)
    assert not victim.exists()
    result = CliRunner().invoke(app, ["export", str(path), "--format", "timm", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 1 and "refused" in result.stderr and "Traceback" not in result.output
    assert not victim.exists()


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers


def hf_tiny(**kw):
    import transformers

    base = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
        norm_pix_loss=True,
    )
    base.update(kw)
    return transformers.ViTMAEConfig(**base)


@pytest.mark.parametrize("how", ["save_pretrained", "current_state_dict_names"])
def test_hf_folder_matches_transformers(tmp_path, how):
    ViTMAEForPreTraining = pytest.importorskip("transformers").ViTMAEForPreTraining

    hf = scramble(ViTMAEForPreTraining(hf_tiny())).eval()
    folder = tmp_path / "hf"
    if how == "save_pretrained":
        hf.save_pretrained(folder)
    else:  # transformers 5's module names, as a user's own state_dict() would have them
        folder.mkdir()
        hf.config.to_json_file(folder / "config.json")
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(folder / "model.safetensors"))
    model = load(folder)
    assert model.cfg.norm_eps == 1e-12 and model.cfg.norm_pix_loss and model.cfg.num_heads == 2
    imgs, noise = inputs(model.cfg)
    with torch.no_grad():
        out = hf(imgs, noise=noise)
        hidden = hf.vit(imgs, noise=noise).last_hidden_state
        loss, pred, mask = model(imgs, 0.75, noise=noise)
        latent, _, _ = model.forward_encoder(imgs, 0.75, noise=noise)
    assert abs(out.loss - loss) < TOL
    assert (out.logits - pred).abs().max() < TOL
    assert (hidden - latent).abs().max() < TOL
    assert torch.equal(out.mask, mask)


def test_export_hf_loads_in_transformers_and_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    ViTMAEForPreTraining, ViTMAEModel = transformers.ViTMAEForPreTraining, transformers.ViTMAEModel

    model = scramble(MAE(tiny_cfg(decoder_depth=2))).eval()
    export_hf(model, tmp_path / "hf", mask_ratio=0.75)
    hf, info = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    imgs, noise = inputs(model.cfg)
    with torch.no_grad():
        out = hf.eval()(imgs, noise=noise)
        loss, pred, _ = model(imgs, 0.75, noise=noise)
        latent, _, _ = model.forward_encoder(imgs, 0.75, noise=noise)
        hidden = hf.vit(imgs, noise=noise).last_hidden_state
    assert abs(out.loss - loss) < TOL and (out.logits - pred).abs().max() < TOL
    assert (hidden - latent).abs().max() < TOL
    back = load(tmp_path / "hf")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())

    # encoder only -> ViTMAEModel; with mask_ratio 0 and increasing noise nothing is hidden or shuffled,
    # which is maecli's encode
    encoder = scramble(MAE(tiny_cfg(), decoder=False), seed=3).eval()
    export_hf(encoder, tmp_path / "enc", mask_ratio=0.0)
    vit, info = ViTMAEModel.from_pretrained(tmp_path / "enc", output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        order = torch.arange(encoder.cfg.num_patches, dtype=torch.float32).expand(2, -1)
        hidden = vit.eval()(imgs, noise=order).last_hidden_state
        assert (hidden - encoder.encode(imgs)).abs().max() < TOL
    assert not load(tmp_path / "enc").has_decoder


# ----------------------------------------------------------------------------------------------
# The model card an hf export carries to the Hub


def card_metadata(text: str) -> dict:
    """The YAML block at the top of a README.md, as the Hub reads it."""
    yaml = pytest.importorskip("yaml")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def fake_run(run, config: dict, metrics: list[dict], state: dict | None = None, model: MAE | None = None):
    """A run folder as pretrain and finetune leave one: config.json, model.safetensors, metrics.jsonl, a checkpoint."""
    import json

    from maecli.weights import save_weights

    run.mkdir()
    model = model or MAE(tiny_cfg())
    (run / "config.json").write_text(json.dumps({"model": model.cfg.to_dict(), **config}))
    save_weights(model, run / "model.safetensors")
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))
    if state is not None:
        (run / "checkpoints" / "step-00000100").mkdir(parents=True)
        (run / "checkpoints" / "step-00000100" / "state.json").write_text(json.dumps(state))
    return run


def test_hf_export_card_of_a_pretrain_run(tmp_path):
    from maecli.export import export

    train = dict(data="/secret/photos", probe="/secret/probe", mask=0.6, epochs=800, steps=None, batch_size=8)
    train.update(accum_iter=2, blr=1.5e-4, lr=None, warmup_epochs=40, weight_decay=0.05, seed=3, init_from=None)
    rows = [
        {"step": 50, "epoch": 0.5, "loss": 0.9},
        {"step": 100, "epoch": 1.0, "loss": 0.8},
        {"step": 100, "epoch": 1, "knn_top1": 0.42},
    ]
    state = {"step": 100, "images": 1234, "total_steps": 200, "processes": 2}
    run = fake_run(tmp_path / "run", {"train": train}, rows, state)
    export(run, tmp_path / "hf", "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    meta = card_metadata(card)
    assert meta["tags"] == ["mae", "masked-autoencoder", "vision", "maecli"]
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-feature-extraction"
    assert "license" not in meta and "\n# license:" in card  # the user's to choose
    assert "datasets" not in meta and "/secret" not in card  # image counts, never paths
    assert "on 1,234 images for 100 steps of 200 (1 epochs)" in card
    assert "| mask ratio | 0.6 |" in card and "| batch | 8 per step, 32 effective |" in card
    assert "| learning rate | 1.87e-05 (0.00015 x 32 / 256) |" in card and "| epochs | 800 |" in card
    assert "kNN top-1 on the run's probe folder, at the end: 42.0%" in card
    assert 'maecli.load("hf-hub:YOU/NAME")' in card and 'ViTMAEForPreTraining.from_pretrained("YOU/NAME")' in card
    assert "arXiv:2111.06377" in card and "Masked Autoencoders Are Scalable Vision Learners" in card


def test_hf_export_card_of_a_finetune_run(tmp_path):
    import json

    from maecli.export import export

    finetune = dict(data="/secret/labelled", weights="hf-hub:you/mae", fraction=0.1, epochs=50, steps=None)
    finetune.update(batch_size=16, accum_iter=1, blr=1e-3, lr=None, layer_decay=0.75, seed=0)
    config = {
        "classes": ["a", "b", "c"],
        "classifier": {"num_classes": 3, "pool": "mean"},
        "finetune": finetune,
        "data": {"layout": "folders", "train_images": 300, "val_images": 60},
    }
    rows = [{"step": 90, "epoch": 2.0, "loss": 1.1}, {"step": 90, "epoch": 2, "val_top1": 0.7}]
    run = fake_run(tmp_path / "run", config, rows, model=MAE(tiny_cfg(), decoder=False))
    per_class = [{"class": c, "correct": k, "images": 20} for c, k in zip("abc", (10, 15, 20))]
    (run / "per_class.json").write_text(json.dumps({"best_epoch": 7, "classes": per_class}))
    export(run, tmp_path / "hf", "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card_metadata(card)["tags"][-1] == "maecli"
    assert "on 300 training images, 60 validation images, 3 classes for 90 steps (2 epochs)" in card
    assert "validation top-1 at the end: 70.0%" in card
    assert "validation top-1 at the best epoch (7): 75.0%" in card
    assert "| labels used | 10% of each class |" in card and "| started from | `hf-hub:you/mae` |" in card
    assert "mask ratio" not in card and "ViTMAEModel.from_pretrained" in card and "/secret" not in card


def test_hf_export_card_of_plain_weights(tmp_path):
    from maecli.export import export

    torch.save({"model": release_state(192, 1)}, tmp_path / "mae_pretrain.pth")  # 192 wide: vit-tiny's 3 heads
    export(tmp_path / "mae_pretrain.pth", tmp_path / "hf", "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card_metadata(card)["library_name"] == "transformers"
    assert "no training record" in card and str(tmp_path) not in card


# ----------------------------------------------------------------------------------------------
# timm


def test_export_timm_loads_strictly_with_the_same_features(tmp_path):
    timm = pytest.importorskip("timm")
    model = scramble(MAE(tiny_cfg())).eval()
    call = export_timm(model, tmp_path / "vit.safetensors")
    vit = eval(re.search(r"timm\.create_model\(.*\)", call).group(0), {"timm": timm})
    import safetensors.torch

    vit.load_state_dict(safetensors.torch.load_file(tmp_path / "vit.safetensors"), strict=True)
    imgs, _ = inputs(model.cfg)
    with torch.no_grad():
        assert (vit.eval().forward_features(imgs) - model.encode(imgs)).abs().max() < TOL
    back = load(tmp_path / "vit.safetensors")  # maecli reads its own timm export back, config from the header
    assert not back.has_decoder and back.cfg == model.cfg


def test_timm_calls_for_the_presets():
    assert timm_create_call(MAEConfig.preset("vit-base")) == "timm.create_model('vit_base_patch16_224', num_classes=0)"
    assert timm_create_call(MAEConfig.preset("vit-huge")) == "timm.create_model('vit_huge_patch14_224', num_classes=0)"
    assert timm_create_call(MAEConfig.preset("vit-tiny", img_size=384)) == (
        "timm.create_model('vit_tiny_patch16_224', num_classes=0, img_size=384)"
    )


def test_vit_base_encoder_fits_timm_vit_base():
    """Strict loading is names and shapes: compare them on the meta device, where building costs nothing."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ours = MAE(MAEConfig.preset("vit-base"), decoder=False).state_dict()
        theirs = timm.create_model("vit_base_patch16_224", num_classes=0).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


# ----------------------------------------------------------------------------------------------
# Another input size


def test_other_input_size_recomputes_sincos_and_interpolates_learned(tmp_path):
    model = scramble(MAE(tiny_cfg())).eval()
    path = tmp_path / "model.safetensors"
    from maecli.weights import save_weights

    save_weights(model, path)
    with pytest.warns(UserWarning, match="4x4 to 6x6 patches .sin-cos recomputed"):
        big = load(path, img_size=48)
    assert torch.allclose(big.pos_embed[0], sincos_pos_embed(32, 6))
    assert big.encode(torch.randn(1, 3, 48, 48)).shape == (1, 37, 32)

    sd = release_state(32, 1)
    sd["pos_embed"] = torch.randn(1, 17, 32)  # learned, as in supervised ViTs
    torch.save(sd, tmp_path / "learned.pth")
    with pytest.warns(UserWarning, match="learned, interpolated"):
        big = load(tmp_path / "learned.pth", num_heads=2, img_size=48)
    assert torch.equal(big.pos_embed[:, 0], sd["pos_embed"][:, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = load(tmp_path / "learned.pth", num_heads=2, img_size=32)  # same size: untouched, no warning
    assert torch.equal(same.pos_embed, sd["pos_embed"])
    with pytest.raises(UsageError, match="not divisible by patch size"):
        load(path, img_size=50)


# ----------------------------------------------------------------------------------------------
# The command line


def test_cli_export_both_formats(tiny_run, tmp_path):
    runner = CliRunner()
    out = tmp_path / "vit.safetensors"
    result = runner.invoke(app, ["export", str(tiny_run), "--format", "timm", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out) and "timm.create_model('vit_base_patch16_224'" in result.stderr
    assert not load(out).has_decoder

    result = runner.invoke(app, ["export", str(tiny_run), "--format", "timm", str(out)])
    assert result.exit_code == 1 and "--overwrite" in result.stderr

    result = runner.invoke(app, ["export", str(tiny_run), "--format", "hf", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert "ViTMAEForPreTraining.from_pretrained" in result.stderr
    original, back = load(tiny_run), load(tmp_path / "hf")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in original.state_dict().items())
    assert back.cfg.norm_pix_loss == original.cfg.norm_pix_loss


def test_export_never_writes_into_what_it_reads(tmp_path, tiny_run):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for source, out, fmt in (
        (run, run, "hf"),  # is the input
        (run, run / "hf", "hf"),  # lies inside the run
        (run / "model.safetensors", run, "hf"),  # holds the weights file
        (run / "model.safetensors", run / "model.safetensors", "timm"),
        (run / "checkpoints", run, "hf"),  # holds the folder read
    ):
        r = CliRunner().invoke(app, ["export", str(source), str(out), "--format", fmt, "--overwrite"])
        assert r.exit_code == 2 and "choose an OUT outside it" in r.stderr, (source, out, r.output)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("content", [b"not weights at all" * 10, b"\x80\x02" + bytes(range(256)), b""])
def test_cli_unreadable_weights_are_one_clear_line(tmp_path, content):
    for name in ("junk.pth", "junk.safetensors"):
        path = tmp_path / name
        path.write_bytes(content)
        result = CliRunner().invoke(app, ["export", str(path), "--format", "hf", str(tmp_path / "out")])
        assert result.exit_code == 1
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.output


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    from maecli.weights import save_weights

    save_weights(MAE(tiny_cfg()), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load(tmp_path / "cut.safetensors")
    torch.save({"model": release_state(32, 1)}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupted"):
        load(tmp_path / "cut.pth")


def test_pretrain_init_from_release_encoder(tmp_path, photo_dir):
    from conftest import TINY

    sd = release_state(32, 2)
    torch.save({"model": sd}, tmp_path / "mae_pretrain.pth")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            str(photo_dir),
            "--out",
            str(out),
            "--steps",
            "1",
            "--lr",
            "0",
            "--weight-decay",
            "0",
            "--init-from",
            str(tmp_path / "mae_pretrain.pth"),
            *TINY,
        ],
    )
    assert result.exit_code == 0, result.output
    trained = load(out).state_dict()
    assert all(torch.equal(trained[k], v) for k, v in sd.items())  # lr 0: the encoder is exactly the release's


def test_export_hf_of_a_6_band_run_loads_in_transformers_with_its_statistics(tmp_path):
    """A 6-band TIFF run exported through the CLI: transformers loads it with num_channels 6, strictly, as
    ViTMAEForPreTraining (and its encoder, by way of a timm export, as ViTMAEModel) with maecli's features and loss;
    maecli reads the data's statistics back."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tifffile")
    from conftest import TINY, invoke
    from scientific import write_six_band_folder

    write_six_band_folder(tmp_path / "t", n=4)
    r = invoke("pretrain", tmp_path / "t", "--out", tmp_path / "run", "--steps", "2", "--previews", "0", *TINY)
    assert r.exit_code == 0, r.output
    for source, out in (
        (tmp_path / "run", "hf"),
        (tmp_path / "run", "enc.safetensors"),
        (tmp_path / "enc.safetensors", "enc"),
    ):
        r = invoke("export", source, tmp_path / out, "--format", "timm" if out.endswith(".safetensors") else "hf")
        assert r.exit_code == 0, r.output
    model = load(tmp_path / "run").eval()
    imgs, noise = inputs(model.cfg)
    with torch.no_grad():
        loss, pred, _ = model(imgs, 0.75, noise=noise)
        latent, _, _ = model.forward_encoder(imgs, 0.75, noise=noise)
    for cls, folder in ((transformers.ViTMAEForPreTraining, "hf"), (transformers.ViTMAEModel, "enc")):
        hf, info = cls.from_pretrained(tmp_path / folder, output_loading_info=True)
        assert not any(info.values()), (cls, info)  # nothing missing, unexpected or mismatched
        assert hf.config.num_channels == 6
        vit = hf.vit if cls is transformers.ViTMAEForPreTraining else hf
        with torch.no_grad():
            assert (vit.eval()(imgs, noise=noise).last_hidden_state - latent).abs().max() < TOL
            if vit is not hf:
                out = hf.eval()(imgs, noise=noise)
                assert abs(out.loss - loss) < TOL and (out.logits - pred).abs().max() < TOL
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "Every band, in the files' own units" in card and f"| 6 | {model.cfg.mean[5]:.6g} |" in card
    hf.save_pretrained(tmp_path / "resaved")  # transformers keeps the statistics in the config it writes
    for folder in ("hf", "enc", "resaved"):
        back = load(tmp_path / folder)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
        assert (back.cfg.mean, back.cfg.std, back.cfg.units) == (model.cfg.mean, model.cfg.std, model.cfg.units)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["maecli_pixels"]["mean"] = [1.0, 2.0]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="maecli_pixels does not fit the model .mean has 2 values for 6 channels"):
        load(tmp_path / "hf")
