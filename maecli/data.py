"""Images in, model input out: finding files, decoding any of them one way, the two transforms, and batching.

Two paths share `decode`: training (`PretrainDataset`, `EpochBatches`: random crops, where every random choice
is a function of (seed, epoch, index), so a resumed run sees exactly what an uninterrupted one would have), and
inference (`eval_batches`: the whole image, resized and center-cropped, in input order, used by embed,
reconstruct and probe), where a file that fails is either skipped and reported or an error.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torchvision.transforms import v2

from .errors import DataError
from .filelist import FileList, scan_images
from .readers import SUFFIXES as IMAGE_SUFFIXES  # the readers' table says which files are images
from .readers import Request, from_image, read

# The only decoders Image.open may try (the formats of IMAGE_SUFFIXES; a multi-picture JPEG opens as JPEG). Left to
# itself Pillow tries every format it knows, whatever the name: an EPS file would start Ghostscript.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image

__all__ = [
    "DataError",
    "find_images",
    "decode",
    "from_pil",
    "mean_std",
    "train_transform",
    "eval_transform",
    "PretrainDataset",
    "EpochBatches",
    "eval_batches",
]


def mean_std(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalization of model input: ImageNet's mean and std for RGB (as the paper), 0.5 and 0.5 for gray."""
    if in_chans == 3:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return (0.5,), (0.5,)


IMAGENET_MEAN_8BIT = tuple(round(255 * m, 6) for m in mean_std(3)[0])
IMAGENET_STD_8BIT = tuple(round(255 * m, 6) for m in mean_std(3)[1])


@dataclass(frozen=True)
class Pixels:
    """How files become model input: the bands the model takes (`bands`, 1-based in file order; None: all), their
    units ("8-bit": 0-255, 16-bit files scaled by 1/257 as maecli always did; "native": what the reader returns),
    and the per-band mean and std in those units (None: ImageNet's for 3 bands, 127.5 for others, at 8 bits)."""

    in_chans: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    bands: tuple[int, ...] | None = None
    units: str = "8-bit"

    @classmethod
    def of(cls, source) -> Pixels:
        """From an in_chans, a Pixels, or a model config (anything with in_chans, mean, std, bands, units)."""
        if isinstance(source, Pixels):
            return source
        if isinstance(source, int):
            return cls(source)
        return cls(source.in_chans, source.mean, source.std, source.bands, source.units)

    @property
    def wants_luminance(self) -> bool:
        """A 1-band model on all of a file's bands reads a colour photo as its luminance (PIL's "L")."""
        return self.in_chans == 1 and not self.bands

    def norm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.mean is not None and self.std is not None:
            return tuple(self.mean), tuple(self.std)
        if self.units == "native":
            return (0.0,) * self.in_chans, (1.0,) * self.in_chans
        if self.in_chans == 3:
            return IMAGENET_MEAN_8BIT, IMAGENET_STD_8BIT
        return (127.5,) * self.in_chans, (127.5,) * self.in_chans


def find_images(root: str | os.PathLike) -> FileList:
    """All image files under `root` at any depth, sorted by path relative to it, each with its size; hidden files
    and folders are ignored. A sequence of Paths kept as one buffer (filelist.FileList), shared by forked workers.

    Symlinked folders are followed once (a loop is visited once). `root` may also be a single file.
    """
    if not os.path.exists(root):
        raise DataError(f"{root} does not exist")
    return scan_images(root, IMAGE_SUFFIXES)


def to_array(img: Image.Image, in_chans: int) -> np.ndarray:
    """Any PIL mode -> uint8 array (H, W) for 1 channel or (H, W, 3) for 3 channels."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float32)
        if mode != "F" or arr.max() > 1.0:
            arr = arr / (257.0 if arr.max() > 255 else 1.0)
        else:
            arr = arr * 255.0
        gray = np.clip(arr, 0, 255).astype(np.uint8)
        return gray if in_chans == 1 else np.repeat(gray[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    target = "L" if in_chans == 1 else "RGB"
    return np.array(img if img.mode == target else img.convert(target))  # a writable copy for torch


def decode(
    source: str | os.PathLike | BinaryIO,
    in_chans: int | Pixels = 3,
    min_side: int | None = None,
    *,
    max_pixels: int | None = None,
    resize_to: int | None = None,
) -> torch.Tensor:
    """Read one image, a file or a binary file object (an upload's bytes), as a tensor (C, H, W) fit for the model
    (`in_chans`, or a Pixels: the bands it takes and their units): uint8 for 8-bit pictures, EXIF orientation
    applied, float32 in native units for the rest (readers.py), missing pixels NaN.

    `min_side` lets JPEG decoding skip resolution the crop will never use (PIL's draft mode keeps
    at least that many pixels on each side). `max_pixels` refuses a larger image, and `resize_to` (the side its
    shorter side will be resized to) one whose resize would be too large, both from the header before any pixel
    is decoded (check_size). Raises OSError/ValueError on anything undecodable.
    """
    px = Pixels.of(in_chans)
    request = Request(gray=px.wants_luminance, min_side=min_side, max_pixels=max_pixels, resize_to=resize_to)
    return fit(read(source, request).pixels, px)


def fit(arr: np.ndarray, px: Pixels) -> torch.Tensor:
    """A reader's pixels (C, H, W) -> the model's bands: --bands selected (1-based), one band repeated for a
    3-band model, 16-bit and float pictures scaled to 8 bits for a model of 8-bit units (as maecli always did)."""
    if px.bands:
        if max(px.bands) > arr.shape[0]:
            raise ValueError(f"the file has {arr.shape[0]} bands; the model reads bands {_listed(px.bands)}")
        arr = arr[[b - 1 for b in px.bands]]
    if arr.shape[0] != px.in_chans:
        if arr.shape[0] != 1 or px.in_chans != 3:
            raise ValueError(
                f"the file has {arr.shape[0]} bands; the model takes {px.in_chans} (choose them with --bands)"
            )
        arr = np.repeat(arr, 3, axis=0)
    if px.units == "8-bit" and arr.dtype != np.uint8:
        arr = to_8bit(arr)
    return torch.from_numpy(np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy())


def to_8bit(arr: np.ndarray) -> np.ndarray:
    """16-bit counts / 257, floats in [0, 1] x 255, clipped: how a model of 8-bit units has always read them."""
    top = float(np.nanmax(arr)) if arr.size else 0.0
    arr = arr / 257.0 if top > 255 else arr * 255.0 if top <= 1.0 else arr
    return np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)


def _listed(bands) -> str:
    return ",".join(str(b) for b in bands)


# The most pixels an image may have once its shorter side is resized to the model's size (200 MB as float32 RGB):
# a 1 x 200,000 PNG of a few hundred bytes would otherwise become 32 x 6,400,000 pixels at 32 px, 10 gigapixels at
# 224. Photos and panoramas stay far below it (a 10:1 panorama at 224 px is 0.5 megapixels).
MAX_RESIZED_PIXELS = 1 << 24


def check_size(width: int, height: int, *, max_pixels: int | None = None, resize_to: int | None = None) -> None:
    """Refuse (ValueError), from an image's header, one that would take too much memory to decode (more than
    `max_pixels`) or to resize (more than MAX_RESIZED_PIXELS once its shorter side is `resize_to`)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(
            f"the image has {width} x {height} = {width * height:,} pixels; the limit is {max_pixels:,} "
            "(a decompression bomb?)"
        )
    if resize_to is not None and min(width, height) > 0:
        long_side = max(width, height) * resize_to // min(width, height)
        if long_side * resize_to > MAX_RESIZED_PIXELS:
            raise ValueError(
                f"the image is {width} x {height}: resized to {resize_to} px on its shorter side it would have "
                f"{long_side * resize_to:,} pixels; the limit is {MAX_RESIZED_PIXELS:,} (too long and thin)"
            )


def from_pil(img: Image.Image, in_chans: int | Pixels = 3) -> torch.Tensor:
    """An image already opened (an upload, a notebook's PIL image) as `decode` returns a file."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF: keep the stored orientation, as decode does
        pass
    px = Pixels.of(in_chans)
    return fit(from_image(img, px.wants_luminance, to_array).pixels, px)


class FillMissing(torch.nn.Module):
    """NaN pixels (a nodata value, NaN floats) -> their band's mean, before any resize could spread them: they reach
    the model as 0 after normalization, never as NaN in the loss."""

    def __init__(self, px: Pixels):
        super().__init__()
        self.mean = torch.tensor(px.norm()[0]).view(-1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point() and bool(torch.isnan(x).any()):
            return torch.where(torch.isnan(x), self.mean.to(x.dtype), x)
        return x


class ToModelInput(torch.nn.Module):
    """Pixels (C, H, W) -> float32 normalized with the model's per-band mean and std, as v2.ToDtype + v2.Normalize
    do but in one pass over fresh memory (equal within 1e-6). For a model of 8-bit units, a float tensor handed in
    (the Python API's) is in [0, 1]."""

    def __init__(self, in_chans: int | Pixels):
        super().__init__()
        px = Pixels.of(in_chans)
        mean, std = (torch.tensor(v, dtype=torch.float64).view(-1, 1, 1) for v in px.norm())
        self.scale, self.shift = (1.0 / std).float(), (-mean / std).float()
        self.float_scale = 255.0 if px.units == "8-bit" else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale if x.dtype == torch.uint8 else self.scale * self.float_scale
        return x.to(torch.float32, copy=True).mul_(scale).add_(self.shift)


def denormalize(x: torch.Tensor, in_chans: int | Pixels) -> torch.Tensor:
    """Model input (N, C, H, W) back to pixels in the model's units (0-255 for 8-bit; native otherwise)."""
    mean, std = Pixels.of(in_chans).norm()
    mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x * std + mean


def train_transform(img_size: int, in_chans: int | Pixels) -> v2.Compose:
    """The paper's pretraining augmentation, on tensors of any band count: random resized crop, flip, normalize."""
    px = Pixels.of(in_chans)
    return v2.Compose(
        [
            FillMissing(px),
            v2.RandomResizedCrop(
                img_size, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(),
            ToModelInput(px),
        ]
    )


def eval_transform(img_size: int, in_chans: int | Pixels) -> v2.Compose:
    """Resize the shorter side, then center-crop: the whole image as the model sees it at inference."""
    px = Pixels.of(in_chans)
    return v2.Compose(
        [
            FillMissing(px),
            v2.Resize(img_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(img_size),
            ToModelInput(px),
        ]
    )


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**63 - 1)


class PretrainDataset(torch.utils.data.Dataset):
    """Items are (epoch, index) pairs; returns (image tensor, [paths that failed]).

    An unreadable file is replaced by the next readable one (so batches keep their size and ranks
    stay in step), and its path travels back with the batch to be warned about and counted.
    """

    def __init__(self, paths: list[Path], img_size: int, in_chans: int | Pixels, seed: int):
        self.paths = paths
        self.in_chans = in_chans
        self.seed = seed
        self.transform = train_transform(img_size, in_chans)
        self.min_side = 2 * img_size  # a crop at scale 0.2 still gets full resolution
        # Files found unusable in this process, never read again: every slot that wraps past a run of bad files
        # would otherwise decode each of them anew (a folder of junk is then read once per image, not once).
        # Each failure was reported the first time; a substitute is the same whether a bad file is read or known.
        self.unusable: set[int] = set()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, int]]) -> list:
        """A micro-batch at once (the DataLoader calls this with a batch sampler): every file decoded first, then
        every crop drawn. Each phase over the whole batch keeps its code and data warm in the caches (faster than
        image by image; the same tensors)."""
        loaded = [self._load(index, first=0, failed=[]) for _, index in items]
        out = []
        # Seeded by the slot, not the file, so a substitute gets the crop the slot would have had. The CPU generator
        # is all the transforms draw from; torch.manual_seed would also seed every accelerator backend, per image.
        with torch.random.fork_rng(devices=[]):
            for (epoch, index), (img, attempt, failed) in zip(items, loaded):
                while True:
                    torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
                    try:
                        x = self.transform(img)
                        break
                    except Exception as e:  # a file that decodes but cannot be cropped: skip it too
                        bad = (index + attempt) % len(self.paths)
                        self.unusable.add(bad)
                        failed.append((str(self.paths[bad]), describe_error(e, self.paths[bad])))
                        img, attempt, failed = self._load(index, attempt + 1, failed)
                out.append((x, failed))
        return out

    def _load(self, index: int, first: int, failed: list) -> tuple[torch.Tensor, int, list]:
        """The first file from slot `index` on (trying the next ones) that decodes: (pixels, attempt, failures)."""
        for attempt in range(first, len(self.paths)):
            i = (index + attempt) % len(self.paths)
            if i in self.unusable:
                continue
            path = self.paths[i]
            try:
                return decode(path, self.in_chans, self.min_side), attempt, failed
            except Exception as e:  # any failure to decode means "skip this file"
                self.unusable.add(i)
                failed.append((str(path), describe_error(e, path)))
        raise DataError("no readable image left in the data folder")


def describe_error(e: Exception, path: str | os.PathLike | None = None) -> str:
    """Why a file was skipped, in a few words."""
    if isinstance(e, FileNotFoundError):
        if path is not None and os.path.islink(path):
            return "broken symbolic link"
        return "file not found (deleted?)"
    if isinstance(e, OSError) and e.errno == errno.ELOOP:
        return "symbolic link loop"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, Image.DecompressionBombWarning | Image.DecompressionBombError):
        return "too many pixels (possible decompression bomb)"
    if isinstance(e, Image.UnidentifiedImageError):
        return "not a readable image"
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return msg[:200]


def worker_init(_worker_id: int) -> None:
    """Loader workers leave Ctrl-C and SIGTERM to the main process, which checkpoints and shuts them down.

    Without this, Ctrl-C in a terminal reaches the whole process group and a dying worker aborts the run.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def collate(items):
    xs, failed = zip(*items)
    return torch.stack(xs), [f for fs in failed for f in fs]


@dataclass
class EpochBatches:
    """The micro-batches one rank sees, from (start_epoch, start_micro) to the end of `epochs`.

    Each epoch is a seeded permutation of all images, padded by wrapping so every rank gets the same
    count, then dealt out rank by rank: ranks see disjoint images.
    """

    n: int
    batch_size: int
    seed: int
    epochs: int
    start_epoch: int = 0
    start_micro: int = 0
    rank: int = 0
    world: int = 1
    shuffle: bool = True

    def micro_per_epoch(self) -> int:
        return math.ceil(math.ceil(self.n / self.world) / self.batch_size)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's indices in `epoch`, as one int64 tensor (a million Python ints would be 36 MB)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + 1_000 * epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        per_rank = math.ceil(self.n / self.world)
        perm = perm.repeat(1 + per_rank * self.world // max(self.n, 1))[: per_rank * self.world]
        return perm[self.rank :: self.world]

    def __iter__(self):
        for epoch in range(self.start_epoch, self.epochs):
            idx = self.epoch_indices(epoch)
            first = self.start_micro if epoch == self.start_epoch else 0
            for b in range(first, self.micro_per_epoch()):
                yield [(epoch, i) for i in idx[b * self.batch_size : (b + 1) * self.batch_size].tolist()]

    def __len__(self):
        return (self.epochs - self.start_epoch) * self.micro_per_epoch() - self.start_micro


def first_readable(paths: list[Path], in_chans: int | Pixels) -> tuple[int, list[tuple[str, str]]]:
    """Index of the first image that decodes, and the failures before it; DataError if none does."""
    failed = []
    for i, p in enumerate(paths):
        try:
            decode(p, in_chans, min_side=64)
            return i, failed
        except Exception as e:
            failed.append((str(p), describe_error(e, p)))
    raise DataError(f"none of the {len(paths)} image files could be read")


# ----------------------------------------------------------------------------------------------
# Inference: whole images in input order, for embed, reconstruct and probe


class EvalImages(torch.utils.data.Dataset):
    """Items are (position, source); a source is a path, a PIL image or a (C, H, W) image tensor (uint8, or float
    in [0, 1]). Returns (position, model input (C, S, S) or None, failure or None), where a failure is
    (missing, why): the caller's error policy decides whether it ends the command."""

    def __init__(self, img_size: int, in_chans: int | Pixels):
        self.in_chans = Pixels.of(in_chans)
        self.transform = eval_transform(img_size, self.in_chans)
        self.min_side = img_size  # JPEG draft mode may drop resolution the resize would throw away

    def load(self, source) -> torch.Tensor:
        if isinstance(source, Image.Image):
            check_size(source.width, source.height, resize_to=self.min_side)
            return from_pil(source, self.in_chans)
        if isinstance(source, torch.Tensor):
            if source.ndim != 3 or source.shape[0] != self.in_chans.in_chans:
                raise ValueError(
                    f"expected an image tensor of shape ({self.in_chans.in_chans}, H, W), got {tuple(source.shape)}"
                )
            check_size(source.shape[2], source.shape[1], resize_to=self.min_side)
            return source
        return decode(source, self.in_chans, self.min_side, resize_to=self.min_side)

    def __getitem__(self, item):
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list) -> list:
        """A batch at once: every source decoded first, then every one resized (as PretrainDataset does)."""
        loaded = []
        for position, source in items:
            try:
                loaded.append((position, source, self.load(source), None))
            except Exception as e:  # any decoder failure is reported per file, never a crash
                loaded.append((position, source, None, e))
        out = []
        for position, source, img, error in loaded:
            if error is None:
                try:
                    out.append((position, self.transform(img), None))
                    continue
                except Exception as e:
                    error = e
            path = source if isinstance(source, (str, os.PathLike)) else None
            # a broken symlink is a bad file in the folder, not a path the user got wrong
            missing = isinstance(error, FileNotFoundError) and not (path and os.path.islink(path))
            out.append((position, None, (missing, describe_error(error, path))))
        return out


def _collate_eval(items):
    positions = [p for p, x, _ in items if x is not None]
    xs = [x for _, x, _ in items if x is not None]
    failed = [(p, f) for p, _, f in items if f is not None]
    return positions, torch.stack(xs) if xs else None, failed


PAUSE = object()  # a source that says "the input paused": the batch being filled goes out as it is


def _numbered_batches(sources: Iterable, batch_size: int, pending: dict, failure: list) -> Iterator[list]:
    """Numbered sources in lists of batch_size, pulled lazily; each in-flight one is kept in `pending`.

    A PAUSE among the sources (a slow pipe, see `paced`) sends the batch so far at once, even an empty one: the
    DataLoader pulls batches ahead of the ones it hands out, and waiting here for a full one would hold back the
    results of those before it. An error while pulling sources (stdin that cannot be read, a folder that vanished)
    ends the batches here and waits in `failure`: raised inside the DataLoader's machinery, it could leave its
    workers running.
    """
    it, position, end = iter(sources), 0, object()
    while not failure:
        batch, paused = [], False
        try:
            while len(batch) < batch_size:
                source = next(it, end)
                if source is end:
                    break
                if source is PAUSE:
                    paused = True
                    break
                batch.append((position, source))
                position += 1
        except Exception as e:  # raised by eval_batches once the batches before it are through
            failure.append(e)
        if not batch and not paused:
            return
        pending.update(batch)
        yield batch


def paced(lines: Iterable, pause: float = 0.2) -> Iterator:
    """`lines` read in a thread, with a PAUSE whenever none has come for `pause` seconds: a pipeline that feeds
    paths slowly gets each result soon after its path, not once a whole batch has arrived."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=4096)
    end = object()

    def read():
        try:
            for line in lines:
                q.put(line)
        except BaseException as e:  # handed to the consumer, which raises it in order
            q.put(e)
        q.put(end)

    threading.Thread(target=read, daemon=True).start()
    while True:
        try:
            item = q.get(timeout=pause)
        except queue.Empty:
            yield PAUSE
            continue
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


OnError = Callable[[object, str, bool], None]  # (source, why, missing): skip it and report, or raise


def eval_batches(
    sources: Iterable,
    img_size: int,
    in_chans: int | Pixels,
    *,
    batch_size: int = 64,
    workers: int = 0,
    on_error: OnError | None = None,
    pin_memory: bool = False,
) -> Iterator[tuple[list, torch.Tensor]]:
    """Yield (sources, model input (B, C, S, S)) batch by batch, in input order, each image whole: its shorter side
    resized to `img_size`, then center-cropped.

    `sources` is read lazily: at most (2 x workers + 1) batches are in flight, so a stream of any length flows
    through in flat memory. The error policy: a source that cannot be read goes to on_error(source, why, missing)
    and is left out; without on_error it raises DataError. Loader workers are shut down however the loop ends.
    """
    pending: dict[int, object] = {}
    failure: list[Exception] = []
    loader = torch.utils.data.DataLoader(
        EvalImages(img_size, in_chans),
        batch_sampler=_numbered_batches(sources, batch_size, pending, failure),
        num_workers=workers,
        collate_fn=_collate_eval,
        worker_init_fn=worker_init,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers > 0 else None,
    )
    it = None
    try:
        it = iter(loader)
        for positions, x, failed in it:
            for position, (missing, why) in failed:
                source = pending.pop(position)
                if on_error is None:
                    raise DataError(f"{source} does not exist" if missing else f"cannot read image {source}: {why}")
                on_error(source, why, missing)
            if x is not None:
                yield [pending.pop(p) for p in positions], x
        if failure:
            raise failure[0]
    finally:
        shutdown_workers(it)


def shutdown_workers(it) -> None:
    """Stop a DataLoader iterator's worker processes now (they ignore SIGINT and SIGTERM: see worker_init)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
