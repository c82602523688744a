"""Image sources behind one seam: a table of readers keyed by file suffix, each returning a file's pixels with all
its bands in their native range (no 8-bit truncation), its size checked from the header before any pixel is decoded.

A reader takes (source, Request) and returns a `Decoded`: pixels (C, H, W) as uint8 for an 8-bit picture (a photo,
read by PIL as before) or float32 in the file's own units (16-bit counts, reflectance, Hounsfield units), with
missing pixels (NaN, a TIFF's nodata value) as NaN. Adding a format is one function and one line in READERS.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

# A file claiming more bands than this is refused before decoding (hyperspectral cubes have a few hundred).
MAX_BANDS = 1024
# The most samples (bands x height x width) one file may decode to: 1 GiB as float32.
MAX_SAMPLES = 1 << 28


@dataclass
class Request:
    """What the caller needs from a file: `gray` asks an 8-bit photo for one luminance band (PIL's "L", as maecli
    always converted); `min_side` lets JPEG decoding skip resolution; `max_pixels` and `resize_to` bound the size."""

    gray: bool = False
    min_side: int | None = None
    max_pixels: int | None = None
    resize_to: int | None = None


@dataclass
class Decoded:
    """A file's pixels: (C, H, W), uint8 for 8-bit pictures, float32 in native units otherwise; `missing` counts
    the pixels that were NaN or the file's nodata value (now NaN)."""

    pixels: np.ndarray
    missing: int = 0

    @property
    def bands(self) -> int:
        return self.pixels.shape[0]


def check_size(width: int, height: int, bands: int = 1, *, max_pixels=None, resize_to=None) -> None:
    """Refuse (ValueError), from a header, a file with too many bands or samples, then data.check_size's limits."""
    from .data import check_size as check_pixels

    if bands > MAX_BANDS:
        raise ValueError(f"the file claims {bands:,} bands; the limit is {MAX_BANDS:,}")
    if bands * width * height > MAX_SAMPLES:
        raise ValueError(
            f"the file claims {bands} bands of {width} x {height} pixels, {bands * width * height:,} samples; "
            f"the limit is {MAX_SAMPLES:,}"
        )
    check_pixels(width, height, max_pixels=max_pixels, resize_to=resize_to)


def _missing_to_nan(arr: np.ndarray, nodata: float | None = None) -> Decoded:
    """float32 (C, H, W) with nodata and inf as NaN, and their count."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not arr.flags.writeable:
        arr = arr.copy()
    if nodata is not None and not np.isnan(nodata):
        arr[arr == np.float32(nodata)] = np.nan
    bad = ~np.isfinite(arr)
    count = int(bad.any(axis=0).sum())
    if count:
        arr[bad] = np.nan
    return Decoded(arr, count)


# ----------------------------------------------------------------------------------------------
# PIL: 8-bit and 16-bit PNG, JPEG, WebP, BMP, GIF, and TIFFs of one or three 8-bit or one 16-bit band


def read_pil(source, req: Request) -> Decoded:
    """Through Pillow: 8-bit pictures as uint8 (1 band for gray ones, 3 for colour, transparency on white; one
    luminance band when `req.gray`), 16-bit and float ones (modes I;16, I, F) as float32 in their own units."""
    from PIL import Image, ImageOps

    from .data import FORMATS, to_array

    with warnings.catch_warnings():
        # PIL warns about quirks it handles (palette transparency, odd EXIF), once per file: noise in a
        # long run. Too many pixels, though, is a decompression bomb and an error here.
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source, formats=FORMATS) as img:
            check_size(img.width, img.height, max_pixels=req.max_pixels, resize_to=req.resize_to)
            if req.min_side and img.format == "JPEG":
                img.draft("L" if req.gray else "RGB", (req.min_side, req.min_side))
            img.load()
            try:
                ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of the pixels when upright
            except Exception:  # broken EXIF: the pixels are fine, keep their stored orientation
                pass
            return from_image(img, req.gray, to_array)


def from_image(img, gray: bool, to_array: Callable) -> Decoded:
    """An opened PIL image as a Decoded (see read_pil)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _missing_to_nan(np.asarray(img, dtype=np.float32)[None])
    chans = 1 if gray or img.mode in ("1", "L", "LA", "I;16") else 3
    arr = to_array(img, chans)
    return Decoded(arr[None] if arr.ndim == 2 else np.moveaxis(arr, 2, 0))


# ----------------------------------------------------------------------------------------------
# tifffile: multi-band, multi-page, 16-bit and float TIFFs, GeoTIFF's nodata


def read_tiff(source, req: Request) -> Decoded:
    """A TIFF through tifffile: every band of its first series in file order, bands first or last as its tags say
    (interleaved samples, planar samples and pages all become bands); GDAL's nodata tag marks missing pixels.
    A plain 8-bit gray or RGB TIFF goes through PIL, as it always did."""
    try:
        import tifffile
    except ImportError:  # without tifffile, Pillow reads what it can
        return read_pil(source, req)
    try:
        tif = tifffile.TiffFile(source)
    except tifffile.TiffFileError as e:
        raise ValueError(f"not a readable TIFF ({e})") from None
    with tif:
        series = tif.series[0]
        page = tif.pages[0]
        axes, shape = series.axes, series.shape
        if "Y" not in axes or "X" not in axes:
            raise ValueError(f"the TIFF's first series has axes {axes}, with no image plane")
        height, width = shape[axes.index("Y")], shape[axes.index("X")]
        bands = int(np.prod(shape)) // (height * width)
        check_size(width, height, bands, max_pixels=req.max_pixels, resize_to=req.resize_to)
        if series.dtype == np.uint8 and bands in (1, 3) and len(tif.pages) == 1:
            if hasattr(source, "seek"):
                source.seek(0)
            return read_pil(source, req)
        nodata = page.tags.get("GDAL_NODATA")
        arr = series.asarray()
    order = [i for i, a in enumerate(axes) if a not in "YX"] + [axes.index("Y"), axes.index("X")]
    arr = np.transpose(arr, order).reshape(bands, height, width)
    return _missing_to_nan(arr, _number(nodata.value) if nodata is not None else None)


def _number(text) -> float | None:
    try:
        return float(str(text).strip().strip("\x00"))
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------
# numpy arrays


def read_npy(source, req: Request) -> Decoded:
    """A .npy array of numbers: (H, W); (C, H, W), bands first as torch has them; or (H, W, C), bands last, when
    its last axis is shorter than its first (as numpy images usually are). Never unpickles."""
    arr = np.load(source, mmap_mode="r" if isinstance(source, (str, os.PathLike)) else None, allow_pickle=False)
    if arr.dtype.kind not in "buif" or arr.ndim not in (2, 3):
        raise ValueError(f"a .npy image must be a 2-D or 3-D array of numbers, got {arr.ndim}-D {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.shape[2] < arr.shape[0]:
        arr = np.moveaxis(arr, 2, 0)
    bands, height, width = arr.shape
    check_size(width, height, bands, max_pixels=req.max_pixels, resize_to=req.resize_to)
    return _missing_to_nan(arr)


# ----------------------------------------------------------------------------------------------
# DICOM (pip install "maecli[dicom]")


def read_dicom(source, req: Request) -> Decoded:
    """A DICOM file through pydicom, its rescale slope and intercept applied (CT in Hounsfield units); frames
    become bands. A file without pixel data is refused (and skipped, in a folder)."""
    try:
        import pydicom
    except ImportError:
        raise ValueError('reading DICOM needs pydicom: pip install "maecli[dicom]"') from None
    try:
        ds = pydicom.dcmread(source)
    except pydicom.errors.InvalidDicomError as e:
        raise ValueError(f"not a DICOM file ({e})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ValueError("the DICOM file holds no pixel data")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    check_size(int(ds.Columns), int(ds.Rows), frames * samples, max_pixels=req.max_pixels, resize_to=req.resize_to)
    arr = ds.pixel_array.astype(np.float32)
    arr = arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    if samples > 1:  # (frames,) H, W, S: samples last
        arr = np.moveaxis(arr, -1, -3)
    return _missing_to_nan(arr.reshape(-1, int(ds.Rows), int(ds.Columns)))


# ----------------------------------------------------------------------------------------------
# The table


Reader = Callable[[object, Request], Decoded]

READERS: dict[str, Reader] = {
    ".jpg": read_pil,
    ".jpeg": read_pil,
    ".png": read_pil,
    ".webp": read_pil,
    ".bmp": read_pil,
    ".gif": read_pil,
    ".tif": read_tiff,
    ".tiff": read_tiff,
    ".npy": read_npy,
    ".dcm": read_dicom,
    ".dicom": read_dicom,
}
SUFFIXES = frozenset(READERS)


def reader_for(source: str | os.PathLike | BinaryIO) -> Reader:
    """The reader of a path by its suffix; bytes (an upload) by their first bytes: TIFF, DICOM, .npy or PIL."""
    if isinstance(source, (str, os.PathLike)):
        return READERS.get(os.path.splitext(os.fspath(source))[1].lower(), read_pil)
    head = source.read(132)
    source.seek(0)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return read_tiff
    if head[:6] == b"\x93NUMPY":
        return read_npy
    if head[128:132] == b"DICM":
        return read_dicom
    return read_pil


def read(source: str | os.PathLike | BinaryIO, req: Request | None = None) -> Decoded:
    """Read one image, a file or a binary file object, with the reader its type calls for. Raises OSError or
    ValueError on anything unreadable."""
    # A FIFO or device named like an image would block open() forever: only regular files are read.
    if isinstance(source, (str, os.PathLike)) and not stat.S_ISREG(os.stat(source).st_mode):
        raise ValueError("not a regular file")
    decoded = reader_for(source)(source, req or Request())
    if decoded.pixels.ndim != 3 or min(decoded.pixels.shape) < 1:
        raise ValueError("image has no pixels")
    return decoded
