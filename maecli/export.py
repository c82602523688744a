"""Export: any weights `load` reads, written for timm (the encoder as a ViT state dict) or for Hugging Face
transformers (a ViTMAE folder), each with the Python that loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .classifier import POOLS as CLASSIFIER_POOLS
from .classifier import classifier_info, load_classifier, save_classifier
from .files import atomic_write, write_json
from .formats import hf_config, to_hf
from .model import MAE, MAEConfig
from .presets import PRESETS
from .weights import load, read_config, resolve, state_dict_for_saving


def encoder_state(model: MAE) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict_for_saving(model).items() if not k.startswith(("decoder_", "mask_token"))}


def timm_create_call(cfg: MAEConfig, num_classes: int = 0, global_pool: str | None = None) -> str:
    """The `timm.create_model(...)` call that builds an encoder (or, given classes, a classifier) these weights load
    into with strict=True."""
    dims = (cfg.embed_dim, cfg.depth, cfg.num_heads)
    preset = next((p for p in PRESETS.values() if (p.embed_dim, p.depth, p.num_heads) == dims), PRESETS["vit-base"])
    base = dict(
        embed_dim=preset.embed_dim,
        depth=preset.depth,
        num_heads=preset.num_heads,
        mlp_ratio=4.0,
        patch_size=preset.patch_size,
        img_size=224,
        in_chans=3,
    )
    ours = dict(
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        patch_size=cfg.patch_size,
        img_size=cfg.img_size,
        in_chans=cfg.in_chans,
    )
    kwargs = "".join(f", {k}={v!r}" for k, v in ours.items() if v != base[k])
    pool = f", global_pool={global_pool!r}" if global_pool is not None else ""
    return f"timm.create_model('{preset.timm_name}', num_classes={num_classes}{pool}{kwargs})"


def export_timm(model: MAE, out: Path) -> str:
    """The encoder as a timm ViT state dict in one safetensors file; returns Python that loads it."""
    meta = {"format": "pt", "maecli_config": json.dumps(model.cfg.to_dict())}
    tensors = encoder_state(model)
    atomic_write(Path(out), lambda tmp: save_file(tensors, tmp, metadata=meta))
    lines = [
        "import timm, safetensors.torch",
        f"model = {timm_create_call(model.cfg)}",
        f"model.load_state_dict(safetensors.torch.load_file({str(out)!r}))",
    ]
    if model.cfg.norm_eps != 1e-6:
        lines.append(
            f"# timm's LayerNorm eps is 1e-6; these weights used {model.cfg.norm_eps:g} (a negligible difference)"
        )
    return "\n".join(lines)


def export_hf(model: MAE, out: Path, mask_ratio: float = 0.75) -> str:
    """A transformers folder (config.json + model.safetensors); ViTMAEForPreTraining when the model has a
    decoder, else ViTMAEModel. Returns Python that loads it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoder_only = not model.has_decoder
    config = hf_config(model.cfg, encoder_only=encoder_only, mask_ratio=mask_ratio)
    tensors = to_hf(encoder_state(model) if encoder_only else state_dict_for_saving(model), encoder_only)
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(out / "config.json", config)
    cls = config["architectures"][0]
    return f"from transformers import {cls}\nmodel = {cls}.from_pretrained({str(out)!r})"


def trained_mask_ratio(path) -> float:
    """The mask ratio the weights were trained with where their folder says (maecli run, transformers config)."""
    config = read_config(resolve(path)[1])
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    ratio = train.get("mask", config.get("mask_ratio"))
    return float(ratio) if isinstance(ratio, (int, float)) and 0 < ratio < 1 else 0.75


def export(source, out, fmt: str, *, model_hint: str | None = None) -> str:
    """Load any weights `load` reads and write them for timm or transformers (fmt "timm" or "hf").

    Returns Python that loads the result.
    """
    if fmt == "timm":
        if classifier_info(source) is not None:  # a fine-tuned run: the whole classifier, head included
            return export_timm_classifier(source, out)
    model = load(source, model_hint=model_hint)
    if fmt == "timm":
        return export_timm(model, out)
    if fmt == "hf":
        return export_hf(model, out, mask_ratio=trained_mask_ratio(source))
    raise ValueError(f"unknown export format {fmt!r}; choose timm or hf")


def export_timm_classifier(source, out: Path) -> str:
    """The classifier as a timm state dict in one safetensors file; returns Python that loads it strictly."""
    model, classes = load_classifier(source)
    save_classifier(model, classes, out)
    lines = [
        "import timm, safetensors.torch",
        f"model = {timm_create_call(model.cfg, num_classes=len(classes), global_pool=CLASSIFIER_POOLS[model.pooling])}",
        f"model.load_state_dict(safetensors.torch.load_file({str(out)!r}))",
        f"classes = {classes!r}",
    ]
    if model.cfg.norm_eps != 1e-6:
        lines.append(
            f"# timm's LayerNorm eps is 1e-6; these weights used {model.cfg.norm_eps:g} (a negligible difference)"
        )
    return "\n".join(lines)
