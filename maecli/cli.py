"""The `maecli` command line: parse, validate at the boundary, call the library, format the result.

torch, timm and friends are imported inside the commands, so `--help` and argument errors stay fast.
"""
from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .heap import keep_freed_memory


def openmp_wait_env(environ, others_running: float | None) -> dict[str, str]:
    """How torch's idle OpenMP threads should wait, as environment variables to add ({}: the user chose).

    Between the hundreds of small parallel regions of a training step, libgomp's threads either spin (its
    default: up to 300,000 turns) or sleep. On a 2-core box both extremes lose (benchmarks/RESULTS.md): spinning
    threads stall everything else using the cores (a loader worker, a neighbour's job; 1.6-10x slower), and
    sleeping ones pay a wake-up at every region (a ViT-Tiny step 15-20% slower on idle cores). So: a short
    spin (GOMP_SPINCOUNT=10000) when nothing else was runnable at start, sleeping otherwise, and always
    sleeping when `accelerate launch` started several processes here (they share the cores).
    """
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    siblings = environ.get("LOCAL_WORLD_SIZE", "1")
    alone = not siblings.isdigit() or int(siblings) <= 1
    if alone and others_running is not None and others_running < 0.5:
        return {"GOMP_SPINCOUNT": "10000"}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def others_running(samples: int = 8, gap_s: float = 0.002) -> float | None:
    """Mean number of runnable threads on this machine besides this one (Linux /proc/loadavg), or None."""
    import time

    counts = []
    try:
        for _ in range(samples):
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
            time.sleep(gap_s)
    except (OSError, ValueError, IndexError):
        return None
    return sum(counts) / len(counts)


def configure_openmp():
    """Choose the OpenMP wait policy before torch loads (libgomp reads it once); a user's setting wins."""
    if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ.update(openmp_wait_env(os.environ, others_running()))


app = typer.Typer(
    name="maecli",
    help="Masked Autoencoder (MAE) pretraining on plain image folders, and tools to use the result.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help: typer's rich formatter imports rich.markdown, pygments and markdown-it (~0.2 s of
    # every `--help`), and its markup would swallow literal "[default: ...]" in option help
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class ModelName(str, Enum):
    tiny = "vit-tiny"
    small = "vit-small"
    base = "vit-base"
    large = "vit-large"
    huge = "vit-huge"


class Precision(str, Enum):
    auto = "auto"
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


@app.callback()
def _root():
    """Masked Autoencoder (MAE) pretraining on plain image folders, and tools to use the result."""
    configure_openmp()  # every command that runs a model passes here first, before it imports torch
    keep_freed_memory()  # and reuses freed memory rather than faulting in fresh pages (maecli/heap.py)


def fail(message: str, code: int = 1):
    """One sentence on stderr and a non-zero exit: how every user error ends."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def fail_once(message: str, code: int = 1):
    """`fail` on the main process only: under `accelerate launch` every rank meets the same error."""
    import os

    if os.environ.get("RANK", "0") != "0":
        raise typer.Exit(code)
    fail(message, code)


def user_errors():
    """The exceptions that mean "the user's input is wrong", imported lazily with the heavy stack."""
    from .data import DataError
    from .train import TrainError
    from .weights import WeightsError

    return (DataError, TrainError, WeightsError, FileNotFoundError, PermissionError)


def quiet_torch():
    """Keep library chatter (accelerate, torch) off the user's screen unless it matters."""
    import logging
    import warnings

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    # maecli's own warnings (e.g. resized position embeddings) read as one line, without file and line.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


@app.command()
def pretrain(
    ctx: typer.Context,
    data: Path = typer.Argument(..., help="Folder of images, searched at any depth (no labels needed)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder [default: runs/<date-time>]."),
    model: ModelName = typer.Option(ModelName.base, "--model", help="Encoder size."),
    img_size: int = typer.Option(224, "--img-size", min=8, help="Input size in pixels (square)."),
    patch_size: Optional[int] = typer.Option(None, "--patch-size", min=1,
                                             help="Patch size [default: the model's, 16 or 14]."),
    in_chans: int = typer.Option(3, "--in-chans", min=1, max=3, help="1 (grayscale) or 3 (RGB)."),
    mask: float = typer.Option(0.75, "--mask", help="Fraction of patches hidden, strictly between 0 and 1."),
    epochs: int = typer.Option(100, "--epochs", min=1, help="Passes over the folder."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Stop after this many optimizer steps "
                                                                      "(wins over --epochs)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per process per micro-batch."),
    blr: float = typer.Option(1.5e-4, "--blr", min=0.0, help="Base learning rate: lr = blr x effective batch / 256."),
    lr: Optional[float] = typer.Option(None, "--lr", min=0.0, help="Absolute learning rate (overrides --blr)."),
    warmup_epochs: float = typer.Option(5, "--warmup-epochs", min=0.0, help="Linear warmup length in epochs."),
    accum_iter: int = typer.Option(1, "--accum-iter", min=1, help="Micro-batches per optimizer step."),
    clip_grad: Optional[float] = typer.Option(None, "--clip-grad", min=0.0, help="Clip the gradient norm to this."),
    weight_decay: float = typer.Option(0.05, "--weight-decay", min=0.0, help="AdamW weight decay."),
    precision: Precision = typer.Option(Precision.auto, "--precision",
                                        help="auto: bf16 where it beats fp32 (GPUs; CPUs with AMX or AMD's "
                                             "AVX512-BF16), else fp32."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Image decoding processes "
                                                                         "[default: chosen for this machine]."),
    seed: int = typer.Option(0, "--seed", help="Seed for init, data order, crops and masks."),
    save_every: int = typer.Option(500, "--save-every", min=0, help="Checkpoint every N steps (and each epoch end)."),
    keep: int = typer.Option(2, "--keep", min=1, help="How many checkpoints to keep."),
    log_every: int = typer.Option(10, "--log-every", min=1, help="Log to metrics.jsonl every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out."),
    norm_pix_loss: bool = typer.Option(True, "--norm-pix-loss/--no-norm-pix-loss",
                                       help="Predict per-patch normalized pixels (the paper's best setting)."),
    decoder_dim: Optional[int] = typer.Option(None, "--decoder-dim", min=4, help="Decoder width [default: 512]."),
    decoder_depth: Optional[int] = typer.Option(None, "--decoder-depth", min=1, help="Decoder blocks [default: 8]."),
    decoder_heads: Optional[int] = typer.Option(None, "--decoder-heads", min=1, help="Decoder heads [default: 16]."),
    embed_dim: Optional[int] = typer.Option(None, "--embed-dim", min=4, help="Encoder width [default: the model's]."),
    depth: Optional[int] = typer.Option(None, "--depth", min=1, help="Encoder blocks [default: the model's]."),
    num_heads: Optional[int] = typer.Option(None, "--num-heads", min=1, help="Encoder heads [default: the model's]."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from these weights (fresh optimizer)."),
    previews: int = typer.Option(4, "--previews", min=0, help="Images in the reconstruction preview saved at each "
                                                              "epoch end to previews/ (0: none)."),
    probe: Optional[Path] = typer.Option(None, "--probe", help="Labelled folder (as for `maecli probe`): run the "
                                                               "kNN probe at each epoch end, log knn_top1 to "
                                                               "metrics.jsonl."),
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
    quiet_torch()
    from .train import TrainArgs, pretrain as run_pretrain

    args = TrainArgs(
        data=str(data), out=str(out) if out else None, model=model.value, img_size=img_size, patch_size=patch_size,
        in_chans=in_chans, mask=mask, epochs=epochs, steps=steps, batch_size=batch_size, blr=blr, lr=lr,
        warmup_epochs=warmup_epochs, accum_iter=accum_iter, clip_grad=clip_grad, weight_decay=weight_decay,
        precision=precision.value, workers=workers, seed=seed, save_every=save_every, keep=keep,
        log_every=log_every, resume=resume, overwrite=overwrite, norm_pix_loss=norm_pix_loss,
        decoder_dim=decoder_dim, decoder_depth=decoder_depth, decoder_heads=decoder_heads,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, init_from=str(init_from) if init_from else None,
        previews=previews,
        probe=str(probe) if probe else None,
    )
    # Flags given explicitly matter on --resume: those a run may change override its saved settings.
    # (By name: typer may bundle its own copy of click, whose ParameterSource is another class.)
    given = {name for name in ctx.params
             if getattr(ctx.get_parameter_source(name), "name", "") in ("COMMANDLINE", "ENVIRONMENT")}
    try:
        summary = run_pretrain(args, given=given)
    except (*user_errors(), ValueError) as e:
        fail_once(str(e))
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began
        fail_once("interrupted; the checkpoints on disk are complete" + (f" (continue with --out {out} --resume)"
                                                                        if out else ""), 130)
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
    format: ExportFormat = typer.Option(..., "--format", "-f", help="timm: the encoder as a timm ViT state dict; "
                                                                   "hf: a Hugging Face transformers ViTMAE folder."),
    model: Optional[ModelName] = typer.Option(None, "--model", help="Heads hint for weights that do not record "
                                                                    "them (original and timm files)."),
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
    taken = out.exists() and (not out.is_dir() or any((out / n).exists() for n in ("config.json", "model.safetensors")))
    if taken and not overwrite:
        fail(f"{out} already holds weights; pass --overwrite to replace them")
    if not run.exists():
        fail(f"weights not found: {run}")
    quiet_torch()
    from .interop import export as run_export

    try:
        snippet = run_export(run, out, format.value, model_hint=model.value if model else None)
    except user_errors() as e:
        fail(str(e))
    typer.echo(f"wrote {out}; load it with:\n{snippet}", err=True)
    typer.echo(str(out))


@app.command()
def reconstruct(
    images: list[Path] = typer.Argument(..., help="Image files, any format pretrain reads."),
    weights: Path = typer.Option(..., "--weights", "-w", help="A maecli run folder or weights file, or an "
                                                              "original/Hugging Face MAE with its decoder."),
    mask: float = typer.Option(0.95, "--mask", help="Fraction of patches hidden, strictly between 0 and 1."),
    seed: int = typer.Option(0, "--seed", help="Seed of the mask: the same seed gives the same picture."),
    out: str = typer.Option("reconstruction.png", "--out", "-o", help="PNG to write; - writes it to stdout."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per image to stdout."),
    patch_stats: bool = typer.Option(True, "--patch-stats/--no-patch-stats",
                                     help="Norm-pix-loss models: un-normalize the prediction with each patch's "
                                          "true mean and variance, or show it raw."),
    zoom: int = typer.Option(1, "--zoom", min=1, max=16, help="Enlarge the tiles this many times (nearest pixel)."),
    precision: Precision = typer.Option(Precision.no, "--precision", help="no (fp32), bf16, fp16 or auto."),
):
    """Show what the model fills in: mask each image, reconstruct it, save a labelled grid.

    One row per image: original | masked (hidden patches grey) | prediction | prediction + visible patches.

    Images are resized (shorter side) and center-cropped to the model's size.

    The error per image is the MSE on hidden patches in the loss's space: normalized pixels (ImageNet mean
    and std; 0.5 for one channel), each patch also normalized by its own mean and variance when the model used norm-pix-loss.
    """
    if not 0 < mask < 1:
        fail(f"--mask must lie strictly between 0 and 1, got {mask}", 2)
    if out == "-" and as_json:
        fail("--out - and --json both write to stdout; pick one", 2)
    if out != "-" and not Path(out).parent.is_dir():
        fail(f"cannot write {out}: folder {Path(out).parent} does not exist")
    quiet_torch()
    import json

    from rich.console import Console

    from .reconstruct import png_bytes, reconstruct as run_reconstruct, render, write_png
    from .runtime import default_device
    from .weights import load

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        model = load(weights).to(default_device())
        rec = run_reconstruct(model, images, mask_ratio=mask, seed=seed, use_patch_stats=patch_stats,
                              precision=precision.value)
    except user_errors() as e:
        fail(str(e))
    data = png_bytes(render(rec, zoom))
    if min(rec.hidden) == model.cfg.num_patches:
        console.print(f"[yellow]warning:[/] at --mask {mask:g} none of the {model.cfg.num_patches} patches stays "
                      "visible: the decoder sees nothing but position")
    if rec.norm_pix_loss:
        console.print("note: this model predicts normalized pixels; " + (
            "the prediction columns borrow each hidden patch's mean and variance from the original "
            "(--no-patch-stats to show it raw)" if patch_stats else
            "shown raw, with the dataset mean and spread: each patch's brightness and contrast are not the model's"))
    for r in rec.records():
        console.print(f"{r['image']}: hidden-patch MSE {r['mse']:.4f} ({r['hidden']} of {r['patches']} patches hidden)")
        if as_json:
            typer.echo(json.dumps(r))
    if out == "-":
        stdout = typer.get_binary_stream("stdout")
        stdout.write(data)
        stdout.flush()
        return
    try:
        write_png(data, out)
    except OSError as e:
        fail(f"cannot write {out}: {e.strerror or e}")
    console.print(f"wrote {out} ({len(rec.names)} rows x 4 columns, {rec.original.shape[-1] * zoom} px tiles)")
class OutputFormat(str, Enum):
    jsonl = "jsonl"
    csv = "csv"
    npy = "npy"


class Pool(str, Enum):
    mean = "mean"
    cls = "cls"


class InferencePrecision(str, Enum):
    auto = "auto"
    no = "no"
    bf16 = "bf16"


WEIGHTS_HELP = ("A maecli run folder or weights file, an original MAE .pth, a timm ViT state dict, or a Hugging "
                "Face ViTMAE folder.")


def load_for_inference(weights: Path):
    """The model from a run folder or weights file, on the best device; WeightsError for the user."""
    from .runtime import default_device
    from .weights import load

    return load(weights).to(default_device())


def stdout_closed_early():
    """The reader (`head`, a closed pager) has what it wanted: stop quietly with success.

    Pointing stdout at /dev/null keeps Python from failing again when it flushes stdout at exit.
    """
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise typer.Exit(0)


@app.command()
def embed(
    inputs: list[str] = typer.Argument(..., metavar="INPUT",
                                       help="Image files, folders (searched at any depth), or - to read "
                                            "newline-separated paths from stdin."),
    weights: Path = typer.Option(..., "--weights", "-w", help=WEIGHTS_HELP),
    fmt: OutputFormat = typer.Option(OutputFormat.jsonl, "--format", "-f",
                                     help="jsonl: {\"path\", \"embedding\"} per line; csv: path,e0,e1,...; "
                                          "npy: float32 array in -o FILE, paths in FILE.paths.txt."),
    pool: Pool = typer.Option(Pool.mean, "--pool", help="mean: average of the patch tokens; cls: the cls token."),
    normalize: bool = typer.Option(False, "--normalize", help="Scale each vector to unit length."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward pass (does not change "
                                                                    "the vectors)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Image decoding processes "
                                                                         "(default: chosen for this machine)."),
    precision: InferencePrecision = typer.Option(InferencePrecision.auto, "--precision",
                                                 help="auto: fp32, which keeps vectors independent of the batch; "
                                                      "bf16 is faster on some GPUs and AMX CPUs."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write here instead of stdout "
                                                                       "(required for npy)."),
    strict: bool = typer.Option(False, "--strict", help="Stop with an error at the first unreadable image "
                                                        "instead of skipping it."),
):
    """Write one embedding per image: the whole image through the encoder, no masking.

    Each batch is written as soon as it is encoded, in input order, so it works inside pipelines:

    find photos -name '*.jpg' | maecli embed - -w runs/x > emb.jsonl

    Unreadable images are skipped with a warning and counted (exit 0), unless --strict.
    """
    to_file = output is not None and str(output) != "-"
    if fmt is OutputFormat.npy:
        if not to_file:
            fail("npy is a binary format: write it to a file with -o FILE (the paths go to FILE.paths.txt)", 2)
        if output.exists() and not output.is_file():
            fail(f"refusing to write npy to {output}: not a regular file (a terminal or a device?)", 2)
    for item in inputs:
        if item != "-" and not Path(item).exists():
            fail(f"{item} does not exist")
    quiet_torch()
    from rich.console import Console

    from .embedding import write_embeddings
    from .train import default_workers

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    out = None
    try:
        model = load_for_inference(weights)
        if fmt is not OutputFormat.npy:
            if to_file:
                out = open(output, "w", encoding="utf-8", errors="surrogateescape", newline="")
            else:
                sys.stdout.reconfigure(errors="surrogateescape")  # paths that are not UTF-8 pass through as bytes
                out = sys.stdout
        summary = write_embeddings(
            model, inputs, fmt=fmt.value, out=out, out_path=output if fmt is OutputFormat.npy else None,
            pool=pool.value, normalize=normalize, batch_size=batch_size,
            workers=default_workers() if workers is None else workers, precision=precision.value, strict=strict,
            console=console,
        )
    except BrokenPipeError:
        stdout_closed_early()
    except user_errors() as e:
        fail(str(e))
    except KeyboardInterrupt:
        raise typer.Exit(130)
    finally:
        if out is not None and out is not sys.stdout:
            out.close()
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
    data: Path = typer.Argument(..., help="Labelled folder: one subfolder per class, or train/ and val/ (or "
                                          "test/) that each hold them."),
    weights: Path = typer.Option(..., "--weights", "-w", help=WEIGHTS_HELP),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation folder with the same class subfolders "
                                                           "(when DATA holds no train/ and val/)."),
    val_split: Optional[float] = typer.Option(None, "--val-split", help="Fraction of each class held out when "
                                                                        "there is no validation folder "
                                                                        "(default 0.2)."),
    method: ProbeMethod = typer.Option(ProbeMethod.both, "--method", help="kNN, linear probe, or both."),
    k: int = typer.Option(20, "--k", min=1, help="Neighbours that vote in the kNN probe."),
    epochs: int = typer.Option(100, "--epochs", min=1, help="Linear probe epochs (on cached features: fast)."),
    baseline: bool = typer.Option(False, "--baseline", help="Also probe a random-init encoder of the same "
                                                            "architecture, side by side."),
    json_out: bool = typer.Option(False, "--json", help="Print the accuracies as JSON on stdout."),
    seed: int = typer.Option(0, "--seed", help="Seed for the split, the linear probe and the baseline's init."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Image decoding processes "
                                                                         "(default: chosen for this machine)."),
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
    quiet_torch()
    from rich.console import Console

    from .probe import load_labelled, result_table, run_probe
    from .train import default_workers

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        labelled = load_labelled(data, val, val_split, seed)
        model = load_for_inference(weights)
        console.print(f"probe: {len(labelled.train.paths)} train / {len(labelled.val.paths)} val images, "
                      f"{len(labelled.classes)} classes ({labelled.layout})")
        result = run_probe(model, labelled, method=method.value, k=k, epochs=epochs, baseline=baseline, seed=seed,
                           batch_size=batch_size, workers=default_workers() if workers is None else workers,
                           console=console)
    except user_errors() as e:
        fail(str(e))
    except KeyboardInterrupt:
        raise typer.Exit(130)
    console.print(result_table(result))
    if json_out:
        import json

        typer.echo(json.dumps(result))


def main():
    app()


if __name__ == "__main__":
    main()
