"""Tar shards in the WebDataset layout (`KEY.jpg` members, one image per key): naming them (`train-{000..099}.tar`),
writing them from a folder, reading their images in sequence for embed and predict, and the training stream.

Training splits the shards into streams: each epoch deals a seeded permutation of the shards to `world x streams`
streams, a stream's shards are read in sequence through a seeded shuffle buffer, and each loader worker serves its
streams a batch at a time. Every sample a stream hands out has a position (its count in the stream's epoch), so a
checkpoint records, per stream, the epoch and the position reached: a resumed run re-reads those shards' headers and
bytes up to there (decoding nothing) and goes on with the next sample, neither repeating nor leaving out any.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from . import data as D
from .errors import DataError

SHUFFLE_BUFFER = 1000  # samples each training stream shuffles among (WebDataset's usual size)


def is_shards(spec: str | os.PathLike) -> bool:
    """Whether DATA names tar shards: a .tar file, or a pattern with {000..099} ending in .tar."""
    return str(spec).endswith(".tar")


def expand(spec: str | os.PathLike) -> list[str]:
    """The shard files a spec names (`shards/train-{000000..000099}.tar`, braces expanded as the shell would),
    each checked to exist; DataError otherwise."""
    try:
        from braceexpand import braceexpand
        from webdataset import tariterators  # noqa: F401 (samples() reads with it)
    except ImportError:
        raise DataError("reading tar shards needs webdataset: pip install 'maecli[shards]'") from None
    paths = list(braceexpand(str(spec)))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        some = f"{len(missing)} of the {len(paths)} shards" if len(paths) > 1 else "the shard"
        raise DataError(f"{some} named by {spec} do not exist (the first: {missing[0]})")
    return paths


def image_ext(name: str) -> str | None:
    """The image suffix of a member's name (without the dot), or None."""
    dot = name.rfind(".", name.rfind("/") + 1)
    ext = name[dot:].lower() if dot > 0 else ""
    return ext[1:] if ext in D.IMAGE_SUFFIXES else None


def samples(path: str) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(KEY.EXT, image bytes, None) for each image member of one shard, in order, through webdataset's tar iterator;
    (the shard, None, why) when it cannot be read further: a shard cut short ends with a failure, not an exception."""
    from webdataset.tariterators import tar_file_iterator

    try:
        with open(path, "rb") as f:
            for member in tar_file_iterator(f):
                if image_ext(member["fname"]) is not None:
                    yield member["fname"], member["data"], None
    except (OSError, tarfile.TarError, EOFError) as e:
        yield (
            path,
            None,
            f"the shard is damaged or cut short ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
        )


def key(name: str) -> str:
    """A member's key: its name without the image suffix."""
    return name[: -len(image_ext(name) or "") - 1]


def count_images(path: str) -> int:
    """Image members in a shard, from its headers alone (tarfile seeks past the data)."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            return sum(1 for m in tar if m.isfile() and image_ext(m.name) is not None)
    except (OSError, tarfile.TarError, EOFError) as e:
        raise DataError(f"cannot read shard {path}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Inference: each image of each shard, in order


class Member(io.BytesIO):
    """One image from a shard, as data.eval_batches reads a file object: named `SHARD#KEY` in the output."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name

    def __reduce__(self):  # to a loader worker: the bytes and the name, from the start
        return Member, (self.getvalue(), self.name)


def members(spec: str, on_error=None) -> Iterator[Member]:
    """The images of the shards `spec` names, in order; a damaged shard goes to on_error(name, why, False)."""
    for path in expand(spec):
        for name, raw, why in samples(path):
            if raw is None:
                if on_error is None:
                    raise DataError(f"cannot read {name}: {why}")
                on_error(name, why, False)
            else:
                yield Member(raw, f"{path}#{key(name)}")


# ----------------------------------------------------------------------------------------------
# Training


class ShardSet:
    """The shards of a run: their paths, sizes and image counts. Its fingerprint, like a folder's file list, lets
    `--resume` tell whether the data changed (rundir.DataList takes it as it is)."""

    def __init__(self, spec: str):
        self.spec = spec
        self.paths = expand(spec)
        self.base = str(Path(spec).parent)  # as rundir.DataList takes a data folder's
        self.sizes = np.array([os.path.getsize(p) for p in self.paths], dtype=np.int64)
        self.counts = [count_images(p) for p in self.paths]
        if not sum(self.counts):
            raise DataError(f"no images in the {len(self.paths)} shard(s) named by {spec}")

    def __len__(self) -> int:
        return sum(self.counts)

    def name(self, i: int) -> str:
        return os.path.relpath(self.paths[i], self.base or ".")

    def pairs(self) -> Iterator[tuple[str, int]]:
        return ((self.name(i), int(s)) for i, s in enumerate(self.sizes))

    def fingerprint(self) -> dict:
        import hashlib

        digest = hashlib.sha256()
        for name, size in self.pairs():
            digest.update(os.fsencode(name) + b"\0" + str(size).encode() + b"\n")
        return {"files": len(self.paths), "bytes": int(self.sizes.sum()), "sha256": digest.hexdigest()}

    def json_gz(self) -> bytes:
        gz = zlib.compressobj(1, zlib.DEFLATED, 31)
        return gz.compress(json.dumps([list(p) for p in self.pairs()]).encode()) + gz.flush()


def shuffled(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: fills `size` items, then hands out a random one for each that comes in; drains at the end."""
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


class Streams:
    """Which shards each stream reads in an epoch: a seeded permutation of them, dealt out over `total` streams."""

    def __init__(self, paths: list[str], total: int, seed: int, buffer: int):
        self.paths, self.total, self.seed, self.buffer = paths, total, seed, buffer

    def shards(self, stream: int, epoch: int) -> list[str]:
        g = torch.Generator().manual_seed(self.seed + 1_000 * epoch)
        order = torch.randperm(len(self.paths), generator=g).tolist()
        return [self.paths[i] for i in order[stream :: self.total]]

    def read(self, stream: int, epoch: int) -> Iterator[tuple[str, bytes | None, str | None]]:
        """The stream's samples in `epoch`, (name, bytes, why), through its shuffle buffer."""

        def named():
            for path in self.shards(stream, epoch):
                for name, raw, why in samples(path):
                    yield (f"{path}#{key(name)}" if raw is not None else path), raw, why

        rng = random.Random(self.seed * 1_000_003 + epoch * 7_919 + stream * 104_729)
        return shuffled(named(), self.buffer, rng)


class ShardTraining(torch.utils.data.IterableDataset):
    """Batches of training crops from the streams of one process (rank). Each loader worker serves the streams
    `worker::workers` of it in turn, a batch at a time, epoch after epoch without end (the trainer takes as many as
    its schedule says). A batch is (images, [failures], (stream, epoch, position after it)); an unreadable member
    is skipped (reported in failures) and the batch filled from the next one. `start` is {stream: [epoch, position]}
    from the checkpoint."""

    def __init__(
        self, streams: Streams, ranks_streams: list[int], img_size: int, in_chans: int, batch: int, start: dict | None
    ):
        self.streams, self.mine, self.batch = streams, ranks_streams, batch
        self.in_chans, self.min_side = in_chans, 2 * img_size
        self.transform = D.train_transform(img_size, in_chans)
        self.start = {int(k): tuple(v) for k, v in (start or {}).items()}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        batches = [self.stream_batches(s) for s in self.mine[worker::workers]]
        while batches:
            for it in batches:
                yield next(it)

    def stream_batches(self, stream: int) -> Iterator:
        epoch, skip = self.start.get(stream, (0, 0))
        while True:
            position, pending, failed, good = 0, [], [], 0
            for name, raw, why in self.streams.read(stream, epoch):
                position += 1
                if position <= skip:
                    continue  # consumed before the checkpoint
                if raw is None:
                    failed.append((name, why))
                    continue
                try:
                    pending.append(self.crop(raw, epoch, stream, position))
                    good += 1
                except Exception as e:  # any failure to decode means "skip this member"
                    failed.append((name, D.describe_error(e)))
                if len(pending) == self.batch:
                    yield torch.stack(pending), failed, (stream, epoch, position)
                    pending, failed = [], []
            if pending:
                yield torch.stack(pending), failed, (stream, epoch, position)
            elif not good and not skip:
                raise DataError(f"no readable image in the shards of stream {stream} in epoch {epoch + 1}")
            epoch, skip = epoch + 1, 0

    def crop(self, raw: bytes, epoch: int, stream: int, position: int) -> torch.Tensor:
        img = D.decode(io.BytesIO(raw), self.in_chans, self.min_side)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(D.sample_seed(self.streams.seed, epoch, stream * 2**32 + position))
            return self.transform(img)


class Positions:
    """The loader's batches as the Trainer takes them, (images, failures), each batch's place recorded in
    `state.extra["shards"]` ({stream: [epoch, position]}) as it is taken: a checkpoint then holds where every stream
    of this process stands."""

    def __init__(self, loader, state):
        self.loader, self.state = loader, state

    def __iter__(self):
        return _Taken(iter(self.loader), self.state.extra.setdefault("shards", {}))


class _Taken:
    def __init__(self, it, positions: dict):
        self.it, self.positions = it, positions

    def __next__(self):
        x, failed, (stream, epoch, position) = next(self.it)
        self.positions[str(stream)] = [epoch, position]
        return x, failed

    def _shutdown_workers(self):
        D.shutdown_workers(self.it)


def streams_per_process(shards: int, world: int, workers: int) -> int:
    """Streams for each process: one per loader worker (at least one), but never more streams than shards."""
    if shards < world:
        raise DataError(f"{shards} shard(s) for {world} processes: each process needs at least one shard")
    return max(1, min(max(1, workers), shards // world))


def training_loader(run, shards: ShardSet, img_size: int, in_chans: int, buffer: int):
    """The loader of a run on shards (run.Run), resuming each stream where the checkpoint left it."""
    saved = run.state.extra.get("shards_layout")
    per = saved["streams"] // run.world if saved else streams_per_process(len(shards.paths), run.world, run.workers)
    run.state.extra["shards_layout"] = {"streams": per * run.world, "buffer": buffer}
    streams = Streams(shards.paths, per * run.world, run.args.seed, buffer)
    mine = [run.rank + run.world * k for k in range(per)]
    dataset = ShardTraining(streams, mine, img_size, in_chans, run.batch, run.state.extra.get("shards"))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=min(run.workers, per),
        worker_init_fn=D.worker_init,
        pin_memory=run.acc.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if run.workers > 0 else None,
    )
    return Positions(loader, run.state)


def preview_sources(shards: ShardSet, run: Path, count: int, in_chans: int) -> list[Path]:
    """The first `count` readable images of the first shards, as files in RUN/previews/shard-images/ (the previews
    show the same images every epoch, and read files)."""
    folder = Path(run) / "previews" / "shard-images"
    chosen = []
    for path in shards.paths:
        for name, raw, _ in samples(path):
            if len(chosen) >= count:
                return chosen
            if raw is None:
                continue
            try:
                D.decode(io.BytesIO(raw), in_chans, min_side=64)
            except Exception:  # the training loop warns about unreadable members; a preview just moves on
                continue
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{len(chosen):02d}-{Path(name).name[-60:]}"
            target.write_bytes(raw)
            chosen.append(target)
    return chosen


# ----------------------------------------------------------------------------------------------
# Writing: a folder into shards


def key_of(name: str, taken: set[str]) -> str:
    """A WebDataset key for a file's relative path: its suffix dropped and the dots of its name made underscores
    (a key ends at the first dot of a member's name), numbered when two files would share one."""
    folder, _, base = name.rpartition("/")
    stem = base[: base.rfind(".")] if "." in base else base
    key = (folder + "/" if folder else "") + stem.replace(".", "_")
    unique, n = key, 1
    while unique in taken:
        unique, n = f"{key}_{n}", n + 1
    taken.add(unique)
    return unique


def write_shards(
    folder: str | os.PathLike, out: str | os.PathLike, per_shard: int = 1000, *, prefix: str = "shard", on_error=None
) -> tuple[str, int, int]:
    """Write the images under `folder` (found as pretrain finds them, in the same order) into tar shards of
    `per_shard` images each, OUT/PREFIX-NNNNNN.tar, the files' bytes as they are. Returns (the shards' brace
    pattern, images written, shards). An unreadable file goes to on_error(path, why) and is left out."""
    import tarfile as tf

    files = D.find_images(folder)
    if not len(files):
        raise DataError(f"no image files found under {folder}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    taken, written, shard, tar = set(), 0, -1, None
    try:
        for i, path in enumerate(files):
            try:
                raw = Path(path).read_bytes()
            except OSError as e:
                if on_error is not None:
                    on_error(str(path), D.describe_error(e, path))
                continue
            if written % per_shard == 0:
                if tar is not None:
                    tar.close()
                shard += 1
                tar = tf.open(out / f"{prefix}-{shard:06d}.tar", "w", format=tf.PAX_FORMAT)
            name = files.name(i)
            info = tf.TarInfo(f"{key_of(name, taken)}.{name[name.rfind('.') + 1 :].lower()}")
            info.size, info.mtime, info.mode = len(raw), 0, 0o644
            tar.addfile(info, io.BytesIO(raw))
            written += 1
    finally:
        if tar is not None:
            tar.close()
    last = max(shard, 0)
    pattern = f"{prefix}-{{{0:06d}..{last:06d}}}.tar" if last else f"{prefix}-000000.tar"
    return str(out / pattern), written, last + 1
