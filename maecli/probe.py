"""Probes of frozen features: how good the embeddings are, against a random-init encoder of the same shape.

kNN: cosine similarity, the k nearest training images vote with weight exp(similarity / T), as in the
self-supervised benchmarks (Wu et al. 2018, DINO). Linear: the MAE paper's probe, BatchNorm without affine
parameters then a linear layer, trained on features extracted once per split through `embedding.stream`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .console import Progress
from .embedding import stream
from .errors import DataError
from .labelled import Labelled, Split, load_labelled
from .model import MAE

KNN_K = 20
KNN_TEMPERATURE = 0.07


# ----------------------------------------------------------------------------------------------
# Features


def features(
    model,
    split: Split,
    *,
    batch_size: int = 64,
    workers: int = 0,
    precision: str = "no",
    console=None,
    label: str = "features",
    classes: list[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled encoder features (N, D) and labels (N,) for the readable images of `split`; unreadable ones are
    skipped (with a warning on `console`). DataError when a class is left without any readable image."""
    label_of = dict(zip(split.paths, split.labels))
    feats, labels = [], []

    def skip(source, why, missing):
        if console is not None:
            console.print(f"[yellow]warning:[/] skipped {source}: {why}")
        bar.advance(1)

    with Progress(label, len(split.paths), enabled=console is not None) as bar:
        for paths, vectors in stream(
            model, split.paths, batch_size=batch_size, workers=workers, precision=precision, on_error=skip
        ):
            feats.append(vectors)
            labels.extend(label_of[p] for p in paths)
            bar.advance(len(paths))
    if not feats:
        raise DataError(f"none of the {len(split.paths)} images of the {label} split could be read")
    labels = torch.tensor(labels)
    unread = sorted(set(split.labels) - set(labels.tolist()))
    if unread:
        names = ", ".join(classes[i] if classes else str(i) for i in unread)
        raise DataError(f"no image of class {names} could be read ({label}); a class needs at least one")
    return torch.cat(feats), labels


# ----------------------------------------------------------------------------------------------
# The probes: pure functions of features and labels


def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> torch.Tensor:
    """Class votes (Nq, C): each query's k most cosine-similar training features vote exp(sim / T) for their label."""
    train = F.normalize(train_feats.float(), dim=1)
    query = F.normalize(query_feats.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for chunk in query.split(1024):  # bounds the (chunk, N_train) similarity matrix
        sim, idx = (chunk @ train.T).topk(k, dim=1)
        votes = torch.zeros(chunk.shape[0], num_classes)
        scores.append(votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp()))
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    """{"top1": fraction, "top5": fraction, or None when there are 5 classes or fewer}."""
    ranked = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hit = ranked == labels[:, None]
    n = max(1, len(labels))
    return {
        "top1": hit[:, 0].sum().item() / n,
        "top5": hit[:, :5].any(dim=1).sum().item() / n if scores.shape[1] > 5 else None,
    }


@contextlib.contextmanager
def one_thread():
    """Run tiny ops on one thread: for a linear layer on a few thousand features, handing work between threads
    costs more than the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.3,
    seed: int = 0,
) -> torch.Tensor:
    """Logits (Nq, C) of BatchNorm1d(affine=False) + Linear trained on frozen features.

    SGD with momentum, lr scaled by batch/256, one warmup epoch then cosine decay, no weight decay, as in
    the MAE paper's probe (which uses LARS at a batch far larger than these feature sets). lr 0.3 and 100
    epochs were chosen on a held-out part of CIFAR-10's training features, pretrained and random alike.
    """
    with one_thread():
        return _train_linear(
            train_feats.float(), train_labels, query_feats.float(), num_classes, epochs, batch_size, lr, seed
        )


def _train_linear(x, y, query, num_classes, epochs, batch_size, lr, seed):
    n, dim = x.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(head[1].weight, std=0.01)
        nn.init.zeros_(head[1].bias)
    batch_size = min(batch_size, n)
    steps_per_epoch = max(1, n // batch_size)  # drop the last partial batch: BatchNorm needs a real batch
    total = epochs * steps_per_epoch
    peak = lr * batch_size / 256
    opt = torch.optim.SGD(head.parameters(), lr=peak, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    head.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            warm = min(1.0, (step + 1) / steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = peak * warm * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    with torch.no_grad():
        return head(query)


# ----------------------------------------------------------------------------------------------
# The whole probe


def random_encoder(model: MAE, seed: int) -> MAE:
    """A freshly initialised encoder of the same architecture, on the same device; seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = MAE(model.cfg, decoder=False)
    return fresh.to(next(model.parameters()).device).eval()


def evaluate(
    model,
    labelled: Labelled,
    *,
    method: str = "both",
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    epochs: int = 100,
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 0,
    precision: str = "no",
    console=None,
    prefix: str = "",
) -> dict:
    """{"knn": {"top1", "top5"} or None, "linear": ... or None, "n_train", "n_val"} for one encoder;
    the counts are of the images that could be read."""
    extract = dict(batch_size=batch_size, workers=workers, precision=precision, console=console)
    t0 = time.time()
    extract["classes"] = labelled.classes
    train_x, train_y = features(model, labelled.train, label=f"{prefix}train features", **extract)
    val_x, val_y = features(model, labelled.val, label=f"{prefix}val features", **extract)
    if console is not None:
        console.print(
            f"{prefix}features: {len(train_y)} train + {len(val_y)} val images, {train_x.shape[1]}-d, "
            f"{time.time() - t0:.1f}s"
        )
    n_classes = len(labelled.classes)
    result = {"knn": None, "linear": None, "n_train": len(train_y), "n_val": len(val_y)}
    if method in ("knn", "both"):
        result["knn"] = topk_accuracy(knn_scores(train_x, train_y, val_x, n_classes, k, temperature), val_y)
    if method in ("linear", "both"):
        logits = linear_probe(train_x, train_y, val_x, n_classes, epochs=epochs, seed=seed)
        result["linear"] = topk_accuracy(logits, val_y)
    return result


def run_probe(
    model,
    labelled: Labelled,
    *,
    method: str = "both",
    k: int = KNN_K,
    epochs: int = 100,
    baseline: bool = False,
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 0,
    precision: str = "no",
    console=None,
) -> dict:
    """The documented result: {"knn", "linear", "baseline": {"knn", "linear"} or None, "n_train", "n_val",
    "classes"}."""
    opts = dict(
        method=method,
        k=k,
        epochs=epochs,
        seed=seed,
        batch_size=batch_size,
        workers=workers,
        precision=precision,
        console=console,
    )
    result = evaluate(model, labelled, **opts)
    base = evaluate(random_encoder(model, seed), labelled, prefix="random-init ", **opts) if baseline else None
    return {
        "knn": result["knn"],
        "linear": result["linear"],
        "baseline": {"knn": base["knn"], "linear": base["linear"]} if base else None,
        "n_train": result["n_train"],
        "n_val": result["n_val"],
        "classes": labelled.classes,
    }


def result_table(result: dict):
    """A rich table: one row per accuracy, pretrained beside random init and the difference."""
    from rich.table import Table

    base = result["baseline"]
    table = Table(box=None, pad_edge=False)
    table.add_column("probe")
    table.add_column("pretrained", justify="right")
    if base is not None:
        table.add_column("random init", justify="right")
        table.add_column("gain", justify="right")
    for method, name in (("knn", "kNN"), ("linear", "linear")):
        if result[method] is None:
            continue
        for top in ("top1", "top5"):
            acc = result[method][top]
            if acc is None:
                continue
            row = [f"{name} {top[:3]}-{top[3:]}", f"{100 * acc:.1f}%"]
            if base is not None:
                b = base[method][top]
                row += [f"{100 * b:.1f}%", f"{100 * (acc - b):+.1f}"]
            table.add_row(*row)
    return table


# ----------------------------------------------------------------------------------------------
# During pretraining


# Images the per-epoch probe encodes at most: a fixed subset keeps it to a fraction of an epoch's time.
TRAINING_PROBE_MAX = {"train": 2000, "val": 1000}


def subsample(split: Split, limit: int, seed: int = 0) -> Split:
    """At most `limit` images of the split, a seeded random subset in the original order."""
    if len(split.paths) <= limit:
        return split
    keep = sorted(torch.randperm(len(split.paths), generator=torch.Generator().manual_seed(seed))[:limit].tolist())
    return Split([split.paths[i] for i in keep], [split.labels[i] for i in keep])


@functools.lru_cache(maxsize=2)
def labelled_for_training(probe_dir: str) -> Labelled:
    """The probe folder's split, found once per run (and checked before the first step), capped in size."""
    d = load_labelled(probe_dir)
    return Labelled(
        d.classes,
        subsample(d.train, TRAINING_PROBE_MAX["train"]),
        subsample(d.val, TRAINING_PROBE_MAX["val"]),
        d.layout,
    )


def probe_during_training(model, probe_dir: str, epoch: int) -> dict:
    """kNN top-1 (and top-5) on the probe folder at an epoch end, for metrics.jsonl; a line on stderr."""
    from .console import console

    labelled = labelled_for_training(probe_dir)
    t0 = time.time()
    train_x, train_y = features(model, labelled.train, batch_size=256, classes=labelled.classes)
    val_x, val_y = features(model, labelled.val, batch_size=256, classes=labelled.classes)
    acc = topk_accuracy(knn_scores(train_x, train_y, val_x, len(labelled.classes)), val_y)
    row = {"knn_top1": round(acc["top1"], 5)}
    if acc["top5"] is not None:
        row["knn_top5"] = round(acc["top5"], 5)
    console.print(f"epoch {epoch}: kNN top-1 {100 * acc['top1']:.1f}% on {probe_dir} ({time.time() - t0:.0f}s)")
    return row
