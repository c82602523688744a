"""The training commands: pretrain, and finetune a pretrained encoder into a classifier."""

from __future__ import annotations

from pathlib import Path

import typer

from .. import host
from ..runtime import Precision
from .common import command_args, fail, given_flags, quiet_libraries, reported
from .options import (
    LOG_WITH_HELP,
    TRAIN_PRECISION_HELP,
    WEIGHTS_HELP,
    WORKERS_HELP,
    ModelName,
    Pool,
    Tracker,
    finite,
)


def pretrain(
    ctx: typer.Context,
    data: Path = typer.Argument(..., help="Folder of images, searched at any depth (no labels needed)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder [default: runs/<date-time>]."),
    model: ModelName = typer.Option("vit-base", "--model", help="Encoder size (the decoder scales with it)."),
    img_size: int = typer.Option(224, "--img-size", min=8, max=4096, help="Input size in pixels (square)."),
    patch_size: int | None = typer.Option(
        None,
        "--patch-size",
        min=1,
        max=512,
        help="Patch size [default: the model's (16; 14 for huge), halved until the image is 8 or more patches wide].",
    ),
    in_chans: int = typer.Option(3, "--in-chans", min=1, max=3, help="1 (grayscale) or 3 (RGB)."),
    mask: float = typer.Option(
        0.75, "--mask", callback=finite, help="Fraction of patches hidden, strictly between 0 and 1."
    ),
    epochs: int = typer.Option(100, "--epochs", min=1, max=10**7, help="Passes over the folder."),
    steps: int | None = typer.Option(
        None, "--steps", min=1, max=10**9, help="Stop after this many optimizer steps (wins over --epochs)."
    ),
    repeat: int = typer.Option(
        1,
        "--repeat",
        min=1,
        max=10**6,
        help="Passes over the folder per epoch, each with fresh crops: for folders of a few "
        "dozen images, so that an epoch (and its checkpoint and preview) is not a step.",
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1, max=10**6, help="Images per process per micro-batch."),
    blr: float = typer.Option(
        1.5e-4, "--blr", min=0.0, callback=finite, help="Base learning rate: lr = blr x effective batch / 256."
    ),
    lr: float | None = typer.Option(
        None, "--lr", min=0.0, callback=finite, help="Absolute learning rate (overrides --blr)."
    ),
    warmup_epochs: float = typer.Option(
        5, "--warmup-epochs", min=0.0, max=10**7, callback=finite, help="Linear warmup, in epochs."
    ),
    accum_iter: int = typer.Option(1, "--accum-iter", min=1, max=10**4, help="Micro-batches per optimizer step."),
    clip_grad: float | None = typer.Option(
        None, "--clip-grad", min=0.0, callback=finite, help="Clip the gradient norm."
    ),
    weight_decay: float = typer.Option(0.05, "--weight-decay", min=0.0, callback=finite, help="AdamW weight decay."),
    precision: Precision = typer.Option("auto", "--precision", help=TRAIN_PRECISION_HELP),
    workers: int | None = typer.Option(None, "--workers", min=0, max=256, help=WORKERS_HELP),
    seed: int = typer.Option(0, "--seed", min=0, max=2**31 - 1, help="Seed for init, data order, crops and masks."),
    save_every: int = typer.Option(
        500, "--save-every", min=0, max=10**9, help="Checkpoint every N steps (and at each epoch end)."
    ),
    keep: int = typer.Option(2, "--keep", min=1, max=10**6, help="How many checkpoints to keep."),
    log_every: int = typer.Option(10, "--log-every", min=1, max=10**9, help="Log to metrics.jsonl every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out."),
    allow_data_change: bool = typer.Option(
        False,
        "--allow-data-change",
        help="With --resume: go on although the data folder's files differ "
        "from the run's (added, removed, resized), with a warning.",
    ),
    norm_pix_loss: bool = typer.Option(
        True,
        "--norm-pix-loss/--no-norm-pix-loss",
        help="Predict per-patch normalized pixels (the paper's better setting).",
    ),
    decoder_dim: int | None = typer.Option(
        None, "--decoder-dim", min=4, max=8192, help="Decoder width [default: the model's: 128 tiny, 256 small, 512]."
    ),
    decoder_depth: int | None = typer.Option(
        None, "--decoder-depth", min=1, max=64, help="Decoder blocks [default: the model's: 4 tiny and small, 8]."
    ),
    decoder_heads: int | None = typer.Option(
        None, "--decoder-heads", min=1, max=256, help="Decoder heads [default: the model's: 4 tiny, 8 small, 16]."
    ),
    embed_dim: int | None = typer.Option(
        None, "--embed-dim", min=4, max=16384, help="Encoder width [default: the model's]."
    ),
    depth: int | None = typer.Option(None, "--depth", min=1, max=256, help="Encoder blocks [default: the model's]."),
    num_heads: int | None = typer.Option(
        None, "--num-heads", min=1, max=256, help="Encoder heads [default: the model's]."
    ),
    init_from: Path | None = typer.Option(None, "--init-from", help="Start from these weights (fresh optimizer)."),
    previews: int = typer.Option(
        4,
        "--previews",
        min=0,
        max=64,
        help="Images in the reconstruction preview saved at each epoch end to previews/ (0: none).",
    ),
    probe: Path | None = typer.Option(
        None,
        "--probe",
        help="Labelled folder (as for `maecli probe`): run the kNN "
        "probe at each epoch end, log knn_top1 to metrics.jsonl.",
    ),
    log_with: list[Tracker] = typer.Option([], "--log-with", help=LOG_WITH_HELP),
):
    """Pretrain a Masked Autoencoder on a folder of images.

    Writes config.json, model.safetensors, metrics.jsonl, checkpoints/ and previews/ into the run folder.

    --resume continues the run in --out with its saved settings; give --epochs or --steps again to extend it.
    Ctrl-C or SIGTERM saves a checkpoint and exits with 130 or 143.
    """
    if not 0 < mask < 1:
        fail(f"--mask must lie strictly between 0 and 1, got {mask}", 2)
    if in_chans not in (1, 3):
        fail(f"--in-chans must be 1 or 3, got {in_chans}", 2)
    if resume and out is None:
        fail("--resume needs --out RUN_FOLDER", 2)
    if resume and overwrite:
        fail("--resume and --overwrite contradict each other; pick one", 2)
    if not data.exists():
        fail(f"data folder {data} does not exist")
    if probe is not None and not probe.is_dir():
        fail(f"probe folder {probe} does not exist")
    quiet_libraries()
    from ..runtime import default_device
    from ..train import TrainArgs
    from ..train import pretrain as run_pretrain

    host.tune_for_cpu(default_device())
    args = command_args(ctx, TrainArgs)
    given = given_flags(ctx)
    try:
        with reported():
            summary = run_pretrain(args, given=given)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began
        saved = out is not None and any((out / "checkpoints").glob("step-*"))
        fail(
            f"interrupted; the checkpoints on disk are complete (continue with --out {out} --resume)"
            if saved
            else "interrupted before the first checkpoint: nothing was saved",
            130,
        )
    if summary.get("signal") is not None:
        import signal

        raise typer.Exit(130 if summary["signal"] == signal.SIGINT else 143)


def finetune(
    ctx: typer.Context,
    data: Path = typer.Argument(
        ...,
        help="Labelled folder, read as `maecli probe` reads it: one subfolder per class, "
        "or train/ and val/ (or test/) that each hold them.",
    ),
    weights: Path | None = typer.Option(
        None, "--weights", "-w", help="The pretrained encoder (required, except with --resume): " + WEIGHTS_HELP
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder [default: runs/<date-time>]."),
    val: Path | None = typer.Option(
        None, "--val", help="Validation folder with the same class subfolders (when DATA holds no train/ and val/)."
    ),
    val_split: float | None = typer.Option(
        None,
        "--val-split",
        callback=finite,
        help="Fraction of each class held out when there is no validation folder (default 0.2).",
    ),
    fraction: float | None = typer.Option(
        None,
        "--fraction",
        callback=finite,
        help="Train on this fraction of each class's training images (a seeded "
        "stratified subset): the few-labels case.",
    ),
    per_class: int | None = typer.Option(
        None, "--per-class", min=1, max=10**9, help="Train on at most N images of each class (seeded)."
    ),
    baseline: bool = typer.Option(
        False,
        "--baseline",
        help="Also train the same architecture from random init with "
        "the same recipe, seed and data order, into RUN/baseline, "
        "and show both.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result table as one JSON object on stdout."),
    epochs: int = typer.Option(50, "--epochs", min=1, max=10**7, help="Passes over the training images."),
    steps: int | None = typer.Option(
        None, "--steps", min=1, max=10**9, help="Stop after this many optimizer steps (wins over --epochs)."
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1, max=10**6, help="Images per process per micro-batch."),
    blr: float = typer.Option(
        1e-3, "--blr", min=0.0, callback=finite, help="Base learning rate: lr = blr x effective batch / 256."
    ),
    lr: float | None = typer.Option(
        None, "--lr", min=0.0, callback=finite, help="Absolute learning rate (overrides --blr)."
    ),
    min_lr: float = typer.Option(1e-6, "--min-lr", min=0.0, callback=finite, help="Where the cosine schedule ends."),
    warmup_epochs: float = typer.Option(
        5,
        "--warmup-epochs",
        min=0.0,
        max=10**7,
        callback=finite,
        help="Linear warmup, in epochs (at most half the run).",
    ),
    accum_iter: int = typer.Option(1, "--accum-iter", min=1, max=10**4, help="Micro-batches per optimizer step."),
    clip_grad: float | None = typer.Option(
        None, "--clip-grad", min=0.0, callback=finite, help="Clip the gradient norm."
    ),
    weight_decay: float = typer.Option(0.05, "--weight-decay", min=0.0, callback=finite, help="AdamW weight decay."),
    layer_decay: float = typer.Option(
        0.75,
        "--layer-decay",
        callback=finite,
        help="Layer-wise lr decay: each block trains this many times slower than the one above it (1: no decay).",
    ),
    drop_path: float = typer.Option(
        0.1, "--drop-path", min=0.0, max=0.99, callback=finite, help="Stochastic depth rate."
    ),
    mixup: float = typer.Option(0.8, "--mixup", min=0.0, callback=finite, help="Mixup alpha (0: off)."),
    cutmix: float = typer.Option(1.0, "--cutmix", min=0.0, callback=finite, help="CutMix alpha (0: off)."),
    smoothing: float = typer.Option(0.1, "--smoothing", min=0.0, max=0.99, callback=finite, help="Label smoothing."),
    reprob: float = typer.Option(
        0.25, "--reprob", min=0.0, max=1.0, callback=finite, help="Random erasing probability."
    ),
    aa: str = typer.Option("rand-m9-mstd0.5-inc1", "--aa", help="timm RandAugment policy, or none."),
    pool: Pool = typer.Option(
        Pool.mean,
        "--pool",
        help="mean: average of the patch tokens, then a LayerNorm (the paper's default); cls: the cls token.",
    ),
    img_size: int | None = typer.Option(
        None,
        "--img-size",
        min=8,
        max=4096,
        help="Input size [default: the weights'; another size resizes the position embeddings].",
    ),
    precision: Precision = typer.Option("auto", "--precision", help=TRAIN_PRECISION_HELP),
    workers: int | None = typer.Option(None, "--workers", min=0, max=256, help=WORKERS_HELP),
    seed: int = typer.Option(
        0, "--seed", min=0, max=2**31 - 1, help="Seed for the subset, init, data order, augmentation and mixing."
    ),
    save_every: int = typer.Option(
        500, "--save-every", min=0, max=10**9, help="Checkpoint every N steps (and at each epoch end)."
    ),
    keep: int = typer.Option(2, "--keep", min=1, max=10**6, help="How many checkpoints to keep."),
    log_every: int = typer.Option(10, "--log-every", min=1, max=10**9, help="Log to metrics.jsonl every N steps."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out (and its baseline) from the newest checkpoints."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out."),
    allow_data_change: bool = typer.Option(
        False,
        "--allow-data-change",
        help="With --resume: go on although the training images differ from the run's, with a warning.",
    ),
    log_with: list[Tracker] = typer.Option([], "--log-with", help=LOG_WITH_HELP),
):
    """Fine-tune a pretrained MAE encoder into a classifier on a labelled folder (the paper's recipe).

    Validates at each epoch end (val_top1, val_top5, val_loss in metrics.jsonl) and keeps the best epoch's
    classifier in RUN/model.safetensors; config.json holds the classes in order and the recipe, per_class.json
    the best epoch's accuracy per class. With --baseline the same recipe from random init runs next, into
    RUN/baseline, and the closing table shows both.

    --resume continues an interrupted run (and its baseline) exactly. Ctrl-C or SIGTERM saves a checkpoint and
    exits with 130 or 143.
    """
    if resume and out is None:
        fail("--resume needs --out RUN_FOLDER", 2)
    if resume and overwrite:
        fail("--resume and --overwrite contradict each other; pick one", 2)
    if weights is None and not resume:
        fail("missing --weights: the pretrained encoder to fine-tune", 2)
    if val is not None and val_split is not None:
        fail("--val and --val-split contradict each other; pick one", 2)
    if val_split is not None and not 0 < val_split < 1:
        fail(f"--val-split must lie strictly between 0 and 1, got {val_split}", 2)
    if fraction is not None and per_class is not None:
        fail("--fraction and --per-class contradict each other; pick one", 2)
    if fraction is not None and not 0 < fraction <= 1:
        fail(f"--fraction must lie in (0, 1], got {fraction}", 2)
    if not 0 < layer_decay <= 1:
        fail(f"--layer-decay must lie in (0, 1], got {layer_decay}", 2)
    for path in (data, val, weights):
        if path is not None and not path.exists():
            fail(f"{path} does not exist")
    quiet_libraries()
    from ..console import console
    from ..finetune import FinetuneArgs, json_summary, result_table, stopped_message
    from ..finetune import finetune as run_finetune
    from ..runtime import default_device

    host.tune_for_cpu(default_device())
    args = command_args(ctx, FinetuneArgs, weights=str(weights) if weights else "")
    given = given_flags(ctx)
    try:
        with reported():
            result = run_finetune(args, given=given)
    except KeyboardInterrupt:
        fail("interrupted; the checkpoints on disk are complete (continue with --resume)", 130)
    stopped = stopped_message(result, args)
    if stopped:
        import signal

        console.print(f"[yellow]{stopped}[/]")
        signum = next(r["signal"] for r in (result["finetuned"], result["baseline"]) if r and r["signal"])
        raise typer.Exit(130 if signum == signal.SIGINT else 143)
    console.print(result_table(result))
    for name, r in (("finetuned", result["finetuned"]), ("baseline", result["baseline"])):
        if r is not None:
            console.print(
                f"{name}: best epoch {r['best_epoch']}, weights in {r['weights']}; {r['skipped']} "
                f"unreadable training file(s) skipped, {r['val_unreadable']} validation file(s)"
            )
    if json_out:
        import json

        typer.echo(json.dumps(json_summary(result)))
