"""Other people's weight layouts, converted to and from maecli's: the original MAE release and timm (maecli's own
parameter names, with extras to drop) and Hugging Face's ViTMAE (query/key/value split, everything renamed).

Pure functions of state dicts and configs: reading files is `weights.py`, writing exports is `export.py`.
Architecture comes from tensor shapes; heads, which shapes cannot tell, from a config, a preset hint, or the widths
of the released sizes.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import replace

import torch
import torch.nn.functional as F

from .errors import WeightsError
from .model import MAEConfig, sincos_pos_embed
from .presets import PRESETS

# The released sizes: width -> heads. Every MAE and timm ViT of these widths uses these heads.
HEADS_BY_WIDTH = {p.embed_dim: p.num_heads for p in PRESETS.values()}
DECODER_HEADS = 16  # the release's decoder heads, for every size

# timm extras that an encoder has no use for: the classifier head and what feeds it.
TIMM_EXTRAS = ("head.", "head_drop.", "pre_logits.")

# ----------------------------------------------------------------------------------------------
# Original release and timm (maecli's own names)


def _count_blocks(state: dict, prefix: str, source: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    if ids != set(range(len(ids))):
        raise WeightsError(f"{source}: {prefix} are numbered {sorted(ids)}, expected 0..{len(ids) - 1}")
    return len(ids)


def clean_original(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """An original-release or timm state dict -> maecli's encoder (+ decoder) names, extras dropped.

    Fine-tuned checkpoints pool tokens and normalize with `fc_norm` instead of `norm`; that norm becomes
    the per-token `norm` here, close to but not the same as what those models computed.
    """
    state = {k: v for k, v in state.items() if not k.startswith(TIMM_EXTRAS)}
    fc_norm = {k: state.pop(k) for k in list(state) if k.startswith("fc_norm.")}
    if fc_norm and "norm.weight" not in state:
        warnings.warn(f"{source} normalizes pooled features (fc_norm); maecli applies that norm to every token")
        state.update({"norm." + k.split(".", 1)[1]: v for k, v in fc_norm.items()})
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3 and _is_square(pos.shape[1]) and not _is_square(pos.shape[1] - 1):
        # timm's no_embed_class layout: no row for the cls token, which is the same as a zero row.
        state["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    return state


def timm_heads(timm_config: dict, source: str) -> int | None:
    """The heads a timm config.json records ({"architecture": "vit_...", "model_args": {"num_heads": ...}}), or None
    where it does not (timm's own MAE encoders are released sizes, whose widths say their heads)."""
    arch = timm_config.get("architecture")
    if not isinstance(arch, str) or not arch.startswith(("vit_", "vision_transformer")):
        raise WeightsError(
            f"{source} is a timm {arch!r} model, not a Vision Transformer; maecli reads timm's vit_* models"
        )
    args = timm_config.get("model_args")
    heads = args.get("num_heads") if isinstance(args, dict) else None
    if heads is not None and (not isinstance(heads, int) or isinstance(heads, bool) or heads < 1):
        raise WeightsError(f"{source}: config model_args.num_heads is {heads!r}, expected a positive whole number")
    return heads


def _is_square(n: int) -> bool:
    return n > 0 and int(n**0.5) ** 2 == n


def infer_config(
    state: dict[str, torch.Tensor],
    source: str,
    *,
    num_heads: int | None = None,
    model_hint: str | None = None,
    decoder_heads: int | None = None,
    norm_eps: float = 1e-6,
    norm_pix_loss: bool = False,
) -> MAEConfig:
    """The MAEConfig that a maecli-named state dict was built for, read from its tensor shapes.

    `norm_pix_loss` defaults to the release's default (off): weights do not record how they were trained.
    """
    proj = state.get("patch_embed.proj.weight")
    pos = state.get("pos_embed")
    if proj is None or pos is None or proj.ndim != 4 or pos.ndim != 3:
        raise WeightsError(f"{source} does not look like ViT or MAE weights (no patch embedding or position embedding)")
    dim, in_chans, p, p2 = proj.shape
    if p != p2:
        raise WeightsError(f"{source}: patches of {p}x{p2} pixels are not square; maecli needs square patches")
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    if grid * grid != pos.shape[1] - 1:
        raise WeightsError(f"{source}: {pos.shape[1] - 1} position embeddings do not form a square grid")
    depth = _count_blocks(state, "blocks", source)
    if depth == 0:
        raise WeightsError(f"{source} holds no transformer blocks (blocks.0...)")
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
    heads = _heads(dim, num_heads, model_hint, source)
    kwargs = dict(
        img_size=grid * p,
        patch_size=p,
        in_chans=in_chans,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        norm_eps=norm_eps,
        norm_pix_loss=norm_pix_loss,
    )
    if "decoder_embed.weight" in state:
        decoder_dim = state["decoder_embed.weight"].shape[0]
        decoder_depth = _count_blocks(state, "decoder_blocks", source)
        fc1 = state.get("decoder_blocks.0.mlp.fc1.weight")
        if fc1 is not None and fc1.shape[0] != round(decoder_dim * mlp_ratio):
            raise WeightsError(
                f"{source}: the decoder's MLP ratio ({fc1.shape[0] / decoder_dim:g}) differs from the encoder's "
                f"({mlp_ratio:g}); maecli uses one ratio for both"
            )
        decoder_heads = decoder_heads or DECODER_HEADS
        if decoder_dim % decoder_heads:
            raise WeightsError(f"{source}: decoder width {decoder_dim} is not divisible by {decoder_heads} heads")
        kwargs.update(decoder_dim=decoder_dim, decoder_depth=decoder_depth, decoder_heads=decoder_heads)
    try:
        return MAEConfig(**kwargs)
    except ValueError as e:
        raise WeightsError(f"{source}: {e}") from None


def _heads(dim: int, num_heads: int | None, model_hint: str | None, source: str) -> int:
    if num_heads is None and model_hint is not None:
        if model_hint not in PRESETS:
            raise WeightsError(f"unknown model {model_hint!r}; choose one of {', '.join(PRESETS)}")
        hint_dim, num_heads = PRESETS[model_hint].embed_dim, PRESETS[model_hint].num_heads
        if hint_dim != dim:
            raise WeightsError(f"--model {model_hint} is {hint_dim} wide, but {source} is {dim} wide")
    if num_heads is None:
        num_heads = HEADS_BY_WIDTH.get(dim)
    if num_heads is None:
        raise WeightsError(
            f"{source} is {dim} wide, not a released size, so its number of attention heads is unknown; "
            f"give it (num_heads=... in Python)"
        )
    if dim % num_heads:
        raise WeightsError(f"{num_heads} heads do not divide the width {dim} of {source}")
    return num_heads


# ----------------------------------------------------------------------------------------------
# Hugging Face ViTMAE

# maecli block part -> Hugging Face's name, as transformers 4 and the Hub checkpoints write them.
HF_BLOCK_NAMES = {
    "q": "attention.attention.query",
    "k": "attention.attention.key",
    "v": "attention.attention.value",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
}
# transformers 5 names its modules differently; accept those too.
HF_BLOCK_ALIASES = {
    **{hf: ours for ours, hf in HF_BLOCK_NAMES.items()},
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
HF_TOP_NAMES = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj": "vit.embeddings.patch_embeddings.projection",
    "norm": "vit.layernorm",
    "decoder_embed": "decoder.decoder_embed",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm": "decoder.decoder_norm",
    "decoder_pred": "decoder.decoder_pred",
}
# Encoder layers: `vit.encoder.layer.N` (Hub), `vit.layers.N` (transformers 5); no `vit.` in a bare ViTMAEModel.
# Decoder layers: `decoder.decoder_layers.N`, which transformers 5.x saves as `decoder.decoder_encoder.layer.N`.
_HF_ENCODER_LAYER = re.compile(r"^(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_HF_DECODER_LAYER = re.compile(r"^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)$")
HF_IGNORED = ("pooler.", "vit.pooler.", "classifier.")  # plain ViT checkpoints' classification parts


def is_hf_layout(state: dict) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in state)


def from_hf(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A Hugging Face ViTMAE (or ViT) state dict -> maecli names, query/key/value fused into qkv."""
    ours: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (block prefix, weight|bias) -> {q, k, v}
    top = {hf: name for name, hf in HF_TOP_NAMES.items()}
    for key, value in state.items():
        if key.startswith(HF_IGNORED):
            continue
        m = _HF_ENCODER_LAYER.match(key) or _HF_DECODER_LAYER.match(key)
        if m:
            prefix = f"{'blocks' if m.re is _HF_ENCODER_LAYER else 'decoder_blocks'}.{m.group(1)}"
            part = HF_BLOCK_ALIASES.get(m.group(2))
            if part is None:
                raise WeightsError(f"{source}: unexpected tensor {key} for a Hugging Face ViTMAE")
            if part in ("q", "k", "v"):
                qkv.setdefault((prefix, m.group(3)), {})[part] = value
            else:
                ours[f"{prefix}.{part}.{m.group(3)}"] = value
            continue
        name = _hf_top_name(key, top)
        if name is None:
            raise WeightsError(f"{source}: unexpected tensor {key} for a Hugging Face ViTMAE")
        ours[name] = value
    _fuse_qkv(ours, qkv, source)
    return ours


def _hf_top_name(key: str, top: dict[str, str]) -> str | None:
    """The maecli name of a Hugging Face tensor outside the blocks (`top` maps Hub names to ours), or None."""
    base, _, leaf = key.rpartition(".")
    name = top.get(key) or top.get("vit." + key)  # tokens and position embeddings have no .weight
    if name is None and leaf in ("weight", "bias"):
        name = top.get(base) or top.get("vit." + base)
        name = name and f"{name}.{leaf}"
    return name


def _fuse_qkv(ours: dict[str, torch.Tensor], qkv: dict[tuple[str, str], dict[str, torch.Tensor]], source: str) -> None:
    """Add to `ours` each block's query, key and value joined into one qkv tensor, and zeros for a missing bias."""
    for (prefix, leaf), parts in qkv.items():
        if leaf == "bias" and len(parts) < 3:
            continue  # qkv_bias=False in the config; filled with zeros below
        if set(parts) != {"q", "k", "v"}:
            raise WeightsError(f"{source}: {prefix} lacks part of its query/key/value {leaf}")
        ours[f"{prefix}.attn.qkv.{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    for prefix, leaf in qkv:
        if leaf == "weight" and f"{prefix}.attn.qkv.bias" not in ours:
            w = ours[f"{prefix}.attn.qkv.weight"]
            ours[f"{prefix}.attn.qkv.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)


def hf_settings(hf_config: dict, source: str) -> dict:
    """What a Hugging Face config says that the tensors cannot: heads, LayerNorm eps, the loss target."""
    if hf_config.get("hidden_act", "gelu") != "gelu":
        raise WeightsError(
            f"{source}: activation {hf_config['hidden_act']!r} is not supported (maecli's ViT uses gelu)"
        )
    for key in ("image_size", "patch_size"):
        size = hf_config.get(key)
        if isinstance(size, (list, tuple)) and len(set(size)) != 1:
            raise WeightsError(f"{source}: {key} {size} is not square; maecli needs square images and patches")
    settings = dict(
        num_heads=hf_config.get("num_attention_heads"),
        decoder_heads=hf_config.get("decoder_num_attention_heads"),
        norm_eps=hf_config.get("layer_norm_eps", 1e-12),
        norm_pix_loss=hf_config.get("norm_pix_loss", False),
    )
    # a value of the wrong kind would quietly become another model (eps "1e-6" as text, heads 0, loss "yes")
    for key, name in (("num_heads", "num_attention_heads"), ("decoder_heads", "decoder_num_attention_heads")):
        heads = settings[key]
        if heads is not None and (not isinstance(heads, int) or isinstance(heads, bool) or heads < 1):
            raise WeightsError(f"{source}: config {name} is {heads!r}, expected a positive whole number")
    eps = settings["norm_eps"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        raise WeightsError(f"{source}: config layer_norm_eps is {eps!r}, expected a small positive number")
    if not isinstance(settings["norm_pix_loss"], bool):
        raise WeightsError(f"{source}: config norm_pix_loss is {settings['norm_pix_loss']!r}, expected true or false")
    return settings


def to_hf(state: dict[str, torch.Tensor], encoder_only: bool) -> dict[str, torch.Tensor]:
    """maecli names -> the Hub's ViTMAE names (qkv split into query/key/value); what every transformers loads.

    `encoder_only` writes a bare ViTMAEModel, whose names lack the `vit.` prefix.
    """
    out = {}
    for key, value in state.items():
        m = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m:
            kind, i, part, leaf = m.groups()
            prefix = f"vit.encoder.layer.{i}" if kind == "blocks" else f"decoder.decoder_layers.{i}"
            if part == "attn.qkv":
                for name, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}.{HF_BLOCK_NAMES[name]}.{leaf}"] = chunk.contiguous()
            else:
                out[f"{prefix}.{HF_BLOCK_NAMES[part]}.{leaf}"] = value
            continue
        base, _, leaf = key.rpartition(".")
        out[HF_TOP_NAMES[key] if key in HF_TOP_NAMES else f"{HF_TOP_NAMES[base]}.{leaf}"] = value
    if encoder_only:
        out = {k.removeprefix("vit."): v for k, v in out.items()}
    return out


# config.json's key for what an hf export's inputs are normalized with (MAEConfig's mean, std, bands, units):
# transformers keeps a key it does not know, and an N-band model in its files' own units is no use without them.
HF_PIXELS = "maecli_pixels"
PIXEL_FIELDS = ("mean", "std", "bands", "units")


def with_hf_pixels(cfg: MAEConfig, hf_config: dict, source: str) -> MAEConfig:
    """`cfg` with the statistics an hf export recorded in its config.json (HF_PIXELS), if it did."""
    pixels = hf_config.get(HF_PIXELS)
    if pixels is None:
        return cfg
    if not isinstance(pixels, dict):
        raise WeightsError(f"{source}: config {HF_PIXELS} is {pixels!r}, expected an object")
    try:
        return replace(cfg, **{k: pixels[k] for k in PIXEL_FIELDS if k in pixels})
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{source}: config {HF_PIXELS} does not fit the model ({e})") from None


def hf_config(cfg: MAEConfig, *, encoder_only: bool, mask_ratio: float = 0.75) -> dict:
    """A transformers ViTMAEConfig, written as plain JSON so that exporting needs no transformers; with the
    statistics the model normalizes with (HF_PIXELS) where it records them."""
    hidden, decoder_hidden = cfg.embed_dim * cfg.mlp_ratio, cfg.decoder_dim * cfg.mlp_ratio
    if hidden != int(hidden) or decoder_hidden != int(decoder_hidden):
        raise WeightsError(f"MLP ratio {cfg.mlp_ratio} gives a fractional hidden size; transformers needs an integer")
    return {
        "architectures": ["ViTMAEModel" if encoder_only else "ViTMAEForPreTraining"],
        "model_type": "vit_mae",
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": int(hidden),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.norm_eps,
        "qkv_bias": True,
        "decoder_hidden_size": cfg.decoder_dim,
        "decoder_num_hidden_layers": cfg.decoder_depth,
        "decoder_num_attention_heads": cfg.decoder_heads,
        "decoder_intermediate_size": int(decoder_hidden),
        "mask_ratio": mask_ratio,
        "norm_pix_loss": cfg.norm_pix_loss,
        **({HF_PIXELS: {k: getattr(cfg, k) for k in PIXEL_FIELDS}} if cfg.mean is not None else {}),
    }


# ----------------------------------------------------------------------------------------------
# Another input size


def resize_pos_embed(pos: torch.Tensor, grid: int) -> tuple[torch.Tensor, str]:
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D), and how: sin-cos recomputed when `pos` is maecli's fixed
    embedding, else bicubic interpolation of the learned one. The cls row is kept as is."""
    old = int(round((pos.shape[1] - 1) ** 0.5))
    dim = pos.shape[-1]
    if dim % 4 == 0 and torch.allclose(pos[0].float().cpu(), sincos_pos_embed(dim, old), atol=1e-4):
        return sincos_pos_embed(dim, grid)[None].to(pos), "sin-cos recomputed"
    patches = pos[:, 1:].reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos)
    return torch.cat([pos[:, :1], patches], dim=1), "learned, interpolated bicubically"
