"""The `maecli` command line: parse, validate at the boundary, call the library, format the result.

torch, timm and friends are imported inside the commands, so `--help` and argument errors stay fast.
Every user error ends as one line `error: ...` on stderr: exit 2 for a bad command line, 1 for anything else.
"""

from __future__ import annotations

import contextlib
import os
import sys
from enum import Enum
from pathlib import Path

import typer

from . import host
from .errors import UsageError, UserError
from .presets import PRESETS
from .runtime import Precision

app = typer.Typer(
    name="maecli",
    help="Masked Autoencoder (MAE) pretraining on plain image folders, and tools to use the result.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help: typer's rich formatter imports rich.markdown and pygments on every `--help`, and its markup
    # would swallow literal "[default: ...]" in option help
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ModelName = Enum("ModelName", {name.replace("-", "_"): name for name in PRESETS}, type=str)


class Pool(str, Enum):
    mean = "mean"
    cls = "cls"


# --log-with's choices (trackers.TRACKERS, plus all and none), shared by the training commands
Tracker = Enum(
    "Tracker", {name: name for name in ("tensorboard", "trackio", "mlflow", "wandb", "all", "none")}, type=str
)
LOG_WITH_HELP = (
    "Also log to a tracker, inside RUN/logs and offline (repeatable): tensorboard, trackio, mlflow, "
    "wandb; all: every one installed; none: stop logging to them on --resume. Each is an extra: "
    'pip install "maecli[tensorboard]".'
)


TRAIN_PRECISION_HELP = (
    "auto (default): bf16 where it is faster than fp32 (GPUs with bf16, CPUs with AMX or AMD's "
    "AVX512-BF16), else fp32; no: fp32; bf16; fp16."
)
INFERENCE_PRECISION_HELP = (
    "no (default): fp32, so an image's result does not depend on its batch; auto: bf16 where it is faster; bf16; fp16."
)
WEIGHTS_HELP = (
    "A maecli run folder or weights file, an original MAE .pth, a timm ViT state dict, or a Hugging Face ViTMAE folder."
)
WORKERS_HELP = "Image decoding processes [default: chosen for this machine]."


@app.callback()
def _root():
    """Masked Autoencoder (MAE) pretraining on plain image folders, and tools to use the result."""
    host.configure_openmp()  # before any command imports torch: libgomp reads it once
    exit_on_sigterm()


def exit_on_sigterm():
    """SIGTERM ends any command with exit status 143 the way an error does: `finally` blocks run, so temporary
    files go and loader workers stop. (Killed by the signal, a process leaves both behind.) Training loops catch
    it themselves for a clean checkpoint, and put this back when they end: teardown exits 143 too."""
    import signal

    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a repeated SIGTERM does not cut the clean-up short
        with contextlib.suppress(OSError):
            sys.stderr.write("terminated (SIGTERM)\n")
        raise SystemExit(143)

    with contextlib.suppress(ValueError):  # not the main thread (an embedding application): leave it alone
        signal.signal(signal.SIGTERM, terminated)


def finite(value: float | None) -> float | None:
    """Option callback: a number flag must be a finite number (inf and nan pass click's range checks)."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def fail(message: str, code: int = 1):
    """One sentence on stderr and a non-zero exit: how every user error ends. Under `accelerate launch` every rank
    meets the same error; only the main one says it."""
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def reported():
    """Turn the library's user errors into `fail`: exit 2 for settings that cannot work together, else 1."""
    try:
        yield
    except UsageError as e:
        fail(str(e), 2)
    except (UserError, FileNotFoundError, PermissionError) as e:
        if getattr(e, "filename", None) == STDOUT:
            drop_stdout()
        fail(str(e))


STDOUT = "standard output"  # the name write errors on stdout go by (files.guarded)


def drop_stdout():
    """Point stdout at /dev/null: what is still buffered for a stdout that failed (a full disk, a closed pipe)
    would fail again when Python flushes it at exit, with a second message and exit status 120."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def quiet_libraries():
    """Keep library chatter (accelerate, torch) off the user's screen; Python warnings print as one line."""
    import logging
    import warnings

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def load_model(weights: Path):
    """The model from any weights maecli reads, on the best device; host tuning where that device is the CPU."""
    import maecli

    from .runtime import default_device

    device = default_device()
    host.tune_for_cpu(device)
    return maecli.load(weights).to(device)


def workers_or_default(workers: int | None) -> int:
    from .runtime import default_workers

    return default_workers() if workers is None else workers


def command_args(ctx: typer.Context, cls, **overrides):
    """A training command's arguments dataclass from its parsed options: choices by value, paths as strings."""
    import dataclasses

    def plain(value):
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, list | tuple):
            return tuple(plain(v) for v in value)
        return value

    names = {f.name for f in dataclasses.fields(cls)} - set(overrides)
    return cls(**{k: plain(v) for k, v in ctx.params.items() if k in names}, **overrides)


def given_flags(ctx: typer.Context) -> set[str]:
    """The options the user set explicitly: on --resume, those a run may change override its saved settings.
    (By name: typer may bundle its own copy of click, whose ParameterSource is another class.)"""
    return {
        name
        for name in ctx.params
        if getattr(ctx.get_parameter_source(name), "name", "") in ("COMMANDLINE", "ENVIRONMENT")
    }


@app.command()
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
    from .runtime import default_device
    from .train.pretrain import TrainArgs
    from .train.pretrain import pretrain as run_pretrain

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


class ExportFormat(str, Enum):
    timm = "timm"
    hf = "hf"


@app.command()
def export(
    run: Path = typer.Argument(..., help="A maecli run folder, or any weights --weights accepts."),
    out: Path = typer.Argument(..., help="timm: the .safetensors file to write; hf: the folder to write."),
    format: ExportFormat = typer.Option(
        ...,
        "--format",
        "-f",
        help="timm: the encoder as a timm ViT state dict; hf: a Hugging Face transformers ViTMAE folder.",
    ),
    model: ModelName | None = typer.Option(
        None, "--model", help="Heads hint for weights that do not record them (original and timm files)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
):
    """Write weights for timm or Hugging Face transformers, and print the Python that loads them.

    timm: one safetensors file that timm.create_model(..., num_classes=0) loads with strict=True (the encoder).
    hf: config.json + model.safetensors for transformers' ViTMAEForPreTraining (ViTMAEModel without a decoder).
    """
    if format is ExportFormat.timm and out.is_dir():
        fail(f"{out} is a folder; --format timm writes one .safetensors file", 2)
    if format is ExportFormat.hf and out.exists() and not out.is_dir():
        fail(f"{out} is a file; --format hf writes a folder", 2)
    # a device or a FIFO (/dev/null) holds nothing to lose: only a regular file or a model folder is taken
    taken = out.is_file() or (out.is_dir() and any((out / n).exists() for n in ("config.json", "model.safetensors")))
    if taken and not overwrite:
        fail(f"{out} already holds weights; pass --overwrite to replace them")
    if not run.exists():
        fail(f"weights not found: {run}")
    quiet_libraries()
    from .export import export as run_export

    with reported():
        snippet = run_export(run, out, format.value, model_hint=model.value if model else None)
    typer.echo(f"wrote {out}; load it with:\n{snippet}", err=True)
    typer.echo(str(out))


@app.command()
def reconstruct(
    images: list[Path] = typer.Argument(..., help="Image files, any format pretrain reads."),
    weights: Path = typer.Option(
        ...,
        "--weights",
        "-w",
        help="A maecli run folder or weights file, or an original/Hugging Face MAE with its decoder.",
    ),
    mask: float = typer.Option(
        0.95, "--mask", callback=finite, help="Fraction of patches hidden, strictly between 0 and 1."
    ),
    seed: int = typer.Option(
        0, "--seed", min=0, max=2**63 - 1, help="Seed of the mask: the same seed gives the same picture."
    ),
    out: str = typer.Option("reconstruction.png", "--out", "-o", help="PNG to write; - writes it to stdout."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per image to stdout."),
    patch_stats: bool = typer.Option(
        True,
        "--patch-stats/--no-patch-stats",
        help="Norm-pix-loss models: un-normalize the prediction with each patch's "
        "true mean and variance, or show it raw.",
    ),
    zoom: int = typer.Option(1, "--zoom", min=1, max=16, help="Enlarge the tiles this many times (nearest pixel)."),
    precision: Precision = typer.Option("no", "--precision", help=INFERENCE_PRECISION_HELP),
):
    """Show what the model fills in: mask each image, reconstruct it, save a labelled grid.

    One row per image: original | masked (hidden patches grey) | prediction | prediction + visible patches.

    Images are resized (shorter side) and center-cropped to the model's size.

    The error per image is the MSE on hidden patches in the loss's space: normalized pixels (ImageNet mean
    and std; 0.5 for one channel), each patch also normalized by its own mean and variance when the model used
    norm-pix-loss.
    """
    if not 0 < mask < 1:
        fail(f"--mask must lie strictly between 0 and 1, got {mask}", 2)
    if out == "-" and as_json:
        fail("--out - and --json both write to stdout; pick one", 2)
    if out != "-":
        from .files import output_target

        with reported():
            output_target(out)  # a folder or a socket as --out: say so before the work
    quiet_libraries()
    import json

    from .console import console, warn
    from .reconstruct import png_bytes, render, write_png
    from .reconstruct import reconstruct as run_reconstruct

    with reported():
        model = load_model(weights)
        rec = run_reconstruct(
            model, images, mask_ratio=mask, seed=seed, use_patch_stats=patch_stats, precision=precision.value
        )
    data = png_bytes(render(rec, zoom))
    if min(rec.hidden) == model.cfg.num_patches:
        warn(
            f"at --mask {mask:g} none of the {model.cfg.num_patches} patches stays visible: the decoder sees "
            f"nothing but position"
        )
    if rec.note():
        console.print(f"note: {rec.note()}")
    for r in rec.records():
        console.print(f"{r['image']}: hidden-patch MSE {r['mse']:.4f} ({r['hidden']} of {r['patches']} patches hidden)")
        if as_json:
            typer.echo(json.dumps(r))
    if out == "-":
        from .files import guarded

        try:
            with reported():
                stdout = guarded(typer.get_binary_stream("stdout"), STDOUT)
                stdout.write(data)
                stdout.flush()
        except BrokenPipeError:
            stdout_closed_early()
        return
    with reported():
        write_png(data, out)
    console.print(f"wrote {out} ({len(rec.names)} rows x 4 columns, {rec.original.shape[-1] * zoom} px tiles)")


class OutputFormat(str, Enum):
    jsonl = "jsonl"
    csv = "csv"
    npy = "npy"


def stdout_closed_early():
    """The reader (`head`, a closed pager) has what it wanted: stop quietly with success.

    Pointing stdout at /dev/null keeps Python from failing again when it flushes stdout at exit.
    """
    drop_stdout()
    raise typer.Exit(0)


@app.command()
def embed(
    inputs: list[str] = typer.Argument(
        ...,
        metavar="INPUT",
        help="Image files, folders (searched at any depth), or - to read newline-separated paths from stdin.",
    ),
    weights: Path = typer.Option(..., "--weights", "-w", help=WEIGHTS_HELP),
    fmt: OutputFormat = typer.Option(
        OutputFormat.jsonl,
        "--format",
        "-f",
        help='jsonl: {"path", "embedding"} per line; csv: path,e0,e1,...; '
        "npy: float32 array in -o FILE, paths in FILE.paths.jsonl (one "
        "JSON string per line: line i is row i).",
    ),
    pool: Pool = typer.Option(Pool.mean, "--pool", help="mean: average of the patch tokens; cls: the cls token."),
    normalize: bool = typer.Option(False, "--normalize", help="Scale each vector to unit length."),
    batch_size: int = typer.Option(
        64, "--batch-size", min=1, max=10**5, help="Images per forward pass (does not change the vectors)."
    ),
    workers: int | None = typer.Option(None, "--workers", min=0, max=256, help=WORKERS_HELP),
    precision: Precision = typer.Option("no", "--precision", help=INFERENCE_PRECISION_HELP),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write here instead of stdout (required for npy)."),
    strict: bool = typer.Option(
        False, "--strict", help="Stop with an error at the first unreadable image instead of skipping it."
    ),
):
    """Write one embedding per image: the whole image through the encoder, no masking.

    Each batch is written as soon as it is encoded, in input order, so it works inside pipelines:

    find photos -name '*.jpg' | maecli embed - -w runs/x > emb.jsonl

    Unreadable images are skipped with a warning and counted (exit 0), unless --strict.
    """
    to_file = output is not None and str(output) != "-"
    if fmt is OutputFormat.npy and not to_file:
        fail("npy is a binary format: write it to a file with -o FILE (the paths go to FILE.paths.jsonl)", 2)
    for item in inputs:
        if item != "-" and not Path(item).exists():
            fail(f"{item} does not exist")
    quiet_libraries()
    from .console import console
    from .embedding import write_embeddings
    from .files import guarded

    out = None
    if not to_file:
        sys.stdout.reconfigure(errors="surrogateescape")  # paths that are not UTF-8 pass through as bytes
        out = guarded(sys.stdout, STDOUT)
    try:
        with reported():
            model = load_model(weights)
            summary = write_embeddings(
                model,
                inputs,
                fmt=fmt.value,
                out=out,
                out_path=output if to_file else None,
                pool=pool.value,
                normalize=normalize,
                batch_size=batch_size,
                workers=workers_or_default(workers),
                precision=precision.value,
                strict=strict,
                console=console,
            )
    except BrokenPipeError:
        stdout_closed_early()
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    n, seconds = summary["embedded"], summary["seconds"]
    console.print(
        f"embedded {n} image{'s' if n != 1 else ''} ({summary['dim']}-d, {pool.value} pool) in {seconds:.1f}s, "
        f"{n / max(seconds, 1e-9):.1f} img/s"
        + (f"; [yellow]{summary['skipped']} unreadable file(s) skipped[/]" if summary["skipped"] else "")
        + (f"; written to {output}" if to_file else "")
    )


class ProbeMethod(str, Enum):
    knn = "knn"
    linear = "linear"
    both = "both"


@app.command()
def probe(
    data: Path = typer.Argument(
        ..., help="Labelled folder: one subfolder per class, or train/ and val/ (or test/) that each hold them."
    ),
    weights: Path = typer.Option(..., "--weights", "-w", help=WEIGHTS_HELP),
    val: Path | None = typer.Option(
        None, "--val", help="Validation folder with the same class subfolders (when DATA holds no train/ and val/)."
    ),
    val_split: float | None = typer.Option(
        None,
        "--val-split",
        callback=finite,
        help="Fraction of each class held out when there is no validation folder (default 0.2).",
    ),
    method: ProbeMethod = typer.Option(ProbeMethod.both, "--method", help="kNN, linear probe, or both."),
    k: int = typer.Option(20, "--k", min=1, max=10**5, help="Neighbours that vote in the kNN probe."),
    epochs: int = typer.Option(
        100, "--epochs", min=1, max=10**5, help="Linear probe epochs (on cached features: fast)."
    ),
    baseline: bool = typer.Option(
        False, "--baseline", help="Also probe a random-init encoder of the same architecture, side by side."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the accuracies as JSON on stdout."),
    seed: int = typer.Option(
        0, "--seed", min=0, max=2**63 - 1, help="Seed for the split, the linear probe and the baseline's init."
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1, max=10**5, help="Images per forward pass."),
    workers: int | None = typer.Option(None, "--workers", min=0, max=256, help=WORKERS_HELP),
    precision: Precision = typer.Option("no", "--precision", help=INFERENCE_PRECISION_HELP),
):
    """Measure how good the embeddings are: kNN and linear probes on a labelled folder.

    Features are the frozen encoder's (whole image, mean-pooled), extracted once per split.

    Accuracies go to stderr as a table, and to stdout as JSON with --json.
    """
    if val is not None and val_split is not None:
        fail("--val and --val-split contradict each other; pick one", 2)
    if val_split is not None and not 0 < val_split < 1:
        fail(f"--val-split must lie strictly between 0 and 1, got {val_split}", 2)
    for path in (data, val):
        if path is not None and not path.exists():
            fail(f"{path} does not exist")
    quiet_libraries()
    from .console import console
    from .labelled import load_labelled
    from .probe import result_table, run_probe

    try:
        with reported():
            labelled = load_labelled(data, val, val_split, seed)
            model = load_model(weights)
            console.print(
                f"probe: {len(labelled.train.paths)} train / {len(labelled.val.paths)} val images, "
                f"{len(labelled.classes)} classes ({labelled.layout})"
            )
            result = run_probe(
                model,
                labelled,
                method=method.value,
                k=k,
                epochs=epochs,
                baseline=baseline,
                seed=seed,
                batch_size=batch_size,
                workers=workers_or_default(workers),
                precision=precision.value,
                console=console,
            )
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    console.print(result_table(result))
    if json_out:
        import json

        typer.echo(json.dumps(result))


def block_sigterm():
    """Hold back a SIGTERM from here to the end: Python's finalization puts the default handlers back, and a signal
    arriving then would kill the process (status -15) after the command has already ended with its own."""
    import signal

    with contextlib.suppress(AttributeError, ValueError, OSError):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def main():
    import atexit

    exit_on_sigterm()
    atexit.register(block_sigterm)  # registered before any library's hook, so it runs after all of them
    try:
        app()
    except OSError as e:  # a write to stdout or stderr that failed outside any command's own handling
        drop_stdout()
        with contextlib.suppress(OSError):
            sys.stderr.write(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}\n")
        sys.exit(1)
    finally:
        # The command is over; what is left is the interpreter's own exit (atexit hooks, library finalizers), where
        # an exception would only print a traceback: a SIGTERM now ends the process at once, with 143.
        import signal

        def now(signum, frame):
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            os._exit(143)

        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, now)


# --- commands added by other issues below ---


@app.command()
def serve(
    weights: Path = typer.Option(..., "--weights", "-w", help=WEIGHTS_HELP),
    images: Path | None = typer.Option(
        None,
        "--images",
        help="Folder of images (any depth) to pick from and to search for similar ones; embedded once, then cached.",
    ),
    address: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to listen on; the default keeps the page on this machine (there is no login).",
    ),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on (0: any free one)."),
):
    """Open a web page on a model: reconstructions under a mask slider, training progress, similar images.

    Reconstruct: drop an image or pick one from --images, move the mask slider; the picture is the one
    `maecli reconstruct` writes for the same image, mask and seed. Training progress: the run folder's previews
    and loss curve. Similar images: nearest neighbours in --images by cosine similarity of the embeddings.

    Needs the serve extra: pip install "maecli[serve]". Ctrl-C stops it.
    """
    if images is not None and not images.is_dir():
        fail(f"--images {images} is not a folder")
    if not weights.exists():
        fail(f"weights not found: {weights}")
    from .serve import require_extra
    from .serve import serve as run_serve

    with reported():
        require_extra()
    quiet_libraries()
    try:
        with reported():
            run_serve(weights, images, address, port, model=load_model(weights))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
def plot(
    runs: list[Path] = typer.Argument(..., help="Run folders (or their metrics.jsonl files) to draw, overlaid."),
    out: Path = typer.Option(Path("curves.png"), "--out", "-o", help="The PNG to write."),
):
    """Draw a run's curves as one picture: loss, learning rate, and every other logged series (kNN top-1,
    validation accuracy, ...), one panel each.

    Several runs are overlaid with a legend, labelled by folder name, to compare recipes. A run still in progress
    shows its rows so far. The written path goes to stdout.

    Needs matplotlib: pip install "maecli[plot]".
    """
    from .console import console, warn
    from .plot import plot_runs

    with reported():
        written = plot_runs(runs, out, warn=warn)
    console.print(f"curves of {len(runs)} run{'s' if len(runs) != 1 else ''} drawn in {written}")
    typer.echo(str(written))


@app.command()
def info(
    run: Path = typer.Argument(..., help="A run folder, or weights: " + WEIGHTS_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of the summary."),
):
    """Say what a run is and where it stands: model and size, data, recipe, step of total, last and best loss,
    best kNN or validation accuracy, skipped files, checkpoints (which can resume) and the weights file.

    Works on a run in progress, a finished or killed one, a finetune run, and on plain weights (what
    maecli.load infers from them).
    """
    quiet_libraries()
    from .info import format_info, run_info

    with reported():
        summary = run_info(run)
    if json_out:
        import json

        typer.echo(json.dumps(summary))
    else:
        typer.echo(format_info(summary))


@app.command()
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
    from .console import console
    from .runtime import default_device
    from .train.finetune import FinetuneArgs, json_summary, result_table, stopped_message
    from .train.finetune import finetune as run_finetune

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


class PredictFormat(str, Enum):
    jsonl = "jsonl"
    csv = "csv"


@app.command()
def predict(
    inputs: list[str] = typer.Argument(
        ...,
        metavar="INPUT",
        help="Image files, folders (searched at any depth), or - to read newline-separated paths from stdin.",
    ),
    weights: Path = typer.Option(
        ..., "--weights", "-w", help="A `maecli finetune` run folder or its model.safetensors."
    ),
    fmt: PredictFormat = typer.Option(
        PredictFormat.jsonl,
        "--format",
        "-f",
        help='jsonl: {"path", "class", "probability", "top_k"} per line; csv: '
        "path,class,probability,class_2,probability_2,...",
    ),
    top_k: int = typer.Option(5, "--top-k", min=1, max=10**5, help="Classes listed per image (at most all)."),
    batch_size: int = typer.Option(
        64, "--batch-size", min=1, max=10**5, help="Images per forward pass (does not change the results)."
    ),
    workers: int | None = typer.Option(None, "--workers", min=0, max=256, help=WORKERS_HELP),
    precision: Precision = typer.Option("no", "--precision", help=INFERENCE_PRECISION_HELP),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write here instead of stdout (written whole at the end)."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Stop with an error at the first unreadable image instead of skipping it."
    ),
):
    """Label images with a fine-tuned classifier: the predicted class, its probability and the top k.

    Each batch is written as soon as it is classified, in input order, so it works inside pipelines:

    find photos -name '*.jpg' | maecli predict - -w runs/ft > labels.jsonl

    Images are read as validation reads them (shorter side resized, center-cropped). Unreadable images are
    skipped with a warning and counted (exit 0), unless --strict.
    """
    for item in inputs:
        if item != "-" and not Path(item).exists():
            fail(f"{item} does not exist")
    if not weights.exists():
        fail(f"weights not found: {weights}")
    to_file = output is not None and str(output) != "-"
    if to_file and output.is_dir():
        fail(f"--output {output} is a folder; give a file", 2)
    quiet_libraries()
    from .classifier import load_classifier
    from .console import console
    from .files import guarded, open_output
    from .prediction import write_predictions
    from .runtime import default_device

    try:
        with reported(), contextlib.ExitStack() as files:
            device = default_device()
            host.tune_for_cpu(device)
            model, classes = load_classifier(weights)
            model = model.to(device)
            if to_file:  # whole or not at all, as every output (files.open_output)
                out = files.enter_context(
                    open_output(output, "w", encoding="utf-8", errors="surrogateescape", newline="")
                )
            else:
                sys.stdout.reconfigure(errors="surrogateescape")  # paths that are not UTF-8 pass through as bytes
                out = guarded(sys.stdout, STDOUT)
            summary = write_predictions(
                model,
                classes,
                inputs,
                out=out,
                fmt=fmt.value,
                top_k=top_k,
                batch_size=batch_size,
                workers=workers_or_default(workers),
                precision=precision.value,
                strict=strict,
                console=console,
            )
    except BrokenPipeError:
        stdout_closed_early()
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    n, seconds = summary["predicted"], summary["seconds"]
    console.print(
        f"classified {n} image{'s' if n != 1 else ''} into {len(classes)} classes in {seconds:.1f}s"
        + (f"; [yellow]{summary['skipped']} unreadable file(s) skipped[/]" if summary["skipped"] else "")
        + (f"; written to {output}" if to_file else "")
    )
