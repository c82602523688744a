"""Embeddings: each whole image through the frozen encoder, pooled to one vector, streamed in input order.

`embed()` is the Python entry point; `stream()` is the batch loop shared by `maecli embed` and `maecli probe`;
`write_embeddings()` is the command's pipeline (the output formats); `Inputs` reads files, folders and stdin and
counts the unreadable ones for it and for `maecli predict`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import data as D
from .console import Progress
from .files import open_output
from .runtime import autocast, resolve_precision
from .shards import is_shards

POOLS = ("mean", "cls")


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """Encoder output (N, 1 + L, D) -> (N, D): the mean of the L patch tokens, or the cls token."""
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
    return tokens[:, 1:].mean(dim=1) if pool == "mean" else tokens[:, 0]


def stream(
    model,
    sources: Iterable,
    *,
    pool: str = "mean",
    normalize: bool = False,
    batch_size: int = 64,
    workers: int = 0,
    precision: str = "no",
    on_error: D.OnError | None = None,
) -> Iterator[tuple[list, torch.Tensor]]:
    """Yield (sources, vectors (B, D) float32 on the CPU) batch by batch, in input order.

    Images come through `data.eval_batches` (lazily, in flat memory; `on_error` is its error policy). The model
    runs on its own device, without masking, in inference mode. The default precision is fp32 ("no"), which
    keeps each image's vector independent of the batch it lands in; bf16 kernels chosen by batch shape are not.
    """

    def vectors(x: torch.Tensor) -> torch.Tensor:  # pooled on the model's device: only (B, D) comes back
        out = pool_tokens(model.encode(x).float(), pool)
        return F.normalize(out, dim=-1) if normalize else out

    yield from forward_batches(
        model, vectors, sources, batch_size=batch_size, workers=workers, precision=precision, on_error=on_error
    )


def forward_batches(
    model, forward, sources: Iterable, *, batch_size: int, workers: int, precision: str, on_error: D.OnError | None
) -> Iterator[tuple[list, torch.Tensor]]:
    """Yield (sources, forward(images) on the CPU) batch by batch, in input order: the inference loop of embed,
    probe and predict. Images come through `data.eval_batches`; the model runs in eval and inference mode on its
    own device, in the resolved precision, and gets its training mode back afterwards."""
    cfg = model.cfg
    device = next(model.parameters()).device
    mode = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    try:
        for items, x in D.eval_batches(
            sources,
            cfg.img_size,
            cfg.pixels,
            batch_size=batch_size,
            workers=workers,
            on_error=on_error,
            pin_memory=device.type == "cuda",
        ):
            with torch.inference_mode(), autocast(device, mode):
                out = forward(x.to(device, non_blocking=True))
            yield items, out.cpu()
    finally:
        model.train(was_training)


def embed(
    model,
    paths_or_images,
    *,
    pool: str = "mean",
    normalize: bool = False,
    batch_size: int = 64,
    workers: int = 0,
    precision: str = "no",
) -> torch.Tensor:
    """One vector per image, (N, D) float32 on the CPU, in input order.

    `paths_or_images`: paths, PIL images or (C, H, W) tensors (uint8, or float in [0, 1]), or one of them;
    an (N, C, H, W) tensor is N images. Each is resized (shorter side) and center-cropped to the model's
    input size and encoded whole; `pool` is "mean" (patch tokens) or "cls". An unreadable file raises
    DataError.
    """
    items = paths_or_images
    if isinstance(items, (str, os.PathLike, Image.Image)) or (isinstance(items, torch.Tensor) and items.ndim == 3):
        items = [items]
    chunks = [
        v
        for _, v in stream(
            model, items, pool=pool, normalize=normalize, batch_size=batch_size, workers=workers, precision=precision
        )
    ]
    return torch.cat(chunks) if chunks else torch.empty(0, model.cfg.embed_dim)


# ----------------------------------------------------------------------------------------------
# The command's pipeline: inputs in, one format out


class Found(str):
    """A path found by searching a folder, not named by the user: if it vanishes before it is read, it is
    skipped like an unreadable image (pretrain does the same), where a named path that does not exist is an
    error."""


def stdin_paths(stdin) -> Iterator[str]:
    """Newline-separated paths from `stdin`, read as bytes where it has them and decoded as `os.fsdecode` does: a
    name that is not valid in the locale's encoding passes through (surrogate-escaped) instead of failing."""
    raw = getattr(stdin, "buffer", None)
    if raw is None:  # a text stream (tests, notebooks): already decoded
        yield from (line.rstrip("\r\n") for line in stdin)
        return
    for line in raw:
        yield os.fsdecode(line.rstrip(b"\r\n"))


def expand_inputs(
    inputs: list[str], stdin, on_empty: Callable[[str], None], on_error: D.OnError | None = None
) -> Iterator[str]:
    """Files as given, folders searched as pretrain does, tar shards (`train-{000..009}.tar`) as their images (each
    named SHARD#KEY), `-` as newline-separated paths (files, folders or shards)."""
    from .shards import members

    for item in inputs:
        lines = D.paced(stdin_paths(stdin)) if item == "-" else [item]
        for line in lines:
            if line is D.PAUSE:
                yield line
                continue
            if not line.strip():  # a blank or whitespace-only line names no file
                continue
            if is_shards(line):
                yield from members(line, on_error)
            elif os.path.isdir(line):
                found = D.find_images(line)
                if not found:
                    on_empty(line)
                yield from (Found(p) for p in found)
            else:
                yield line  # a missing file surfaces in order, as a clear error, when its batch is read


class Inputs:
    """The inputs of a streaming command (embed, predict): files, folders and `-` expanded in order, with one policy
    for trouble. A missing file or no images at all is a DataError; an unreadable one is a DataError with `strict`,
    else warned about on `console` and counted in `skipped`; the progress bar (`progress()`) counts both."""

    def __init__(self, inputs: list[str], *, strict: bool = False, stdin=None, console=None):
        self.strict, self.console, self.skipped, self.bar = strict, console, 0, None
        self.sources = expand_inputs(
            inputs,
            stdin if stdin is not None else sys.stdin,
            on_empty=lambda folder: self.warn(f"no image files found under {folder}"),
            on_error=self.on_error,
        )
        self.total = None
        if "-" not in inputs and not any(map(is_shards, inputs)):  # the paths are known up front: the bar has a total
            self.sources = list(self.sources)
            self.total = len(self.sources)
            if not self.sources:
                raise D.DataError(f"no image files found in {', '.join(inputs)}")

    def warn(self, message: str) -> None:
        if self.console is not None:
            self.console.print(f"[yellow]warning:[/] {message}")

    def on_error(self, source, why, missing) -> None:
        if missing and not isinstance(source, Found):
            raise D.DataError(f"{source} does not exist")
        if self.strict:
            raise D.DataError(f"cannot read {source}: {why} (--strict)")
        self.skipped += 1
        self.warn(f"skipped {source}: {why}")
        if self.bar is not None:
            self.bar.advance(1)

    def progress(self, label: str) -> Progress:
        self.bar = Progress(label, self.total, enabled=self.console is not None)
        return self.bar


class JsonlWriter:
    def __init__(self, out):
        self.out = out

    def write(self, paths: list[str], vectors: np.ndarray):
        for path, v in zip(paths, vectors):
            # 9 significant digits round-trip float32 exactly
            numbers = ", ".join(f"{x:.9g}" for x in v.tolist())
            self.out.write(f'{{"path": {json.dumps(path)}, "embedding": [{numbers}]}}\n')

    def finish(self):
        pass


class CsvWriter:
    def __init__(self, out, dim: int):
        import csv

        self.rows = csv.writer(out, lineterminator="\n")
        self.rows.writerow(["path", *(f"e{i}" for i in range(dim))])

    def write(self, paths: list[str], vectors: np.ndarray):
        self.rows.writerows([path, *(f"{x:.9g}" for x in v.tolist())] for path, v in zip(paths, vectors))

    def finish(self):
        pass


def paths_file(path: str | os.PathLike) -> Path:
    """Where `embed --format npy -o FILE` writes the paths: FILE.paths.jsonl."""
    return Path(path).with_name(Path(path).name + ".paths.jsonl")


class NpyWriter:
    """A float32 (N, D) .npy plus FILE.paths.jsonl, both streamed and put in place only once complete.

    The paths file holds one JSON string per line, so line i is row i whatever a name holds (newlines, tabs;
    bytes that are not UTF-8 are written as os.fsdecode escapes them, which os.fsencode turns back).
    The row count is unknown until the last image, so the header is written first for a huge count and
    rewritten at the end; numpy pads every such header to the same 128 bytes.
    """

    def __init__(self, path: Path, dim: int, files: contextlib.ExitStack):
        self.dim, self.n = dim, 0
        # both opened before any image is read, so an output that cannot be written fails at once
        self.array = files.enter_context(open_output(path, "wb", seekable=True))
        self.names = files.enter_context(open_output(paths_file(path), "w", encoding="utf-8", newline="\n"))
        self.header_len = self._header(10**15)

    def _header(self, n: int) -> int:
        start = self.array.tell()
        np.lib.format.write_array_header_1_0(
            self.array, {"descr": "<f4", "fortran_order": False, "shape": (n, self.dim)}
        )
        return self.array.tell() - start

    def write(self, paths: list[str], vectors: np.ndarray):
        self.array.write(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
        self.names.writelines(json.dumps(p) + "\n" for p in paths)
        self.n += len(paths)

    def finish(self):
        end = self.array.tell()
        self.array.seek(0)
        if self._header(self.n) != self.header_len:
            raise RuntimeError("npy header changed size")  # cannot happen: numpy pads to 64 bytes
        self.array.seek(end)


def write_embeddings(
    model,
    inputs: list[str],
    *,
    fmt: str = "jsonl",
    out=None,
    out_path: Path | None = None,
    pool: str = "mean",
    normalize: bool = False,
    batch_size: int = 64,
    workers: int = 0,
    precision: str = "no",
    strict: bool = False,
    stdin=None,
    console=None,
) -> dict:
    """Embed every input and write each batch as it comes; returns {"embedded", "skipped", "seconds", "dim"}.

    `out` is a text stream for jsonl/csv (stdout); `out_path` a file for any format, which appears only once
    complete (see files.open_output). Warnings and progress go to `console` (stderr). Raises DataError for a
    missing file, for no images at all among explicit inputs, and for an unreadable file when `strict`.
    """
    reader = Inputs(inputs, strict=strict, stdin=stdin, console=console)
    dim = model.cfg.embed_dim
    embedded, t0 = 0, time.time()
    with contextlib.ExitStack() as files:  # an error on the way leaves no output file behind
        if fmt == "npy":
            writer = NpyWriter(out_path, dim, files)
        else:
            if out_path is not None:
                out = files.enter_context(
                    open_output(out_path, "w", encoding="utf-8", errors="surrogateescape", newline="")
                )
            writer = CsvWriter(out, dim) if fmt == "csv" else JsonlWriter(out)
        with (
            reader.progress("embed") as bar,
            contextlib.closing(
                stream(
                    model,
                    reader.sources,
                    pool=pool,
                    normalize=normalize,
                    batch_size=batch_size,
                    workers=workers,
                    precision=precision,
                    on_error=reader.on_error,
                )
            ) as batches,
        ):
            for sources, vectors in batches:
                paths = list(map(str, sources))  # a shard's image is named SHARD#KEY
                writer.write(paths, vectors.numpy())
                if fmt != "npy":
                    out.flush()  # each batch reaches the next tool now, not when a buffer fills
                embedded += len(paths)
                bar.advance(len(paths))
        writer.finish()
    return {"embedded": embedded, "skipped": reader.skipped, "seconds": time.time() - t0, "dim": dim}
