"""A folder of awkward and broken image files, built byte by byte, for every command that reads images;
and a hostile pickle, for every command that reads weights.

`make_bad_images(root)` writes the folder and returns what each file is; `conftest.bad_images_dir` is the
fixture. Files marked usable must decode (and train); the others must be skipped with a warning, never crash.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"

# Running as root (CI containers) ignores permission bits, so a chmod 000 file stays readable there.
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass(frozen=True)
class BadImage:
    what: str  # what the file is, for test ids and messages
    usable: bool  # decodes to an image a model can take
    shape: tuple[int, int] | None = None  # (height, width) after decoding, where it matters


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header that claims width x height pixels, with one tiny compressed row behind it.

    Decoding it for real would need tens of gigabytes; a reader must refuse it from the header alone.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def zero_size_png() -> bytes:
    """A PNG header with a width of 0: well-formed bytes, no pixels."""
    ihdr = struct.pack(">IIBBBBB", 0, 16, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def _noise(h: int, w: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


# name -> what it is. Permission-dependent entries are resolved in make_bad_images.
CORPUS: dict[str, BadImage] = {
    "good/photo.jpg": BadImage("an ordinary RGB photo", True),
    "good/gray.png": BadImage("an ordinary grayscale PNG", True),
    "good/noise.png": BadImage("an RGB PNG of noise", True, (40, 48)),
    "empty.jpg": BadImage("a zero-byte file", False),
    "truncated.jpg": BadImage("a JPEG cut off halfway", False),
    "text.jpg": BadImage("a text file named .jpg", False),
    "random.png": BadImage("random bytes named .png", False),
    "rgba.png": BadImage("an RGBA PNG with transparent areas", True, (24, 30)),
    "palette_transparent.png": BadImage("a palette PNG with a transparent colour (tRNS)", True, (20, 20)),
    "la.png": BadImage("a grayscale + alpha PNG", True, (12, 16)),
    "gray16.png": BadImage("a 16-bit grayscale PNG", True, (18, 22)),
    "bilevel.png": BadImage("a 1-bit black-and-white PNG", True, (16, 16)),
    "float.tif": BadImage("a 32-bit float TIFF", True, (10, 12)),
    "cmyk.jpg": BadImage("a CMYK JPEG", True, (20, 28)),
    "exif_rotated.jpg": BadImage("a 40x20 JPEG whose EXIF says rotate 90 degrees", True, (40, 20)),
    "animated.gif": BadImage("an animated GIF of 3 frames", True, (16, 16)),
    "one_pixel.png": BadImage("a 1x1 image", True, (1, 1)),
    "smaller_than_patch.png": BadImage("a 5x3 image, smaller than one patch", True, (3, 5)),
    "thin_strip.png": BadImage("a 400x2 strip", True, (2, 400)),
    "png_named.jpg": BadImage("a PNG named .jpg", True, (14, 14)),
    "bomb.png": BadImage("a PNG header claiming 100000x100000 pixels (decompression bomb)", False),
    "zero_width.png": BadImage("a PNG header claiming a width of 0", False),
    "deleted.jpg": BadImage("a file deleted after discovery (the test deletes it)", False),
    # root reads it anyway; test_bad_inputs checks the unreadable case as an unprivileged user
    "no_permission.jpg": BadImage("a JPEG without read permission (readable to root)", IS_ROOT),
    "broken_link.jpg": BadImage("a symlink to a file that does not exist", False),
    "loop_a.jpg": BadImage("a symlink loop (loop_a.jpg -> loop_b.jpg -> loop_a.jpg)", False),
    "loop_b.jpg": BadImage("the other half of the symlink loop", False),
    "pipe.jpg": BadImage("a named pipe (FIFO) named .jpg: opening it would block", False),
    "sub/link_to_good.jpg": BadImage("a symlink to good/photo.jpg", True),
}
# Not images at all: a reader must not list these as image files.
NOT_LISTED = {
    "folder.jpg/": "a folder named like an image",
    "sub/parent_loop/": "a symlink to its own parent folder (a folder loop)",
    "notes.txt": "a text file with a non-image suffix",
    ".hidden.png": "a hidden file",
}

# What a folder scan must report: every CORPUS entry, once, in sorted order.
LISTED = sorted(CORPUS)


def unusable() -> set[str]:
    return {name for name, b in CORPUS.items() if not b.usable}


def usable() -> set[str]:
    return {name for name, b in CORPUS.items() if b.usable}


def describe(root: Path) -> str:
    """One line per file: its name and what it is (for a reader of a failing test)."""
    lines = [f"{name:28s} {'usable' if b.usable else 'skip  '} {b.what}" for name, b in CORPUS.items()]
    lines += [f"{name:28s} ignored {what}" for name, what in NOT_LISTED.items()]
    return f"bad-image corpus in {root}:\n" + "\n".join(lines)


def make_bad_images(root: Path) -> dict[str, BadImage]:
    """Write the corpus under `root` and return CORPUS. The file named deleted.jpg is a valid
    JPEG: tests remove it after discovery to simulate a file vanishing mid-run."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "good").mkdir()
    (root / "sub").mkdir()
    photo = next(p for p in sorted(EXAMPLES.glob("*.jpg")))
    shutil.copy(photo, root / "good/photo.jpg")
    Image.open(next(p for p in sorted(EXAMPLES.glob("*gray.png")))).save(root / "good/gray.png")
    Image.fromarray(_noise(40, 48, 3, 1)).save(root / "good/noise.png")

    (root / "empty.jpg").write_bytes(b"")
    data = photo.read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "text.jpg").write_text("this is a text file, not a picture\n" * 20)
    (root / "random.png").write_bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes())

    rgba = np.dstack([_noise(24, 30, 3, 3), np.where(np.arange(30) < 15, 0, 255).astype(np.uint8)[None].repeat(24, 0)])
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    pal = Image.fromarray(_noise(20, 20, 1, 4) // 64).convert("P")  # 4 colours in a palette
    pal.save(root / "palette_transparent.png", transparency=0)
    Image.fromarray(np.dstack([_noise(12, 16, 1, 5), _noise(12, 16, 1, 6)]), "LA").save(root / "la.png")
    Image.fromarray(_noise(18, 22, 1, 7).astype(np.uint16) * 257).save(root / "gray16.png")
    Image.fromarray(_noise(16, 16, 1, 8) > 127).save(root / "bilevel.png")
    Image.fromarray(_noise(10, 12, 1, 9).astype(np.float32) / 255.0, "F").save(root / "float.tif")
    Image.fromarray(_noise(20, 28, 3, 10)).convert("CMYK").save(root / "cmyk.jpg", quality=90)

    rotated = Image.fromarray(_noise(20, 40, 3, 11))
    exif = rotated.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    (root / "exif_rotated.jpg").write_bytes(_jpeg_bytes(rotated, exif=exif))

    frames = [Image.fromarray(_noise(16, 16, 3, 12 + i)).convert("P") for i in range(3)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    Image.fromarray(_noise(1, 1, 3, 15)).save(root / "one_pixel.png")
    Image.fromarray(_noise(3, 5, 3, 16)).save(root / "smaller_than_patch.png")
    Image.fromarray(_noise(2, 400, 3, 17)).save(root / "thin_strip.png")
    Image.fromarray(_noise(14, 14, 3, 18)).save(root / "png_named.jpg", format="PNG")

    (root / "bomb.png").write_bytes(bomb_png())
    (root / "zero_width.png").write_bytes(zero_size_png())
    shutil.copy(photo, root / "deleted.jpg")
    shutil.copy(photo, root / "no_permission.jpg")
    os.chmod(root / "no_permission.jpg", 0)
    os.symlink("does_not_exist.jpg", root / "broken_link.jpg")
    os.symlink("loop_b.jpg", root / "loop_a.jpg")
    os.symlink("loop_a.jpg", root / "loop_b.jpg")
    os.mkfifo(root / "pipe.jpg")
    os.symlink("../good/photo.jpg", root / "sub/link_to_good.jpg")

    (root / "folder.jpg").mkdir()
    os.symlink("..", root / "sub/parent_loop")
    (root / "notes.txt").write_text("not an image")
    Image.fromarray(_noise(8, 8, 3, 19)).save(root / ".hidden.png")
    return CORPUS


class WritesAFile:
    """Unpickling this runs a shell command that writes `marker`: what a malicious weights file does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))
