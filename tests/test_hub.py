"""Published weights by name (hf-hub:ORG/NAME[@REVISION]), read through huggingface_hub from a cache laid out as it
lays one out: the Hub itself is never reached (HF_HUB_OFFLINE=1), so what is tested is the real download path's
cache lookup, each kind of repository, revisions, and the one-line errors."""

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from maecli.errors import EncoderOnlyError, WeightsError
from maecli.export import encoder_state, export_hf
from maecli.formats import to_hf
from maecli.hub import parse_hub_id
from maecli.model import MAE, MAEConfig
from maecli.reconstruct import reconstruct
from maecli.weights import load, state_dict_for_saving

COMMIT_A = "a" * 40
COMMIT_B = "0123456789abcdef0123456789abcdef01234567"


def tiny_cfg(**kw):
    base = dict(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2
    )
    return MAEConfig(**{**base, **kw})


def tiny_mae(seed=0, decoder=True, **kw):
    torch.manual_seed(seed)
    return MAE(tiny_cfg(**kw), decoder=decoder).eval()


def same_weights(a: MAE, b: MAE) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(v, sb[k]) for k, v in sa.items())


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache under tmp_path, offline. huggingface_hub reads these settings when it is imported, so its
    constants are patched as well as the environment."""
    constants = pytest.importorskip("huggingface_hub").constants
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def publish(cache: Path, repo: str, folder: Path, commit: str = COMMIT_A, refs=("main",)) -> None:
    """Put the files of `folder` in the cache as huggingface_hub stores a download of `repo` at `commit`:
    models--ORG--NAME/blobs/<hash>, snapshots/<commit>/<name> (a relative link to the blob), refs/<ref>."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(Path(folder).iterdir()):
        if not file.is_file():
            continue  # what a download would bring are the files, not a run's checkpoints/
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (root / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.join("..", "..", "blobs", blob))
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)


def timm_folder(model: MAE, folder: Path) -> Path:
    """What timm's push_to_hub uploads for an MAE encoder: config.json + model.safetensors, built by timm itself."""
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    cfg = model.cfg
    vit = timm.create_model(
        "vit_base_patch16_224.mae",
        pretrained=False,
        num_classes=0,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
    )
    vit.load_state_dict(encoder_state(model), strict=True)
    save_for_hf(vit, str(folder), safe_serialization=True)
    return folder


# ----------------------------------------------------------------------------------------------
# The three kinds of repository


def test_transformers_vitmae_with_decoder_reconstructs(hub_cache, tmp_path):
    model = tiny_mae()
    export_hf(model, tmp_path / "vit-mae-tiny")  # config.json + model.safetensors in the Hub's ViTMAE layout
    publish(hub_cache, "facebook/vit-mae-tiny", tmp_path / "vit-mae-tiny")
    loaded = load("hf-hub:facebook/vit-mae-tiny")
    assert loaded.has_decoder and same_weights(model, loaded)
    assert loaded.cfg.norm_eps == model.cfg.norm_eps  # from the repository's config.json, not a default
    rec = reconstruct(loaded, torch.randn(1, 3, 32, 32), mask_ratio=0.75)
    assert rec.hidden[0] == 12


def test_transformers_pytorch_model_bin_through_weights_only_loading(hub_cache, tmp_path):
    """Older Hub repositories (facebook/vit-mae-*) hold pytorch_model.bin on main; it is read only with
    torch.load(weights_only=True)."""
    model = tiny_mae(seed=1)
    export_hf(model, tmp_path / "hf")
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(tmp_path / "hf" / "config.json", folder)
    torch.save(to_hf(state_dict_for_saving(model), encoder_only=False), folder / "pytorch_model.bin")
    publish(hub_cache, "facebook/vit-mae-bin", folder)
    assert same_weights(model, load("hf-hub:facebook/vit-mae-bin"))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"vit.embeddings.cls_token": torch.zeros(1), "x": Evil()}, folder / "pytorch_model.bin")
    publish(hub_cache, "facebook/vit-mae-evil", folder)
    with pytest.raises(WeightsError, match="refused .*which could run code"):
        load("hf-hub:facebook/vit-mae-evil")


def test_transformers_save_pretrained_repository(hub_cache, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTMAEConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
    )
    hf = transformers.ViTMAEForPreTraining(config).eval()
    hf.save_pretrained(tmp_path / "saved")
    publish(hub_cache, "someone/vit-mae-saved", tmp_path / "saved")
    model = load("hf-hub:someone/vit-mae-saved")
    assert model.has_decoder and model.cfg.norm_eps == 1e-12
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        assert (hf(images, noise=noise).logits - model(images, 0.75, noise=noise)[1]).abs().max() < 1e-4


def test_timm_mae_encoder_loads_without_a_decoder(hub_cache, tmp_path):
    model = tiny_mae(seed=2)
    folder = timm_folder(model, tmp_path / "timm")
    publish(hub_cache, "timm/vit_tiny_patch8_32.mae", folder)
    loaded = load("hf-hub:timm/vit_tiny_patch8_32.mae")  # heads from the config's model_args: 32 wide is no preset
    assert not loaded.has_decoder
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.encode(images), model.encode(images), atol=1e-6)
    with pytest.raises(EncoderOnlyError, match="reconstruction needs the decoder"):
        reconstruct(loaded, images)


def test_timm_repository_of_another_architecture_is_named(hub_cache, tmp_path):
    folder = timm_folder(tiny_mae(), tmp_path / "timm")
    text = (folder / "config.json").read_text().replace('"vit_base_patch16_224"', '"resnet50"')
    (folder / "config.json").write_text(text)
    publish(hub_cache, "timm/resnet50.a1_in1k", folder)
    with pytest.raises(WeightsError, match="is a timm 'resnet50' model, not a Vision Transformer"):
        load("hf-hub:timm/resnet50.a1_in1k")


def test_maecli_export_and_run_folder_uploaded(hub_cache, tmp_path, tiny_run, photo_dir):
    from conftest import invoke

    result = invoke("export", tiny_run, "--format", "hf", tmp_path / "export")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "export" / "README.md").read_text()  # the model card travels with the upload
    assert "Pretrained with `maecli pretrain` on 8 images for 4 steps" in card and str(photo_dir) not in card
    publish(hub_cache, "you/mae-export", tmp_path / "export")
    publish(hub_cache, "you/mae-run", tiny_run)  # the run folder as is: config.json, model.safetensors, metrics
    original = load(tiny_run)
    for repo in ("you/mae-export", "you/mae-run"):
        loaded = load(f"hf-hub:{repo}")
        assert loaded.has_decoder and same_weights(original, loaded) and loaded.cfg == original.cfg, repo


def test_export_from_the_hub(hub_cache, tmp_path):
    from maecli.export import export

    model = tiny_mae(seed=6)
    export_hf(model, tmp_path / "mae")
    publish(hub_cache, "facebook/vit-mae-tiny", tmp_path / "mae")
    export("hf-hub:facebook/vit-mae-tiny", tmp_path / "vit.safetensors", "timm")
    encoder = load(tmp_path / "vit.safetensors")
    assert not encoder.has_decoder
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in encoder.state_dict().items())
    export("hf-hub:facebook/vit-mae-tiny", tmp_path / "again", "hf")
    assert same_weights(model, load(tmp_path / "again"))
    card = (tmp_path / "again" / "README.md").read_text()
    assert "Converted by `maecli export` from `hf-hub:facebook/vit-mae-tiny`" in card


# ----------------------------------------------------------------------------------------------
# Revisions, and what cannot be fetched


def test_revision_pins_a_snapshot(hub_cache, tmp_path):
    old, new = tiny_mae(seed=3), tiny_mae(seed=4)
    export_hf(old, tmp_path / "old")
    export_hf(new, tmp_path / "new")
    publish(hub_cache, "you/mae", tmp_path / "old", commit=COMMIT_A, refs=("v1",))
    publish(hub_cache, "you/mae", tmp_path / "new", commit=COMMIT_B, refs=("main",))
    assert same_weights(new, load("hf-hub:you/mae"))
    assert same_weights(old, load(f"hf-hub:you/mae@{COMMIT_A}"))
    assert same_weights(old, load("hf-hub:you/mae@v1"))
    assert same_weights(new, load("hf-hub:you/mae@main"))
    with pytest.raises(WeightsError, match="hf-hub:you/mae@v2: HF_HUB_OFFLINE is set and it is not in the cache"):
        load("hf-hub:you/mae@v2")


def test_unknown_id_offline_is_one_line(hub_cache):
    with pytest.raises(WeightsError) as e:
        load("hf-hub:facebook/vit-mae-base")
    message = str(e.value)
    assert message.startswith("cannot fetch hf-hub:facebook/vit-mae-base: HF_HUB_OFFLINE is set")
    assert str(hub_cache) in message and "\n" not in message


def test_repository_without_weights(hub_cache, tmp_path):
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "config.json").write_text("{}")
    publish(hub_cache, "you/no-weights", tmp_path / "cards")
    with pytest.raises(WeightsError, match="cannot fetch hf-hub:you/no-weights"):
        load("hf-hub:you/no-weights")  # offline, a missing file may just not be cached: the same advice


def test_no_network_names_the_cache(hub_cache, monkeypatch):
    """Online, with the Hub unreachable (a closed local port stands in for it): the same one line."""
    constants = pytest.importorskip("huggingface_hub").constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    import importlib

    http = importlib.import_module("huggingface_hub.utils._http")
    if hasattr(http, "time"):  # its retries wait 1, 2, 4, 8, 8 s: the test needs only their outcome
        monkeypatch.setattr(http.time, "sleep", lambda seconds: None)
    with pytest.raises(WeightsError, match=r"cannot fetch hf-hub:you/mae: no network and not in the cache \("):
        load("hf-hub:you/mae")


@pytest.mark.parametrize("bad", ["hf-hub:", "hf-hub:vit-mae-base", "hf-hub:a/b/c", "hf-hub:a/b@", "hf-hub:a/b@c@d"])
def test_malformed_ids(bad):
    with pytest.raises(WeightsError, match="is not a Hub id; expected hf-hub:ORG/NAME"):
        parse_hub_id(bad)


def test_parse_hub_id():
    assert parse_hub_id("hf-hub:timm/vit_base_patch16_224.mae") == ("timm/vit_base_patch16_224.mae", None)
    assert parse_hub_id("hf-hub:facebook/vit-mae-base@refs/pr/3") == ("facebook/vit-mae-base", "refs/pr/3")


# ----------------------------------------------------------------------------------------------
# The command line


def test_cli_reconstruct_and_embed_from_the_hub(hub_cache, tmp_path, photo_dir):
    from conftest import invoke

    export_hf(tiny_mae(), tmp_path / "mae")
    publish(hub_cache, "you/mae", tmp_path / "mae")
    image = next(photo_dir.rglob("*.jpg"))
    result = invoke("reconstruct", image, "-w", "hf-hub:you/mae", "-o", tmp_path / "rec.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rec.png").stat().st_size > 0
    result = invoke("embed", image, "-w", "hf-hub:you/mae")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1

    result = invoke("info", "hf-hub:you/mae", "--json")
    assert result.exit_code == 0 and '"kind": "weights"' in result.stdout, result.output
    for command in (["predict", image], ["export", "hf-hub:you/mae", tmp_path / "x", "-f", "hf"]):
        result = invoke(*command[:1], *command[1:], *([] if command[0] == "export" else ["-w", "hf-hub:you/mae"]))
        assert "not found" not in result.stderr and "does not exist" not in result.stderr, result.output
    result = invoke("embed", image, "-w", "hf-hub:you/unknown")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot fetch hf-hub:you/unknown: HF_HUB_OFFLINE is set")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_cli_pretrain_init_from_the_hub(hub_cache, tmp_path, photo_dir):
    from conftest import TINY, invoke

    published = tiny_mae(seed=5)
    export_hf(published, tmp_path / "mae")
    publish(hub_cache, "you/mae", tmp_path / "mae")
    out = tmp_path / "run"
    result = invoke(
        "pretrain", photo_dir, "--out", out, "--steps", "1", "--lr", "0", "--weight-decay", "0", *TINY,
        "--init-from", "hf-hub:you/mae",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert same_weights(published, load(out))  # lr 0: exactly the published weights


def test_cli_export_from_the_hub(hub_cache, tmp_path):
    from conftest import invoke

    export_hf(tiny_mae(), tmp_path / "mae")
    publish(hub_cache, "you/mae", tmp_path / "mae")
    result = invoke("export", "hf-hub:you/mae", "--format", "timm", tmp_path / "vit.safetensors")
    assert result.exit_code == 0, result.output


def test_published_folder_needs_no_copying(hub_cache, tmp_path):
    """The weights are read where the cache keeps them (a snapshot's links into blobs/), not copied elsewhere."""
    export_hf(tiny_mae(), tmp_path / "mae")
    publish(hub_cache, "you/mae", tmp_path / "mae")
    from maecli.weights import resolve

    weights, config = resolve("hf-hub:you/mae")
    assert weights.is_symlink() and hub_cache in weights.parents
    assert config == weights.parent / "config.json"
    shutil.rmtree(tmp_path / "mae")
    assert load("hf-hub:you/mae").has_decoder
