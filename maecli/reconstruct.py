"""Reconstruction pictures: hide patches with the model's own masking, decode them, lay out a labelled grid.

Used by `maecli reconstruct` and by the per-epoch previews of `maecli pretrain`. One row per image, four
columns: original | masked | prediction | prediction with the visible patches pasted back.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import data as D
from .errors import DataError, EncoderOnlyError, UsageError
from .files import atomic_write, write_bytes
from .model import MAE, patch_stats, patchify, unpatchify
from .picture import view_for
from .rundir import PREVIEWS_DIR, preview_name
from .runtime import autocast, resolve_precision

COLUMNS = ("original", "masked", "prediction", "pred + visible")
GREY = 0.5  # hidden patches in the "masked" column
PREVIEW_MASK = 0.75
MARGIN, GAP = 6, 4


@dataclass
class Reconstruction:
    """Pictures for eyes in [0, 1], (N, 3 or 1, H, W) each (picture.py: chosen bands, stretched), plus the mask
    (N, L; 1 = hidden), the per-image error, and `full`: the prediction with the visible patches pasted back, every
    band in the model's units (N, C, H, W), for --raw."""

    names: list[str]
    original: torch.Tensor
    masked: torch.Tensor
    prediction: torch.Tensor
    pasted: torch.Tensor
    mask: torch.Tensor
    mse: list[float]
    mask_ratio: float
    seed: int
    norm_pix_loss: bool
    patch_stats: bool
    hidden: list[int]
    full: torch.Tensor | None = None
    shown: str = ""

    @property
    def tiles(self) -> tuple[torch.Tensor, ...]:
        return self.original, self.masked, self.prediction, self.pasted

    def legend(self) -> str:
        """What the prediction columns show, in words: the honesty note that travels with the picture."""
        head = f"mask {self.mask_ratio:g}, seed {self.seed}; MSE on hidden patches in the loss's space. {self.shown}"
        if not self.norm_pix_loss:
            return head + "Prediction: the model's pixels, nothing borrowed."
        if self.patch_stats:
            return head + (
                "Prediction: normalized pixels, un-normalized with each hidden patch's true mean and "
                "variance taken from the original (--no-patch-stats shows it raw)."
            )
        return head + (
            "Prediction: normalized pixels shown raw (dataset mean and spread); the brightness and "
            "contrast of each patch are not predicted by the model."
        )

    def note(self, to_show_raw: str = "--no-patch-stats") -> str | None:
        """What the prediction columns borrow, as one sentence for the user; None when nothing is borrowed."""
        if not self.norm_pix_loss:
            return None
        if self.patch_stats:
            return (
                "this model predicts normalized pixels; the prediction columns borrow each hidden patch's mean and "
                f"variance from the original ({to_show_raw} to show it raw)"
            )
        return (
            "this model predicts normalized pixels, shown raw, with the dataset mean and spread: each patch's "
            "brightness and contrast are not the model's"
        )

    def records(self) -> list[dict]:
        """One JSON-ready dict per image."""
        patches = self.mask.shape[1]
        return [
            {
                "image": self.names[i],
                "row": i + 1,
                "mse": round(self.mse[i], 6),
                "hidden": self.hidden[i],
                "patches": patches,
                "mask": self.mask_ratio,
                "seed": self.seed,
                "target": "normalized patches" if self.norm_pix_loss else "pixels",
                "patch_stats": self.patch_stats and self.norm_pix_loss,
            }
            for i in range(len(self.names))
        ]


# ----------------------------------------------------------------------------------------------
# Images in, tensors out


def load_images(paths: list[str | os.PathLike], img_size: int, in_chans: int | D.Pixels) -> torch.Tensor:
    """Files -> model input (N, C, img_size, img_size) through the inference image path (data.eval_batches):
    shorter side resized, center-cropped, normalized. DataError names the first file that is missing or unreadable."""
    for p in paths:
        if Path(p).is_dir():
            raise DataError(f"{p} is a folder, not an image file")
    return torch.cat([x for _, x in D.eval_batches(paths, img_size, in_chans)])


def mask_noise(n: int, num_patches: int, seed: int) -> torch.Tensor:
    """The masking noise (N, L) from a CPU generator, so a seed gives the same mask on every device."""
    return torch.rand(n, num_patches, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reconstruct(
    model: MAE,
    images: torch.Tensor | list[str | os.PathLike],
    mask_ratio: float = 0.75,
    seed: int = 0,
    use_patch_stats: bool = True,
    precision: str = "no",
    names: list[str] | None = None,
    batch_size: int = 32,
    show_bands: tuple[int, ...] | None = None,
) -> Reconstruction:
    """Mask, encode, decode. `images` are files, or model input (N, C, H, W) normalized like `eval_transform`.

    With a `norm_pix_loss` model the decoder predicts each patch only up to its mean and variance;
    `use_patch_stats=True` borrows them from the original (as the paper's figures do), False shows the raw
    prediction with the dataset's mean and spread. `show_bands` (1-based, 3 or 1) picks the bands pictured
    (picture.py). The model runs in eval mode; its mode is restored.
    """
    if not model.has_decoder:
        raise EncoderOnlyError(
            "this checkpoint holds only the encoder; reconstruction needs the decoder "
            "(a maecli run's model.safetensors or the original release's mae_visualize_*.pth hold one)"
        )
    cfg = model.cfg
    if not isinstance(images, torch.Tensor):
        names = names or [str(p) for p in images]
        images = load_images(images, cfg.img_size, D.Pixels.of(cfg))
    names = names or [f"image {i + 1}" for i in range(images.shape[0])]
    device = next(model.parameters()).device
    mode = resolve_precision(precision, device)
    noise = mask_noise(images.shape[0], cfg.num_patches, seed)

    was_training = model.training
    model.eval()
    preds, masks, mse = [], [], []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device)
            with autocast(device, mode):
                latent, mask, ids_restore = model.forward_encoder(
                    x, mask_ratio, noise=noise[start : start + batch_size].to(device)
                )
                pred = model.forward_decoder(latent, ids_restore)
            pred = pred.float()
            # per image, with the model's own loss: the number training minimizes
            mse += [
                model.forward_loss(x[i : i + 1], pred[i : i + 1], mask[i : i + 1]).item() for i in range(x.shape[0])
            ]
            if cfg.norm_pix_loss and use_patch_stats:
                mean, std = patch_stats(patchify(x.float(), cfg.patch_size))
                pred = pred * std + mean
            preds.append(pred.cpu())
            masks.append(mask.float().cpu())
    finally:
        model.train(was_training)

    p, c = cfg.patch_size, cfg.in_chans
    pred, mask = torch.cat(preds), torch.cat(masks)
    original = D.denormalize(images.float().cpu(), D.Pixels.of(cfg))  # the model's units, every band
    hidden = mask.unsqueeze(-1).bool()
    full = unpatchify(
        torch.where(
            hidden, patchify(D.denormalize(unpatchify(pred, p, c), D.Pixels.of(cfg)), p), patchify(original, p)
        ),
        p,
        c,
    )
    view = view_for(original, cfg.units, show_bands)
    original, prediction = view.show(original), view.show(D.denormalize(unpatchify(pred, p, c), D.Pixels.of(cfg)))
    k = original.shape[1]
    orig_patches = patchify(original, p)
    masked = unpatchify(torch.where(hidden, torch.full_like(orig_patches, GREY), orig_patches), p, k)
    pasted = unpatchify(torch.where(hidden, patchify(prediction, p), orig_patches), p, k)
    return Reconstruction(
        names=names,
        original=original,
        masked=masked,
        prediction=prediction,
        pasted=pasted,
        mask=mask,
        mse=mse,
        mask_ratio=mask_ratio,
        seed=seed,
        norm_pix_loss=cfg.norm_pix_loss,
        patch_stats=use_patch_stats,
        hidden=[int(m.sum()) for m in mask],
        full=full,
        shown=view.how,
    )


# ----------------------------------------------------------------------------------------------
# The picture


def _font():
    return ImageFont.load_default()  # ships with Pillow: nothing to download, same glyphs everywhere


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Shorten from the left (file names end with what tells them apart)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("..." + text, font=font) > width:
        text = text[1:]
    return "..." + text


@dataclass
class Layout:
    """Where everything goes: tiles keep the model's size (times `zoom`); cells widen to fit their label."""

    rows: int
    tile: int
    cell: int
    line: int
    legend_lines: int

    @property
    def row_height(self) -> int:
        return self.line + self.tile + GAP  # a caption line above each row of tiles

    @property
    def width(self) -> int:
        return 2 * MARGIN + 4 * self.cell + 3 * GAP

    @property
    def height(self) -> int:
        return 2 * MARGIN + self.line + GAP + self.rows * self.row_height + self.legend_lines * self.line

    def tile_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a tile, for PIL's crop/paste."""
        left = MARGIN + col * (self.cell + GAP) + (self.cell - self.tile) // 2
        top = MARGIN + self.line + GAP + row * self.row_height + self.line
        return left, top, left + self.tile, top + self.tile


def layout(rec: Reconstruction, zoom: int = 1) -> tuple[Layout, list[str]]:
    font = _font()
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    tile = rec.original.shape[-1] * zoom
    cell = max(tile, *(int(probe.textlength(c, font=font)) + 4 for c in COLUMNS))
    left, top, right, bottom = probe.textbbox((0, 0), "Ag", font=font)
    line = bottom + 3
    width = 4 * cell + 3 * GAP
    legend = _wrap(probe, rec.legend(), font, width)
    return Layout(rows=len(rec.names), tile=tile, cell=cell, line=line, legend_lines=len(legend)), legend


def _to_image(t: torch.Tensor, zoom: int) -> Image.Image:
    """(C, H, W) in [0, 1] -> PIL image; one channel stays grayscale."""
    arr = (t.clamp(0, 1) * 255).round().to(torch.uint8)
    img = (
        Image.fromarray(arr[0].numpy(), "L")
        if arr.shape[0] == 1
        else Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy(), "RGB")
    )
    if zoom > 1:
        img = img.resize((img.width * zoom, img.height * zoom), Image.Resampling.NEAREST)
    return img


def _labels(rec: Reconstruction, draw, font, cell: int) -> list[str]:
    """Column labels; the masked column names its ratio where the cell is wide enough."""
    masked = f"masked {rec.mask_ratio:.0%}"
    return [masked if i == 1 and draw.textlength(masked, font=font) <= cell else c for i, c in enumerate(COLUMNS)]


def render(rec: Reconstruction, zoom: int = 1) -> Image.Image:
    """The grid as a PIL image: a header of column labels, per row a caption and four tiles, the legend."""
    lay, legend = layout(rec, zoom)
    font = _font()
    mode = "L" if rec.original.shape[1] == 1 else "RGB"
    ink = 0 if mode == "L" else (0, 0, 0)
    canvas = Image.new(mode, (lay.width, lay.height), 255 if mode == "L" else (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for col, label in enumerate(_labels(rec, draw, font, lay.cell)):
        x = MARGIN + col * (lay.cell + GAP) + (lay.cell - int(draw.textlength(label, font=font))) // 2
        draw.text((x, MARGIN), label, fill=ink, font=font)
    for row in range(lay.rows):
        left, top, _, _ = lay.tile_box(row, 0)
        caption = f"{Path(rec.names[row]).name}  MSE {rec.mse[row]:.3f}"
        draw.text((MARGIN, top - lay.line), _fit(draw, caption, font, lay.width - 2 * MARGIN), fill=ink, font=font)
        for col, tiles in enumerate(rec.tiles):
            canvas.paste(_to_image(tiles[row], zoom), lay.tile_box(row, col)[:2])
    y = lay.height - MARGIN - lay.legend_lines * lay.line
    for text in legend:
        draw.text((MARGIN, y), text, fill=ink, font=font)
        y += lay.line
    return canvas


def png_bytes(img: Image.Image) -> bytes:
    """PNG with fixed settings and no metadata (no timestamps): the same picture gives the same bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def write_png(data: bytes, path: str | os.PathLike) -> None:
    write_bytes(path, data)


RAW_SUFFIXES = (".npy", ".tif", ".tiff")


def check_raw_target(path: str | os.PathLike) -> None:
    if Path(path).suffix.lower() not in RAW_SUFFIXES:
        raise UsageError(f"--raw {path}: the file must end in .npy or .tif (a float32 array of every band)")


def write_raw(rec: Reconstruction, path: str | os.PathLike) -> None:
    """The reconstruction at full depth, every band, in the input's units: float32 (N, C, H, W) as .npy, or a TIFF
    of N pages of C bands (bands first). Atomic."""
    check_raw_target(path)
    arr = rec.full.float().numpy()

    def write(tmp):
        if Path(path).suffix.lower() == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, arr)
        else:
            import tifffile

            tifffile.imwrite(tmp, arr, photometric="minisblack", metadata={"axes": "QCYX"})

    atomic_write(Path(path), write)


# ----------------------------------------------------------------------------------------------
# Previews during pretraining


def preview_paths(paths: list[Path], count: int, in_chans: int | D.Pixels) -> list[Path]:
    """`count` images spread evenly over the sorted file list; an unreadable one gives way to the next."""
    chosen: list[Path] = []
    n = len(paths)
    for k in range(min(count, n)):
        for i in range(k * n // count, n):
            if paths[i] in chosen:
                continue
            try:
                D.decode(paths[i], in_chans, min_side=64)
            except Exception:  # the training loop warns about unreadable files; a preview just moves on
                continue
            chosen.append(paths[i])
            break
    return chosen


def readable_zoom(img_size: int) -> int:
    """How many times to enlarge tiles of `img_size` pixels so that eyes can read them: about 256 px, at most 16x."""
    return max(1, min(16, round(256 / img_size)))


def save_preview(
    model: MAE,
    paths: list[Path],
    out: Path,
    epoch: int,
    count: int,
    seed: int,
    mask_ratio: float = PREVIEW_MASK,
    show_bands: tuple[int, ...] | None = None,
) -> Path | None:
    """previews/epoch-NNNN.png for a few fixed images at the run's mask and a fixed seed, enlarged to a readable
    size; None if none decodes."""
    chosen = preview_paths(paths, count, D.Pixels.of(model.cfg))
    if not chosen:
        return None
    rec = reconstruct(model, chosen, mask_ratio=mask_ratio, seed=seed, show_bands=show_bands)
    folder = Path(out) / PREVIEWS_DIR
    folder.mkdir(exist_ok=True)
    path = folder / preview_name(epoch)
    write_png(png_bytes(render(rec, readable_zoom(model.cfg.img_size))), path)
    return path
