"""Labelled folders: one subfolder per class, split into training and validation images.

Read the same way by `maecli probe` (and by any command that needs labels): DATA/train + DATA/val (or
DATA/test), or DATA with a separate validation folder, or a seeded stratified split of DATA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .data import find_images
from .errors import DataError, UsageError


@dataclass
class Split:
    paths: list[str]
    labels: list[int]


@dataclass
class Labelled:
    classes: list[str]
    train: Split
    val: Split
    layout: str  # how the split was made, for the user


def class_folders(root: str | Path) -> dict[str, list[Path]]:
    """{class name: its images}, one class per (non-hidden) subfolder; DataError for a layout a probe cannot use."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        found = f" ({classes[0]})" if classes else ""
        raise DataError(
            f"{root} holds {len(classes)} class folder(s){found}; a probe needs one subfolder per class, at least two"
        )
    images = {c: find_images(root / c) for c in classes}
    empty = [c for c, paths in images.items() if not paths]
    if empty:
        raise DataError(f"class folder(s) with no images in {root}: {', '.join(empty)}")
    return images


def stratified_split(images: dict[str, list[Path]], fraction: float, seed: int):
    """Hold out round(n x fraction) images of each class (at least one, never all), chosen by `seed`."""
    train, val = {}, {}
    for c, paths in images.items():
        if len(paths) < 2:
            raise DataError(f"class {c} has only {len(paths)} image; --val-split needs at least 2 per class")
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(paths), generator=g).tolist()
        n_val = min(len(paths) - 1, max(1, round(len(paths) * fraction)))
        val[c] = sorted(paths[i] for i in order[:n_val])
        train[c] = sorted(paths[i] for i in order[n_val:])
    return train, val


def load_labelled(
    data: str | Path, val: str | Path | None = None, val_split: float | None = None, seed: int = 0
) -> Labelled:
    """The train and validation images of a labelled folder.

    DATA/train + DATA/val (or DATA/test) when present; else DATA and `val`; else a stratified split of DATA.
    """
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"{data} is not a folder" if data.exists() else f"{data} does not exist")
    val_dir = next((data / n for n in ("val", "test") if (data / n).is_dir()), None)
    if (data / "train").is_dir() and val_dir is not None:
        if val is not None or val_split is not None:
            raise DataError(f"{data} already holds train/ and {val_dir.name}/; drop --val/--val-split")
        train, valid = class_folders(data / "train"), class_folders(val_dir)
        layout = f"{data / 'train'} and {val_dir}"
    elif val is not None:
        if val_split is not None:
            raise UsageError("--val and --val-split contradict each other; pick one")
        train, valid = class_folders(data), class_folders(val)
        layout = f"{data} and {val}"
    else:
        if (data / "train").is_dir():
            raise DataError(
                f"{data} holds train/ but no val/ or test/; pass --val DIR, or point DATA at "
                f"{data / 'train'} to split it"
            )
        fraction = 0.2 if val_split is None else val_split
        if not 0 < fraction < 1:
            raise UsageError(f"--val-split must lie strictly between 0 and 1, got {fraction}")
        train, valid = stratified_split(class_folders(data), fraction, seed)
        layout = f"{data}, {fraction:g} of each class held out (seed {seed})"
    if set(train) != set(valid):
        only_train, only_val = sorted(set(train) - set(valid)), sorted(set(valid) - set(train))
        raise DataError(
            "classes differ between train and val: "
            + "; ".join(
                f"only in {name}: {', '.join(names)}"
                for name, names in (("train", only_train), ("val", only_val))
                if names
            )
        )
    classes = sorted(train)

    def flatten(images):
        pairs = [(str(p), i) for i, c in enumerate(classes) for p in images[c]]
        return Split([p for p, _ in pairs], [y for _, y in pairs])

    return Labelled(classes, flatten(train), flatten(valid), layout)
