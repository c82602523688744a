"""The training commands: pretrain, and finetune a pretrained encoder into a classifier."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .. import host
from .common import command_args, fail, given_flags, quiet_libraries, reported, weights_missing
from .options import (
    AccumIter,
    AllowDataChange,
    Blr,
    ClipGrad,
    EncoderWeights,
    Epochs,
    Json,
    Keep,
    LabelledData,
    LogEvery,
    LogWith,
    Lr,
    Mask,
    ModelName,
    Overwrite,
    Pool,
    Pooling,
    Resume,
    RunOut,
    SaveEvery,
    Seed,
    ShowBands,
    Steps,
    TrainBatchSize,
    TrainPrecision,
    Val,
    ValSplit,
    WarmupEpochs,
    WeightDecay,
    Workers,
    band_list,
    finite,
)


def check_run_flags(out: Path | None, resume: bool, overwrite: bool):
    """The run-folder flags both training commands take: the contradictions found without importing torch.
    (Their other settings are checked by the library: train.build_config, finetune.check_recipe.)"""
    if resume and out is None:
        fail("--resume needs --out RUN_FOLDER", 2)
    if resume and overwrite:
        fail("--resume and --overwrite contradict each other; pick one", 2)


# pretrain's own options: the model's shape, the data, previews and the probe
Model = Annotated[ModelName, typer.Option("--model", help="Encoder size (the decoder scales with it).")]
ImgSize = Annotated[int, typer.Option("--img-size", min=8, max=4096, help="Input size in pixels (square), 8 to 4096.")]
PatchSize = Annotated[
    int | None,
    typer.Option(
        "--patch-size",
        min=1,
        max=512,
        help="Patch size [default: the model's (16; 14 for huge), halved until the image is 8 or more patches wide].",
    ),
]
InChans = Annotated[
    int | None,
    typer.Option(
        "--in-chans",
        min=1,
        max=1024,
        help="Input bands: 1 (grayscale), 3 (RGB), or any N [default: the files' own count; gray and colour "
        "photos mixed give 3].",
    ),
]
Bands = Annotated[
    str | None,
    typer.Option(
        "--bands",
        metavar="<B,...>",
        callback=band_list,
        help="Train on these bands of each file, 1-based in file order, e.g. 4,3,2 [default: all].",
    ),
]
Repeat = Annotated[
    int,
    typer.Option(
        "--repeat",
        min=1,
        max=10**6,
        help="Passes over the folder per epoch, each with fresh crops: for folders of a few dozen images, so "
        "that an epoch (and its checkpoint and preview) is not a step.",
    ),
]
NormPixLoss = Annotated[
    bool,
    typer.Option(
        "--norm-pix-loss/--no-norm-pix-loss",
        help="Predict per-patch normalized pixels (the paper's better setting).",
    ),
]
DecoderDim = Annotated[
    int | None,
    typer.Option(
        "--decoder-dim", min=4, max=8192, help="Decoder width [default: the model's: 128 tiny, 256 small, 512]."
    ),
]
DecoderDepth = Annotated[
    int | None,
    typer.Option("--decoder-depth", min=1, max=64, help="Decoder blocks [default: the model's: 4 tiny and small, 8]."),
]
DecoderHeads = Annotated[
    int | None,
    typer.Option("--decoder-heads", min=1, max=256, help="Decoder heads [default: the model's: 4 tiny, 8 small, 16]."),
]
EmbedDim = Annotated[
    int | None, typer.Option("--embed-dim", min=4, max=16384, help="Encoder width [default: the model's].")
]
Depth = Annotated[int | None, typer.Option("--depth", min=1, max=256, help="Encoder blocks [default: the model's].")]
NumHeads = Annotated[
    int | None, typer.Option("--num-heads", min=1, max=256, help="Encoder heads [default: the model's].")
]
InitFrom = Annotated[
    Path | None,
    typer.Option(
        "--init-from",
        help="Start from these weights (fresh optimizer); any --weights form, Hub ids too. Weights of another band "
        "count are adapted to the data's (RGB filters cycled over the bands).",
    ),
]
Previews = Annotated[
    int,
    typer.Option(
        "--previews",
        min=0,
        max=64,
        help="Images in the reconstruction preview saved at each epoch end to previews/, at most 64 (0: none).",
    ),
]
ProbeFolder = Annotated[
    Path | None,
    typer.Option(
        "--probe",
        help="Labelled folder (as for `maecli probe`): run the kNN probe at each epoch end, log knn_top1 to "
        "metrics.jsonl.",
    ),
]


def pretrain(
    ctx: typer.Context,
    data: Annotated[
        Path,
        typer.Argument(
            metavar="DATA",
            help="Folder of images, searched at any depth (no labels needed), or tar shards: "
            "'shards/train-{000000..000099}.tar'.",
        ),
    ],
    out: RunOut = None,
    model: Model = "vit-base",
    img_size: ImgSize = 224,
    patch_size: PatchSize = None,
    in_chans: InChans = None,
    bands: Bands = None,
    mask: Mask = 0.75,
    epochs: Epochs = 100,
    steps: Steps = None,
    repeat: Repeat = 1,
    batch_size: TrainBatchSize = 64,
    blr: Blr = 1.5e-4,
    lr: Lr = None,
    warmup_epochs: WarmupEpochs = 5,
    accum_iter: AccumIter = 1,
    clip_grad: ClipGrad = None,
    weight_decay: WeightDecay = 0.05,
    precision: TrainPrecision = "auto",
    workers: Workers = None,
    seed: Seed = 0,
    save_every: SaveEvery = 500,
    keep: Keep = 2,
    log_every: LogEvery = 10,
    resume: Resume = False,
    overwrite: Overwrite = False,
    allow_data_change: AllowDataChange = False,
    norm_pix_loss: NormPixLoss = True,
    decoder_dim: DecoderDim = None,
    decoder_depth: DecoderDepth = None,
    decoder_heads: DecoderHeads = None,
    embed_dim: EmbedDim = None,
    depth: Depth = None,
    num_heads: NumHeads = None,
    init_from: InitFrom = None,
    previews: Previews = 4,
    show_bands: ShowBands = None,
    probe: ProbeFolder = None,
    log_with: LogWith = [],  # noqa: B006 (typer copies its defaults)
):
    """Pretrain a Masked Autoencoder on a folder of images.

    Writes config.json, model.safetensors, metrics.jsonl, checkpoints/ and previews/ into the run folder.

    --resume continues the run in --out with its saved settings; give --epochs or --steps again to extend it.
    Ctrl-C or SIGTERM saves a checkpoint and exits with 130 or 143.
    """
    check_run_flags(out, resume, overwrite)
    if not data.exists() and not str(data).endswith(".tar"):  # shards: their names are checked once expanded
        fail(f"data folder {data} does not exist")
    if probe is not None and not probe.is_dir():
        fail(f"probe folder {probe} does not exist")
    quiet_libraries()
    from ..runtime import default_device
    from ..train.pretrain import TrainArgs
    from ..train.pretrain import pretrain as run_pretrain

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


def shard(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="Folder of images, searched as pretrain does.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write the shards into.")],
    per_shard: Annotated[
        int, typer.Option("--per-shard", min=1, max=10**7, help="Images in each shard (the last may hold fewer).")
    ] = 1000,
    prefix: Annotated[
        str, typer.Option("--prefix", metavar="<name>", help="Shard file names: PREFIX-000000.tar, ...")
    ] = "shard",
):
    """Write a folder's images into tar shards (WebDataset layout: KEY.jpg members, the files' bytes unchanged).

    Prints the shards' pattern on stdout, for `maecli pretrain PATTERN` and `maecli embed PATTERN`. The images keep
    pretrain's order (sorted paths); each key is the file's path inside FOLDER without its suffix.
    """
    if not folder.is_dir():
        fail(f"{folder} is not a folder")
    if "/" in prefix or not prefix:
        fail(f"--prefix {prefix!r} must be a plain file name", 2)
    if any(out.glob(f"{prefix}-*.tar")):
        fail(f"{out} already holds {prefix}-*.tar shards; choose another OUT or --prefix")
    from ..console import console, warn
    from ..shards import write_shards

    with reported():
        pattern, written, count = write_shards(
            folder, out, per_shard, prefix=prefix, on_error=lambda path, why: warn(f"skipped {path}: {why}")
        )
    console.print(f"wrote {written} images into {count} shard(s) in {out}")
    typer.echo(pattern)


# finetune's own options: the subset, the baseline and the paper's recipe
Fraction = Annotated[
    str | None,
    typer.Option(
        "--fraction",
        metavar="<F[,F...]>",
        help="Train on this fraction of each class's training images (a seeded stratified subset): the few-labels "
        "case. Several (0.01,0.1,1) run a sweep: each fraction fine-tuned and trained from scratch, in "
        "RUN/fraction-F/seed-S, summed up in one table and RUN/sweep.json (maecli plot RUN draws it).",
    ),
]
Seeds = Annotated[
    int,
    typer.Option(
        "--seeds",
        min=1,
        max=1000,
        help="Run each fraction with this many seeds (--seed, --seed + 1, ...: each its own subset, init and order) "
        "and report mean ± std; more than 1 makes a sweep.",
    ),
]
PerClass = Annotated[
    int | None,
    typer.Option("--per-class", min=1, max=10**9, help="Train on at most N images of each class (seeded)."),
]
FinetuneBaseline = Annotated[
    bool,
    typer.Option(
        "--baseline",
        help="Also train the same architecture from random init with the same recipe, seed and data order, "
        "into RUN/baseline, and show both.",
    ),
]
MinLr = Annotated[float, typer.Option("--min-lr", min=0.0, callback=finite, help="Where the cosine schedule ends.")]
LayerDecay = Annotated[
    float,
    typer.Option(
        "--layer-decay",
        min=0.0,
        max=1.0,
        callback=finite,
        help="Layer-wise lr decay: each block trains this many times slower than the one above it (1: no decay).",
    ),
]
DropPath = Annotated[
    float,
    typer.Option("--drop-path", min=0.0, max=0.99, callback=finite, help="Stochastic depth rate, below 1."),
]


class Recipe(str, Enum):
    auto = "auto"
    paper = "paper"
    light = "light"


RecipeName = Annotated[
    Recipe,
    typer.Option(
        "--recipe",
        help="What the regularisation flags below default to. paper: the MAE paper's (Mixup, CutMix, RandAugment, "
        "erasing, blr 1e-3, warmup 5 epochs); light: none of them, blr 5e-3, crop scale 0.35, warmup 10% of the "
        "run; auto: paper from 2000 optimizer steps on, light below (measured: docs/finetune.md).",
    ),
]
RECIPE_DEFAULT = " [default: the recipe's]"
FinetuneBlr = Annotated[
    float | None,
    typer.Option("--blr", min=0.0, callback=finite, help="Base learning rate: lr = blr x effective batch / 256."
                 + RECIPE_DEFAULT),
]  # fmt: skip
FinetuneWarmup = Annotated[
    float | None,
    typer.Option("--warmup-epochs", min=0.0, max=10**7, callback=finite, help="Linear warmup, in epochs."
                 + RECIPE_DEFAULT),
]  # fmt: skip
CropScale = Annotated[
    float | None,
    typer.Option("--crop-scale", min=0.01, max=1.0, callback=finite,
                 help="Smallest area the random resized crop keeps, as a fraction of the image." + RECIPE_DEFAULT),
]  # fmt: skip
Mixup = Annotated[
    float | None, typer.Option("--mixup", min=0.0, callback=finite, help="Mixup alpha (0: off)." + RECIPE_DEFAULT)
]
Cutmix = Annotated[
    float | None, typer.Option("--cutmix", min=0.0, callback=finite, help="CutMix alpha (0: off)." + RECIPE_DEFAULT)
]
Smoothing = Annotated[
    float, typer.Option("--smoothing", min=0.0, max=0.99, callback=finite, help="Label smoothing, below 1.")
]
Reprob = Annotated[
    float | None,
    typer.Option("--reprob", min=0.0, max=1.0, callback=finite, help="Random erasing probability." + RECIPE_DEFAULT),
]
Aa = Annotated[
    str | None,
    typer.Option("--aa", metavar="<policy>", help="timm RandAugment policy, or none." + RECIPE_DEFAULT),
]
FinetuneImgSize = Annotated[
    int | None,
    typer.Option(
        "--img-size",
        min=8,
        max=4096,
        help="Input size [default: the weights'; another size resizes the position embeddings].",
    ),
]


def finetune(
    ctx: typer.Context,
    data: LabelledData,
    weights: EncoderWeights = None,
    out: RunOut = None,
    val: Val = None,
    val_split: ValSplit = None,
    fraction: Fraction = None,
    per_class: PerClass = None,
    seeds: Seeds = 1,
    baseline: FinetuneBaseline = False,
    json_out: Json = False,
    epochs: Epochs = 50,
    steps: Steps = None,
    batch_size: TrainBatchSize = 64,
    recipe: RecipeName = Recipe.auto,
    blr: FinetuneBlr = None,
    lr: Lr = None,
    min_lr: MinLr = 1e-6,
    warmup_epochs: FinetuneWarmup = None,
    accum_iter: AccumIter = 1,
    clip_grad: ClipGrad = None,
    weight_decay: WeightDecay = 0.05,
    layer_decay: LayerDecay = 0.75,
    drop_path: DropPath = 0.1,
    mixup: Mixup = None,
    cutmix: Cutmix = None,
    smoothing: Smoothing = 0.1,
    reprob: Reprob = None,
    aa: Aa = None,
    crop_scale: CropScale = None,
    pool: Pooling = Pool.mean,
    img_size: FinetuneImgSize = None,
    precision: TrainPrecision = "auto",
    workers: Workers = None,
    seed: Seed = 0,
    save_every: SaveEvery = 500,
    keep: Keep = 2,
    log_every: LogEvery = 10,
    resume: Resume = False,
    overwrite: Overwrite = False,
    allow_data_change: AllowDataChange = False,
    log_with: LogWith = [],  # noqa: B006 (typer copies its defaults)
):
    """Fine-tune a pretrained MAE encoder into a classifier on a labelled folder (the paper's recipe, or a light one
    for short runs: --recipe).

    Validates at each epoch end (val_top1, val_top5, val_loss in metrics.jsonl) and keeps the best epoch's
    classifier in RUN/model.safetensors; config.json holds the classes in order and the recipe, per_class.json
    the best epoch's accuracy per class. With --baseline the same recipe from random init runs next, into
    RUN/baseline, and the closing table shows both.

    --resume continues an interrupted run (and its baseline) exactly. Ctrl-C or SIGTERM saves a checkpoint and
    exits with 130 or 143.
    """
    check_run_flags(out, resume, overwrite)
    if weights is None and not resume:
        fail("missing --weights: the pretrained encoder to fine-tune", 2)
    for path in (data, val):
        if path is not None and not path.exists():
            fail(f"{path} does not exist")
    if weights_missing(weights):
        fail(f"{weights} does not exist")
    quiet_libraries()
    from ..console import console, plural
    from ..runtime import default_device
    from ..train.finetune import FinetuneArgs, json_summary, result_table, stopped_message
    from ..train.finetune import finetune as run_finetune
    from ..train.sweep import parse_fractions

    host.tune_for_cpu(default_device())
    with reported():
        fractions = parse_fractions(fraction) if fraction is not None else [None]
    args = command_args(ctx, FinetuneArgs, weights=str(weights) if weights else "", fraction=fractions[0])
    given = given_flags(ctx)
    if len(fractions) > 1 or seeds > 1:
        return finetune_sweep(args, fractions, seeds, given, json_out)
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
                f"{name}: best epoch {r['best_epoch']}, weights in {r['weights']}; "
                f"{plural(r['skipped'], 'unreadable training file')} skipped, "
                f"{plural(r['val_unreadable'], 'validation file')}"
            )
    if json_out:
        import json

        typer.echo(json.dumps(json_summary(result)))


def finetune_sweep(args, fractions: list, seeds: int, given: set[str], json_out: bool) -> None:
    """finetune with several fractions or seeds: every pair, then one table (stderr) and its JSON (--json)."""
    import json
    import signal

    from ..console import console
    from ..train.sweep import sweep, sweep_table

    if fractions == [None]:
        fractions = [1.0]
    try:
        with reported():
            summary = sweep(args, fractions, seeds, given)
    except KeyboardInterrupt:
        fail("interrupted; the checkpoints on disk are complete (continue with --resume)", 130)
    if summary["signal"] is not None:
        stopped = summary["stopped"]
        console.print(
            f"[yellow]stopped at step {stopped['steps']}/{stopped['total_steps']} of {stopped['out']}; checkpoint "
            f"saved.[/] Continue the sweep with the same command and --resume"
        )
        raise typer.Exit(130 if summary["signal"] == signal.SIGINT else 143)
    console.print(sweep_table(summary))
    console.print(f"each pair's run folder is in {summary['out']}; the summary in {summary['out']}/sweep.json")
    if json_out:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k not in ("signal", "out")}))
