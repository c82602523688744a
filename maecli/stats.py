"""Statistics from the data, measured once before training on a seeded sample of the folder: how many bands its
files have (a folder that disagrees is refused), whether they are 8-bit pictures, and each band's mean and std,
which the run records with its weights and every later command normalizes with."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .console import Progress, console, plural
from .errors import DataError
from .readers import Request, read

SAMPLE = 256  # files read for the statistics: per-band means settle well within a percent at a few hundred


@dataclass
class DataStats:
    """What the sample says: the model's bands, their units and normalization, and what was seen."""

    in_chans: int
    units: str  # "8-bit" or "native", as data.Pixels
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bands: tuple[int, ...] | None
    files: int  # sampled files read
    unreadable: int
    missing: float  # fraction of pixels that were NaN or nodata
    imagenet: bool

    def summary(self) -> str:
        mean = ", ".join(f"{m:.4g}" for m in self.mean[:8]) + (", ..." if len(self.mean) > 8 else "")
        std = ", ".join(f"{s:.4g}" for s in self.std[:8]) + (", ..." if len(self.std) > 8 else "")
        source = "ImageNet's (8-bit RGB: what published weights expect)" if self.imagenet else "measured"
        line = (
            f"{plural(self.in_chans, 'band')}, {self.units} units; {source} mean {mean}, std {std} "
            f"(from {plural(self.files, 'file')})"
        )
        if self.missing:
            line += f"; {self.missing:.2%} of pixels missing (NaN or nodata): filled with their band's mean"
        return line


def sample(paths: list[Path], seed: int, size: int = SAMPLE) -> list[Path]:
    """A seeded sample of `size` files, in their listed order (all of them when there are fewer)."""
    if len(paths) <= size:
        return list(paths)
    chosen = sorted(random.Random(seed).sample(range(len(paths)), size))
    return [paths[i] for i in chosen]


@dataclass
class _Sums:
    """Per band (of one file): pixel count, sum and sum of squares over finite pixels, in float64."""

    n: np.ndarray
    s: np.ndarray
    ss: np.ndarray

    @classmethod
    def of(cls, arr: np.ndarray) -> _Sums:
        flat = arr.reshape(arr.shape[0], -1).astype(np.float64)
        ok = np.isfinite(flat)
        flat = np.where(ok, flat, 0.0)
        return cls(ok.sum(axis=1), flat.sum(axis=1), (flat * flat).sum(axis=1))


def measure(
    paths: list[Path],
    *,
    in_chans: int | None = None,
    bands: tuple[int, ...] | None = None,
    seed: int = 0,
    min_side: int | None = None,
    size: int = SAMPLE,
    quiet: bool = False,
) -> DataStats:
    """Read a seeded sample of `paths` and return the model's input statistics. DataError when none is readable,
    when the files disagree on their band count (naming a file of each), or when --bands/--in-chans ask for
    bands the files lack."""
    chosen = sample(paths, seed, size)
    request = Request(gray=in_chans == 1 and not bands, min_side=min_side)
    first: dict[int, Path] = {}  # band count -> first file with it
    per_file: list[tuple[int, _Sums]] = []
    eight_bit, unreadable, missing, pixels = True, 0, 0, 0
    with Progress("statistics", total=len(chosen), enabled=not quiet) as progress:
        for path in chosen:
            progress.advance()
            try:
                decoded = read(path, request)
            except Exception:  # unreadable files are the training loop's to warn about and count
                unreadable += 1
                continue
            arr = decoded.pixels
            first.setdefault(arr.shape[0], path)
            eight_bit &= arr.dtype == np.uint8
            missing += decoded.missing
            pixels += arr.shape[1] * arr.shape[2]
            if bands and max(bands) <= arr.shape[0]:
                arr = arr[[b - 1 for b in bands]]
            per_file.append((arr.shape[0], _Sums.of(arr)))
    if not per_file:
        raise DataError(f"none of the {len(chosen)} sampled image files could be read")
    chans = _channels(first, in_chans, bands)
    units = "8-bit" if eight_bit else "native"
    imagenet = units == "8-bit" and chans == 3 and not bands
    if imagenet:
        from .data import IMAGENET_MEAN_8BIT, IMAGENET_STD_8BIT

        mean, std = IMAGENET_MEAN_8BIT, IMAGENET_STD_8BIT
    else:
        mean, std = _mean_std(per_file, chans)
    stats = DataStats(chans, units, mean, std, bands, len(per_file), unreadable, missing / max(pixels, 1), imagenet)
    if not quiet:
        console.print(f"statistics: {stats.summary()}")
    return stats


def _channels(first: dict[int, Path], in_chans: int | None, bands: tuple[int, ...] | None) -> int:
    """The model's band count: --bands' length, --in-chans, or the files' own; gray and colour pictures mix (a gray
    one is repeated into three bands), other counts must agree."""
    counts = sorted(first)
    if len(counts) > 1 and set(counts) != {1, 3}:
        listed = ", ".join(f"{first[c]} has {plural(c, 'band')}" for c in counts)
        raise DataError(f"the files disagree on their band count: {listed}; give the model one kind of file")
    have = max(counts)
    if bands:
        if max(bands) > min(counts):
            raise DataError(
                f"--bands {','.join(map(str, bands))} asks for band {max(bands)}, but {first[min(counts)]} has "
                f"{plural(min(counts), 'band')}"
            )
        if in_chans is not None and in_chans != len(bands):
            raise DataError(f"--in-chans {in_chans} disagrees with --bands, which selects {len(bands)}")
        return len(bands)
    if in_chans is None:
        return have
    if in_chans != have and not (in_chans == 1 and have == 3) and not (in_chans == 3 and have == 1):
        raise DataError(
            f"--in-chans {in_chans}, but {first[have]} has {plural(have, 'band')}; choose {in_chans} with --bands"
        )
    return in_chans


def _mean_std(per_file: list[tuple[int, _Sums]], chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band mean and std over every finite pixel of the sample; a one-band file counts for each of 3 bands."""
    n, s, ss = np.zeros(chans), np.zeros(chans), np.zeros(chans)
    for count, sums in per_file:
        repeat = chans if count == 1 and chans != 1 else 1
        n += np.repeat(sums.n, repeat)[:chans]
        s += np.repeat(sums.s, repeat)[:chans]
        ss += np.repeat(sums.ss, repeat)[:chans]
    mean = s / np.maximum(n, 1)
    std = np.sqrt(np.maximum(ss / np.maximum(n, 1) - mean * mean, 0.0))
    std = np.where(std > 0, std, 1.0)  # a flat band: nothing to scale
    return tuple(float(m) for m in mean), tuple(float(v) for v in std)
