"""Images in: uploads and folder files, prepared exactly as `maecli reconstruct` prepares a file, and the small
JPEGs of the page's grids."""

import io
from pathlib import Path

from .errors import Refused

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 60_000_000  # a 60-megapixel photo decodes to 180 MB; a bomb of a few KB would claim gigabytes
THUMB_SIDE = 160


def upload_pixels(data: bytes, in_chans: int, img_size: int, max_pixels: int = MAX_PIXELS):
    """Uploaded bytes -> uint8 (C, H, W) through `data.decode`, the project's one decoder: the pixels a file of the
    same bytes gives (a JPEG decoded in draft mode at the model's size, as for a file: draft changes the pixels,
    so skipping it would break "same picture as the CLI"). The size is checked from the header before any pixel
    is decoded. Raises Refused(400) with a reason the page can show.
    """
    from .. import data as D

    if not data:
        raise Refused(400, "the upload is empty")
    try:
        return D.decode(io.BytesIO(data), in_chans, min_side=img_size, max_pixels=max_pixels, resize_to=img_size)
    except Exception as e:  # noqa: BLE001 -- every decoder failure is the upload's fault, told in a few words
        raise Refused(400, f"cannot read the upload: {D.describe_error(e)}") from None


def model_input(pixels, img_size: int, in_chans: int):
    """uint8 (C, H, W) -> (1, C, S, S) normalized: `data.eval_transform`, as reconstruct applies to a file."""
    from .. import data as D

    return D.eval_transform(img_size, in_chans)(pixels).unsqueeze(0)


def thumbnail_jpeg(path: Path, side: int = THUMB_SIDE, pixels=3, show_bands=None) -> bytes:
    """A small JPEG of a folder image for the page's grids (the whole image, EXIF orientation applied), read as the
    model reads it (`pixels`: data.Pixels); bands other than 8-bit RGB are pictured by picture.py's rule."""
    import torch
    from PIL import Image

    from .. import data as D
    from ..picture import view_for

    x = D.decode(path, pixels, min_side=side)
    if x.dtype != torch.uint8 or x.shape[0] != 3:
        view = view_for(x[None].float(), D.Pixels.of(pixels).units, show_bands)
        x = (view.show(x[None].float())[0] * 255).round().byte()
    arr = x.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")
    img.thumbnail((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def clean_name(name: str | None) -> str:
    """An upload's file name for captions: the last component, printable, short."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable()).strip()[:120]
    return name or "upload"
