"""The model sizes maecli knows by name, defined once: the CLI's choices, the encoder and decoder defaults, and
the timm architecture each exports to all come from this table. No torch here: `--help` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    # The decoder: the paper's 512 wide, 8 deep for ViT-B and up; a small encoder gets a decoder of its scale,
    # since a decoder far wider than the encoder does the learning and leaves the encoder's features poor.
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    timm_name: str  # the timm architecture with these dimensions (at 224 px)


PRESETS = {
    "vit-tiny": Preset(192, 12, 3, 16, 128, 4, 4, "vit_tiny_patch16_224"),
    "vit-small": Preset(384, 12, 6, 16, 256, 4, 8, "vit_small_patch16_224"),
    "vit-base": Preset(768, 12, 12, 16, 512, 8, 16, "vit_base_patch16_224"),
    "vit-large": Preset(1024, 24, 16, 16, 512, 8, 16, "vit_large_patch16_224"),
    "vit-huge": Preset(1280, 32, 16, 14, 512, 8, 16, "vit_huge_patch14_224"),
}

MIN_GRID = 8  # patches per side below which a preset's patch size is too coarse for the image


def default_patch_size(preset: str, img_size: int) -> int:
    """The preset's patch size, or a smaller one for small images so that they still have 8 or more patches per
    side (64 px -> 8, 32 px -> 4): a 64 px image in 16 px patches is a 4 x 4 grid, with one patch visible at
    mask 0.75 per 4."""
    patch = PRESETS[preset].patch_size
    while patch > 1 and img_size // patch < MIN_GRID:
        patch //= 2
    return patch
