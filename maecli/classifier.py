"""The fine-tuned classifier: timm's VisionTransformer over an MAE encoder's weights, plus a linear head.

timm's parameter names are maecli's (`patch_embed.proj`, `blocks.N.attn.qkv`, `cls_token`, `pos_embed`), so the
encoder loads as is, and a saved classifier is a timm state dict that `timm.create_model` loads strictly. Mean
pooling normalizes the pooled tokens with `fc_norm` (timm's and the paper's default) and has no per-token `norm`.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from .errors import WeightsError
from .files import atomic_write
from .model import MAE, MAEConfig

POOLS = {"mean": "avg", "cls": "token"}  # maecli's name -> timm's global_pool
HEAD_KEYS = ("head.weight", "head.bias")


class Classifier(VisionTransformer):
    """A ViT classifier for `cfg`'s encoder: `num_classes` logits from mean-pooled tokens or the cls token."""

    def __init__(self, cfg: MAEConfig, num_classes: int, pool: str = "mean", drop_path: float = 0.0):
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
        super().__init__(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            num_classes=num_classes,
            global_pool=POOLS[pool],
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps),
            drop_path_rate=drop_path,
        )
        self.cfg, self.pooling = cfg, pool  # `cfg` travels in every saved file's header, as an MAE's does

    def set_fused_attention(self, fused: bool) -> None:
        """As MAE.set_fused_attention: the trainer picks the attention kernel once per device and precision."""
        for module in self.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = fused


def from_encoder(encoder: MAE, num_classes: int, pool: str = "mean", drop_path: float = 0.0) -> Classifier:
    """A classifier whose encoder holds `encoder`'s weights and whose head starts near zero (std 2e-5, as the
    release), so the first steps train the head without shaking the encoder. Mean pooling starts a fresh fc_norm
    (the release drops the per-token norm the MAE was pretrained with)."""
    model = Classifier(encoder.cfg, num_classes, pool, drop_path)
    ours = model.state_dict()
    state = {k: v for k, v in encoder.state_dict().items() if k in ours}
    result = model.load_state_dict(state, strict=False)
    fresh = set(HEAD_KEYS) | ({"fc_norm.weight", "fc_norm.bias"} if pool == "mean" else set())
    if set(result.missing_keys) != fresh:
        raise WeightsError(f"the encoder does not fit timm's ViT: missing {sorted(set(result.missing_keys) - fresh)}")
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return model


def save_classifier(model: Classifier, classes: list[str], path: Path) -> None:
    """The classifier as safetensors (timm's names), its MAE config, classes and pool in the header; atomic, and
    the same bytes for the same weights."""
    from safetensors.torch import save_file

    from .weights import sort_metadata, state_dict_for_saving

    meta = {
        "format": "pt",
        "maecli_config": json.dumps(model.cfg.to_dict()),
        "maecli_classifier": json.dumps({"classes": list(classes), "pool": model.pooling}),
    }
    tensors = state_dict_for_saving(model)

    def write(tmp):
        save_file(tensors, tmp, metadata=meta)
        sort_metadata(tmp)

    atomic_write(Path(path), write)


def classifier_info(path: str | os.PathLike) -> dict | None:
    """{"classes", "pool", "config"} of a fine-tuned run or classifier file, from its config.json or its header;
    None for weights without a classifier. Reads no tensors."""
    from safetensors import safe_open

    from .weights import read_config, resolve

    weights, config_path = resolve(path)
    config = read_config(config_path)
    head = config.get("classifier")
    if isinstance(head, dict) and isinstance(config.get("classes"), list) and isinstance(config.get("model"), dict):
        return {"classes": config["classes"], "pool": head.get("pool", "mean"), "config": config["model"]}
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
        info, cfg = json.loads(meta["maecli_classifier"]), json.loads(meta["maecli_config"])
        return {"classes": info["classes"], "pool": info.get("pool", "mean"), "config": cfg}
    except Exception:  # not safetensors, or no classifier in its header: an encoder (or not ours)
        return None


def load_classifier(path: str | os.PathLike) -> tuple[Classifier, list[str]]:
    """(classifier in eval mode, class names in logit order) from a `maecli finetune` run folder or its weights.

    Raises WeightsError for weights without a classifier (a pretrained MAE, say).
    """
    from .weights import read_tensors, resolve

    info = classifier_info(path)
    if info is None:
        raise WeightsError(
            f"{path} holds no classifier (a pretrained encoder?); train one with "
            f"`maecli finetune DATA --weights {path}`"
        )
    weights, _ = resolve(path)
    state, _ = read_tensors(weights)
    classes = [str(c) for c in info["classes"]]
    try:
        cfg = MAEConfig.from_dict(info["config"])
        with torch.device("meta"):  # shapes only: the weights come from the file
            model = Classifier(cfg, len(classes), info["pool"])
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{weights}: invalid classifier config ({e})") from None
    expected = model.state_dict()
    if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
        raise WeightsError(
            f"{weights} does not match its classifier config ({len(classes)} classes, {info['pool']} pool)"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model.eval(), classes
