"""The one rule that turns C bands into a picture for eyes: a composite of three chosen bands (or one, in gray),
each mapped to [0, 1] by the model's 8-bit range or, for data in native units, by a percentile stretch that the
picture's legend states. Used by reconstruct, the previews, serve and the trackers (all through reconstruct)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UsageError

STRETCH = (2.0, 98.0)  # percentiles mapped to black and white for data that is not 8-bit


@dataclass
class View:
    """Which of the model's channels are shown (0-based, 3 or 1 of them) and the values shown black and white."""

    channels: list[int]
    low: torch.Tensor  # (k,)
    high: torch.Tensor  # (k,)
    how: str  # one sentence for the legend; "" for 8-bit pictures shown as they are

    def show(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in the model's units -> (N, k, H, W) in [0, 1]; missing values black."""
        low, high = self.low.view(1, -1, 1, 1), self.high.view(1, -1, 1, 1)
        out = (x[:, self.channels].float() - low) / (high - low)
        return out.nan_to_num(0.0).clamp(0, 1)


def default_channels(in_chans: int) -> tuple[int, ...]:
    """What is shown without --show-bands: the first three bands as red, green, blue; one band in gray."""
    return (1, 2, 3) if in_chans >= 3 else (1,)


def check_show_bands(show_bands: tuple[int, ...] | None, in_chans: int) -> tuple[int, ...]:
    """--show-bands, 1-based over the model's channels: three (a composite) or one (gray). UsageError otherwise."""
    if not show_bands:
        return default_channels(in_chans)
    if len(show_bands) not in (1, 3):
        raise UsageError(f"--show-bands takes 3 bands (red, green, blue) or 1 (gray), got {len(show_bands)}")
    for b in show_bands:
        if not 1 <= b <= in_chans:
            raise UsageError(f"--show-bands {b}: the model has {in_chans} bands, numbered 1 to {in_chans}")
    return tuple(show_bands)


def view_for(x: torch.Tensor, units: str, show_bands: tuple[int, ...] | None = None) -> View:
    """The view of images `x` (N, C, H, W, in the model's units): 8-bit ones as they are (0-255); others stretched,
    band by band, from their 2nd to their 98th percentile over all of `x` (so every column of a picture shares it)."""
    bands = check_show_bands(show_bands, x.shape[1])
    channels = [b - 1 for b in bands]
    if units == "8-bit":
        k = len(channels)
        how = f"Bands {','.join(map(str, bands))} shown as RGB. " if show_bands and x.shape[1] != 3 else ""
        return View(channels, torch.zeros(k), torch.full((k,), 255.0), how)
    low, high = [], []
    for c in channels:
        values = x[:, c].float().flatten()
        values = values[torch.isfinite(values)]
        if values.numel() > 1 << 24:  # torch.quantile's limit; a strided subsample gives the same percentiles
            values = values[:: values.numel() // (1 << 23)]
        lo, hi = (torch.quantile(values, q / 100).item() for q in STRETCH) if values.numel() else (0.0, 1.0)
        low.append(lo)
        high.append(hi if hi > lo else lo + 1.0)
    shown = f"bands {','.join(map(str, bands))} as RGB" if len(bands) == 3 else f"band {bands[0]} in gray"
    ranges = ", ".join(f"{lo:.4g}..{hi:.4g}" for lo, hi in zip(low, high))
    how = f"Shown: {shown}, each stretched from its 2nd to its 98th percentile ({ranges}). "
    return View(channels, torch.tensor(low), torch.tensor(high), how)
