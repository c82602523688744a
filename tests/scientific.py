"""Scientific folders made from the real example photos: 16-bit grayscale with a large offset, 6-band stacks of a
photo's channels and their transforms (16-bit and float32 TIFFs, .npy), and pydicom's own DICOM test files."""

from pathlib import Path

import numpy as np
from conftest import EXAMPLES
from PIL import Image

OFFSET, SPAN = 30_000, 1.5  # 16-bit values 30000..30383: a few hundred levels above a large offset


def photos(n: int = 8, side: int = 48) -> list[np.ndarray]:
    """n example photos as RGB uint8 arrays (side x side)."""
    files = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".jpg", ".png"))[:n]
    return [np.asarray(Image.open(f).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)) for f in files]


def gray16(rgb: np.ndarray) -> np.ndarray:
    """A photo as 16-bit gray: OFFSET + SPAN x luminance."""
    lum = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float64)
    return (OFFSET + SPAN * lum).round().astype(np.uint16)


def six_bands(rgb: np.ndarray) -> np.ndarray:
    """(6, H, W) float: R, G, B, the inverse of R, the mean of G and B, the luminance; 0..255."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    return np.stack([r, g, b, 255 - r, (g + b) / 2, 0.299 * r + 0.587 * g + 0.114 * b])


def write_gray16_folder(root: Path, n: int = 8) -> list[np.ndarray]:
    """16-bit PNGs (and one 16-bit TIFF) of the photos; returns their arrays."""
    import tifffile

    root.mkdir(parents=True, exist_ok=True)
    arrays = [gray16(p) for p in photos(n)]
    for i, a in enumerate(arrays):
        if i == 0:
            tifffile.imwrite(root / f"scan{i}.tif", a)
        else:
            Image.fromarray(a).save(root / f"scan{i}.png")
    return arrays


def write_six_band_folder(root: Path, dtype=np.uint16, n: int = 8, nodata: float | None = None) -> list[np.ndarray]:
    """6-band TIFFs, bands last (interleaved) and bands first (planar) alternately: 16-bit as 100 x value, float32
    as reflectance 0..1. With `nodata`, a corner of each file is that value and the tag says so."""
    import tifffile

    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i, rgb in enumerate(photos(n)):
        bands = six_bands(rgb)
        bands = (bands * 100).astype(np.uint16) if dtype == np.uint16 else (bands / 255).astype(np.float32)
        extra = {}
        if nodata is not None:
            bands[:, :4, :4] = nodata
            extra["extratags"] = [(42113, "s", 0, str(nodata), True)]
        if i % 2:
            tifffile.imwrite(root / f"tile{i}.tif", bands, photometric="minisblack", planarconfig="separate", **extra)
        else:
            tifffile.imwrite(
                root / f"tile{i}.tif",
                np.moveaxis(bands, 0, -1),
                photometric="minisblack",
                planarconfig="contig",
                **extra,
            )
        out.append(bands)
    return out


def write_labelled_twin(root: Path, dtype=np.uint16) -> None:
    """Two classes of 6-band tiles: each photo's tiles (crops of it) form its own class."""
    import tifffile

    pics = photos(2, side=96)
    for label, rgb in zip(("first", "second"), pics):
        bands = (six_bands(rgb) * 100).astype(dtype)
        for split in ("train", "val"):
            (root / split / label).mkdir(parents=True, exist_ok=True)
        for k in range(8):
            y, x = (k // 4) * 24, (k % 4) * 16
            split = "val" if k % 4 == 3 else "train"
            tifffile.imwrite(
                root / split / label / f"{k}.tif", bands[:, y : y + 48, x : x + 48], photometric="minisblack"
            )


def write_dicom_folder(root: Path) -> list[str]:
    """pydicom's own CT and MR test files, and one DICOM without pixel data; returns the names with pixels."""
    import shutil

    import pydicom
    from pydicom.data import get_testdata_file

    root.mkdir(parents=True, exist_ok=True)
    names = ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_padded.dcm"]
    for name in names:
        shutil.copy(get_testdata_file(name), root / name)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(root / "no_pixels.dcm")
    return names


def flower_bands(rgb: np.ndarray) -> np.ndarray:
    """(6, H, W) uint16 from an RGB photo, bands that are not a linear mix of the colours: R, G, B (x 100), the
    luminance's gradient magnitude (x 20), the saturation (0..25500) and a 5 x 5 blur of the luminance (x 100)."""
    from numpy.lib.stride_tricks import sliding_window_view

    x = rgb.astype(np.float64)
    lum = x @ np.array([0.299, 0.587, 0.114])
    p = np.pad(lum, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    top, low = x.max(axis=2), x.min(axis=2)
    saturation = np.where(top > 0, (top - low) / np.maximum(top, 1), 0) * 255
    blur = sliding_window_view(np.pad(lum, 2, mode="edge"), (5, 5)).mean(axis=(2, 3))
    bands = [x[..., 0] * 100, x[..., 1] * 100, x[..., 2] * 100, np.hypot(gx, gy) * 20, saturation * 100, blur * 100]
    return np.stack(bands).clip(0, 65535).round().astype(np.uint16)


def write_flower_bands(root: Path, train: int = 80, val: int = 30, side: int = 40) -> int:
    """A labelled 6-band twin of flowers-160 (5 species of real flower photos; ../shared/data): the first `train`
    and `val` photos of each class, centre-cropped square at `side` px, as flower_bands TIFFs in root/train/CLASS
    and root/val/CLASS. Returns how many files it wrote."""
    import tifffile
    from conftest import SHARED_DATA

    written = 0
    for split, n in (("train", train), ("val", val)):
        for folder in sorted((SHARED_DATA / "flowers-160" / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(folder.iterdir())[:n]:
                with Image.open(f) as im:
                    s = min(im.size)
                    box = ((im.width - s) // 2, (im.height - s) // 2, (im.width + s) // 2, (im.height + s) // 2)
                    rgb = np.asarray(im.convert("RGB").resize((side, side), Image.Resampling.BICUBIC, box=box))
                tifffile.imwrite(
                    root / split / folder.name / f"{f.stem}.tif", flower_bands(rgb), photometric="minisblack"
                )
                written += 1
    return written
