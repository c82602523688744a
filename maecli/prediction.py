"""Predictions: each whole image through a fine-tuned classifier, streamed in input order as `embed` streams vectors.

`predict()` is the Python entry point; `write_predictions()` is the command's pipeline (inputs and stdin as embed
reads them, jsonl or csv out, unreadable files warned and counted).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator

import torch
from PIL import Image

from . import data as D
from .embedding import Inputs, forward_batches


def stream(
    model,
    sources: Iterable,
    *,
    batch_size: int = 64,
    workers: int = 0,
    precision: str = "no",
    on_error: D.OnError | None = None,
) -> Iterator[tuple[list, torch.Tensor]]:
    """Yield (sources, class probabilities (B, K) float32 on the CPU) batch by batch, in input order; images are
    read as for validation (data.eval_batches: shorter side resized, center-cropped)."""
    for items, logits in forward_batches(
        model, model, sources, batch_size=batch_size, workers=workers, precision=precision, on_error=on_error
    ):
        yield items, logits.float().softmax(dim=-1)


def predict(model, paths_or_images, *, batch_size: int = 64, workers: int = 0, precision: str = "no") -> torch.Tensor:
    """Class probabilities (N, K) float32 for paths, PIL images or (C, H, W) tensors, in input order."""
    items = paths_or_images
    if isinstance(items, (str, os.PathLike, Image.Image)) or (isinstance(items, torch.Tensor) and items.ndim == 3):
        items = [items]
    chunks = [p for _, p in stream(model, items, batch_size=batch_size, workers=workers, precision=precision)]
    return torch.cat(chunks) if chunks else torch.empty(0, model.num_classes)


class JsonlWriter:
    """{"path", "class", "probability", "top_k": [{"class", "probability"}, ...]} per line."""

    def __init__(self, out, classes: list[str], k: int):
        self.out, self.classes, self.k = out, classes, k

    def write(self, paths: list[str], probs: torch.Tensor):
        values, indices = probs.topk(self.k, dim=1)
        for path, vs, ids in zip(paths, values.tolist(), indices.tolist()):
            top = [{"class": self.classes[i], "probability": round(v, 6)} for v, i in zip(vs, ids)]
            self.out.write(
                json.dumps({"path": path, "class": top[0]["class"], "probability": top[0]["probability"], "top_k": top})
                + "\n"
            )


class CsvWriter:
    """path,class,probability, then class_2,probability_2 ... up to k."""

    def __init__(self, out, classes: list[str], k: int):
        import csv

        self.rows, self.classes, self.k = csv.writer(out, lineterminator="\n"), classes, k
        extra = [name for i in range(2, k + 1) for name in (f"class_{i}", f"probability_{i}")]
        self.rows.writerow(["path", "class", "probability", *extra])

    def write(self, paths: list[str], probs: torch.Tensor):
        values, indices = probs.topk(self.k, dim=1)
        self.rows.writerows(
            [path, *(x for v, i in zip(vs, ids) for x in (self.classes[i], f"{v:.6f}"))]
            for path, vs, ids in zip(paths, values.tolist(), indices.tolist())
        )


def write_predictions(
    model,
    classes: list[str],
    inputs: list[str],
    *,
    out,
    fmt: str = "jsonl",
    top_k: int = 5,
    batch_size: int = 64,
    workers: int = 0,
    precision: str = "no",
    strict: bool = False,
    stdin=None,
    console=None,
) -> dict:
    """Classify every input and write each batch as it comes; returns {"predicted", "skipped", "seconds"}.

    Raises DataError for a missing file, for no images at all among explicit inputs, and for an unreadable file
    when `strict` (embed's policy).
    """
    reader = Inputs(inputs, strict=strict, stdin=stdin, console=console)
    k = max(1, min(top_k, len(classes)))
    writer = (CsvWriter if fmt == "csv" else JsonlWriter)(out, classes, k)
    predicted, t0 = 0, time.time()
    with reader.progress("predict") as bar:
        for paths, probs in stream(
            model, reader.sources, batch_size=batch_size, workers=workers, precision=precision, on_error=reader.on_error
        ):
            paths = list(map(str, paths))  # a shard's image is named SHARD#KEY
            writer.write(paths, probs)
            out.flush()  # each batch reaches the next tool now
            predicted += len(paths)
            bar.advance(len(paths))
    return {"predicted": predicted, "skipped": reader.skipped, "seconds": time.time() - t0}
