"""The Masked Autoencoder (He et al., 2021, arXiv:2111.06377): config, pure patch/mask functions, the model.

Parameter names follow the original release (`patch_embed.proj`, `blocks.N.attn.qkv`, `decoder_embed`,
`decoder_pred`, ...), so its checkpoints and timm's ViT weights load without renaming.
Shapes: N batch, L patches, D width, p patch size, C channels, h/w patches per side.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from .presets import PRESETS, default_patch_size


@dataclass
class MAEConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    norm_eps: float = 1e-6
    # How files become input (data.Pixels): per-band mean and std in `units` ("8-bit": 0-255; "native": the files'
    # own, 16-bit counts or floats), measured on the data; None is ImageNet's for 3 bands, 127.5 for 1 (old runs).
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    bands: tuple[int, ...] | None = None  # the file's bands the model reads, 1-based; None: all
    units: str = "8-bit"

    def __post_init__(self):
        self._check_sizes()
        self._check_pixels()

    def _check_sizes(self):
        for name in (
            "img_size",
            "patch_size",
            "embed_dim",
            "depth",
            "num_heads",
            "decoder_dim",
            "decoder_depth",
            "decoder_heads",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"image size {self.img_size} is not divisible by patch size {self.patch_size}")
        if not isinstance(self.in_chans, int) or isinstance(self.in_chans, bool) or self.in_chans < 1:
            raise ValueError(f"in_chans must be a positive integer, got {self.in_chans!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_dim {self.decoder_dim} is not divisible by decoder_heads {self.decoder_heads}")

    def _check_pixels(self):
        """mean, std and bands are tuples of in_chans numbers (JSON gives lists); std positive."""
        for name in ("mean", "std", "bands"):
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(int(v) if name == "bands" else float(v) for v in value)
            if len(value) != self.in_chans:
                raise ValueError(f"{name} has {len(value)} values for {self.in_chans} channels")
            object.__setattr__(self, name, value)
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.bands is not None and min(self.bands) < 1:
            raise ValueError(f"bands are numbered from 1, got {self.bands}")
        if self.units not in ("8-bit", "native"):
            raise ValueError(f"units must be '8-bit' or 'native', got {self.units!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> MAEConfig:
        """A named size (presets.PRESETS) with its decoder; `overrides` that are not None win. Without a patch
        size, small images get a smaller patch than the preset's (presets.default_patch_size)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
        p = PRESETS[name]
        kwargs = dict(
            embed_dim=p.embed_dim,
            depth=p.depth,
            num_heads=p.num_heads,
            decoder_dim=p.decoder_dim,
            decoder_depth=p.decoder_depth,
            decoder_heads=p.decoder_heads,
        )
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        kwargs.setdefault("patch_size", default_patch_size(name, kwargs.get("img_size", cls.img_size)))
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, d: dict) -> MAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def pixels(self):
        """How files become this model's input (data.Pixels: bands, units, mean and std)."""
        from .data import Pixels

        return Pixels.of(self)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


# ----------------------------------------------------------------------------------------------
# Pure functions


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), patches in row-major order, pixels (p, p, C) within a patch."""
    N, C, H, W = imgs.shape
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by patch size {p}")
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W); the inverse of `patchify` for square grids."""
    N, L, _ = x.shape
    h = w = int(math.isqrt(L))
    if h * w != L:
        raise ValueError(f"{L} patches do not form a square grid")
    x = x.reshape(N, h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, c, h * p, w * p)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """How many patches stay visible: the original's count, int(L * (1 - mask_ratio))."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(
    x: torch.Tensor,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
):
    """Keep a random subset of tokens per sample by sorting noise (lowest noise is kept).

    x: (N, L, D); noise: optional (N, L), else drawn from `generator`.
    Returns visible (N, K, D), mask (N, L) with 1 = hidden, ids_restore (N, L) that undoes the shuffle.
    """
    N, L, D = x.shape
    keep = num_visible(L, mask_ratio)
    if noise is None:
        noise = torch.rand(N, L, device=x.device, generator=generator)
    elif noise.shape != (N, L):
        raise ValueError(f"noise must have shape {(N, L)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(N, L, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return visible, mask, ids_restore


def patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's mean and std, (N, L, 1) each: what `norm_pix_loss` divides out of the target.

    Reconstruction multiplies them back in, so both sides must use this one definition.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return mean, (var + 1.0e-6) ** 0.5


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, (1 + grid*grid, dim) with a zero row for the cls token.

    Half the channels encode the row, half the column, as in the MAE release.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")  # the release puts w first: emb_h from gx

    def encode(pos):
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    emb = torch.cat([encode(gx), encode(gy)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


def _blocks(n: int, dim: int, heads: int, mlp_ratio: float, eps: float) -> nn.ModuleList:
    return nn.ModuleList(
        Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=eps)) for _ in range(n)
    )


class MAE(nn.Module):
    """ViT encoder over visible patches only, light ViT decoder over all tokens, pixel loss on hidden ones."""

    def __init__(self, cfg: MAEConfig, *, decoder: bool = True):
        super().__init__()
        self.cfg = cfg
        D, L = cfg.embed_dim, cfg.num_patches
        # encoder
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, D), requires_grad=False)
        self.blocks = _blocks(cfg.depth, D, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps)
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.has_decoder = decoder
        if decoder:
            Dd = cfg.decoder_dim
            self.decoder_embed = nn.Linear(D, Dd)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, Dd), requires_grad=False)
            self.decoder_blocks = _blocks(cfg.decoder_depth, Dd, cfg.decoder_heads, cfg.mlp_ratio, cfg.norm_eps)
            self.decoder_norm = nn.LayerNorm(Dd, eps=cfg.norm_eps)
            self.decoder_pred = nn.Linear(Dd, cfg.patch_size**2 * cfg.in_chans)
        self.initialize_weights()

    def initialize_weights(self):
        self.pos_embed.data.copy_(sincos_pos_embed(self.cfg.embed_dim, self.cfg.grid)[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer, like the release
        nn.init.normal_(self.cls_token, std=0.02)
        if self.has_decoder:
            self.decoder_pos_embed.data.copy_(sincos_pos_embed(self.cfg.decoder_dim, self.cfg.grid)[None])
            nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_fused_attention(self, fused: bool) -> None:
        """Use torch's fused attention kernel (timm's default) or plain matmul-softmax attention: the trainer
        chooses once per device and precision (runtime.fused_attention_pays). Same results either way."""
        for module in self.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = fused

    @staticmethod
    def _run(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            x = blk(x)
        return x

    # -- encoder ---------------------------------------------------------------------------------

    def _check_input(self, imgs: torch.Tensor):
        cfg = self.cfg
        if imgs.ndim != 4 or imgs.shape[1] != cfg.in_chans:
            raise ValueError(f"expected images of shape (N, {cfg.in_chans}, H, W), got {tuple(imgs.shape)}")
        if imgs.shape[-2:] != (cfg.img_size, cfg.img_size):
            raise ValueError(f"input size {imgs.shape[-2]}x{imgs.shape[-1]} doesn't match model ({cfg.img_size})")

    def forward_encoder(self, imgs, mask_ratio: float, noise=None, generator=None):
        """imgs (N, C, H, W) -> latent (N, 1 + K, D) for the K visible patches, mask (N, L), ids_restore."""
        self._check_input(imgs)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x, mask, ids_restore = random_masking(x, mask_ratio, noise=noise, generator=generator)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = self._run(self.blocks, torch.cat([cls, x], dim=1))
        return self.norm(x), mask, ids_restore

    def encode(self, imgs: torch.Tensor) -> torch.Tensor:
        """The whole image, no masking: (N, C, H, W) -> (N, 1 + L, D) after the final norm."""
        self._check_input(imgs)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = self._run(self.blocks, torch.cat([cls, x], dim=1))
        return self.norm(x)

    # -- decoder ---------------------------------------------------------------------------------

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (N, 1 + K, D) -> per-patch pixel predictions (N, L, p*p*C), patches back in place."""
        if not self.has_decoder:
            raise RuntimeError("this checkpoint holds only the encoder; reconstruction needs the decoder")
        x = self.decoder_embed(latent)
        N, L = ids_restore.shape
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(N, L + 1 - x.shape[1], -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        x = self._run(self.decoder_blocks, x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:]

    # -- loss ------------------------------------------------------------------------------------

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """What the decoder predicts: patches (N, L, p*p*C), each normalized when `norm_pix_loss`."""
        target = patchify(imgs, self.cfg.patch_size)
        if self.cfg.norm_pix_loss:
            mean, std = patch_stats(target)
            target = (target - mean) / std
        return target

    def forward_loss(self, imgs, pred, mask) -> torch.Tensor:
        """Mean squared error per patch, averaged over hidden patches only."""
        per_patch = ((pred.float() - self.target(imgs).float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio: float = 0.75, noise=None, generator=None):
        """Returns (loss, pred (N, L, p*p*C), mask (N, L) with 1 = hidden)."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise=noise, generator=generator)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def no_weight_decay_groups(model: nn.Module, weight_decay: float):
    """AdamW parameter groups: decay on weight matrices only, not on biases, norms, tokens or positions."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
