"""The commands that use a model: reconstruct, embed, probe, predict, and the web page (serve)."""

from __future__ import annotations

import contextlib
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .. import host
from ..runtime import Precision
from .common import (
    STDOUT,
    fail,
    load_model,
    quiet_libraries,
    reported,
    stdout_closed_early,
    weights_missing,
    workers_or_default,
)
from .options import (
    ClassifierWeights,
    InferBatchSize,
    InferPrecision,
    Inputs,
    Json,
    LabelledData,
    OldOutput,
    OutFile,
    PngOut,
    Pool,
    Pooling,
    Seed,
    ShowBands,
    Strict,
    Val,
    ValSplit,
    Weights,
    Workers,
    finite,
)


def reconstruct(
    images: Annotated[list[Path], typer.Argument(metavar="IMAGES", help="Image files, any format pretrain reads.")],
    weights: Weights,
    mask: Annotated[
        float | None,
        typer.Option(
            "--mask",
            min=0.0,
            max=1.0,
            callback=finite,
            help="Fraction of patches hidden, strictly between 0 and 1 [default: the mask the model was trained "
            "with, 0.75 where the weights do not say].",
        ),
    ] = None,
    seed: Seed = 0,
    out: PngOut = "reconstruction.png",
    json_out: Json = False,
    patch_stats: Annotated[
        bool,
        typer.Option(
            "--patch-stats/--no-patch-stats",
            help="Norm-pix-loss models: un-normalize the prediction with each patch's true mean and variance, or "
            "show it raw.",
        ),
    ] = True,
    zoom: Annotated[
        int | None,
        typer.Option(
            "--zoom",
            min=1,
            max=16,
            help="Enlarge the tiles this many times (nearest pixel), up to 16 [default: to about 256 px a tile].",
        ),
    ] = None,
    precision: InferPrecision = Precision.no,
    show_bands: ShowBands = None,
    raw: Annotated[
        Path | None,
        typer.Option(
            "--raw",
            help="Also write the reconstruction (visible patches pasted back) at full depth, every band, in the "
            "input's units: float32 (N, C, H, W) as .npy, or a .tif.",
        ),
    ] = None,
):
    """Show what the model fills in: mask each image, reconstruct it, save a labelled grid.

    One row per image: original | masked (hidden patches grey) | prediction | prediction + visible patches.

    Images are resized (shorter side) and center-cropped to the model's size.

    The error per image is the MSE on hidden patches in the loss's space: normalized pixels (ImageNet mean
    and std; 0.5 for one channel), each patch also normalized by its own mean and variance when the model used
    norm-pix-loss.

    The weights must hold the decoder: a maecli run, an original MAE checkpoint or a Hugging Face
    ViTMAEForPreTraining folder. -o - writes the PNG to stdout.
    """
    if mask is not None and not 0 < mask < 1:
        fail(f"--mask must lie strictly between 0 and 1, got {mask}", 2)
    if out == "-" and json_out:
        fail("--out - and --json both write to stdout; pick one", 2)
    if out != "-":
        from ..files import output_target

        with reported():
            output_target(out)  # a folder or a socket as --out: say so before the work
    quiet_libraries()
    import json

    from ..console import console, plural, warn
    from ..reconstruct import check_raw_target, png_bytes, readable_zoom, render, write_png, write_raw

    if raw is not None:
        with reported():
            check_raw_target(raw)
    from ..reconstruct import reconstruct as run_reconstruct

    with reported():
        model = load_model(weights)
        if mask is None:
            from ..export import trained_mask_ratio

            mask = trained_mask_ratio(weights)
        zoom = zoom or readable_zoom(model.cfg.img_size)
        rec = run_reconstruct(
            model,
            images,
            mask_ratio=mask,
            seed=seed,
            use_patch_stats=patch_stats,
            precision=precision.value,
            show_bands=show_bands,
        )
        if raw is not None:
            write_raw(rec, raw)
            console.print(f"wrote {raw} ({' x '.join(map(str, rec.full.shape))} float32, the input's units)")
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
        if json_out:
            typer.echo(json.dumps(r))
    if out == "-":
        png_to_stdout(data)
        return
    with reported():
        write_png(data, out)
    console.print(
        f"wrote {out} ({plural(len(rec.names), 'row')} x 4 columns, {rec.original.shape[-1] * zoom} px tiles)"
    )


def png_to_stdout(data: bytes) -> None:
    """reconstruct -o -: the PNG on stdout, one line if the reader goes away early."""
    from ..files import guarded

    try:
        with reported():
            stdout = guarded(typer.get_binary_stream("stdout"), STDOUT)
            stdout.write(data)
            stdout.flush()
    except BrokenPipeError:
        stdout_closed_early()


def renamed_out(out: Path | None, output: Path | None) -> Path | None:
    """--out, or --output: embed's and predict's old name for it, hidden from --help and still read."""
    if out is not None and output is not None:
        fail("--output is the old name of --out; give one of them", 2)
    return out if output is None else output


class OutputFormat(str, Enum):
    jsonl = "jsonl"
    csv = "csv"
    npy = "npy"


def embed(
    inputs: Inputs,
    weights: Weights,
    fmt: Annotated[
        OutputFormat,
        typer.Option(
            "--format",
            "-f",
            help='jsonl: {"path", "embedding"} per line; csv: path,e0,e1,...; npy: float32 array in -o FILE, paths '
            "in FILE.paths.jsonl (one JSON string per line: line i is row i).",
        ),
    ] = OutputFormat.jsonl,
    pool: Pooling = Pool.mean,
    normalize: Annotated[bool, typer.Option("--normalize", help="Scale each vector to unit length.")] = False,
    batch_size: InferBatchSize = 64,
    workers: Workers = None,
    precision: InferPrecision = Precision.no,
    out: OutFile = None,
    strict: Strict = False,
    output: OldOutput = None,
):
    """Write one embedding per image: the whole image through the encoder, no masking.

    Each batch is written as soon as it is encoded, in input order, so it works inside pipelines:

    find photos -name '*.jpg' | maecli embed - -w runs/x > emb.jsonl

    Unreadable images are skipped with a warning and counted (exit 0), unless --strict.
    """
    out = renamed_out(out, output)
    to_file = out is not None and str(out) != "-"
    if fmt is OutputFormat.npy and not to_file:
        fail("npy is a binary format: write it to a file with -o FILE (the paths go to FILE.paths.jsonl)", 2)
    for item in inputs:
        if item != "-" and not Path(item).exists() and not item.endswith(".tar"):  # shards: checked once expanded
            fail(f"{item} does not exist")
    quiet_libraries()
    from ..console import console, plural
    from ..embedding import write_embeddings
    from ..files import guarded

    stream = None
    if not to_file:
        sys.stdout.reconfigure(errors="surrogateescape")  # paths that are not UTF-8 pass through as bytes
        stream = guarded(sys.stdout, STDOUT)
    try:
        with reported():
            model = load_model(weights)
            summary = write_embeddings(
                model,
                inputs,
                fmt=fmt.value,
                out=stream,
                out_path=out if to_file else None,
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
        + (f"; [yellow]{plural(summary['skipped'], 'unreadable file')} skipped[/]" if summary["skipped"] else "")
        + (f"; written to {out}" if to_file else "")
    )


class ProbeMethod(str, Enum):
    knn = "knn"
    linear = "linear"
    both = "both"


def probe(
    data: LabelledData,
    weights: Weights,
    val: Val = None,
    val_split: ValSplit = None,
    method: Annotated[ProbeMethod, typer.Option("--method", help="kNN, linear probe, or both.")] = ProbeMethod.both,
    k: Annotated[int, typer.Option("--k", min=1, max=10**5, help="Neighbours that vote in the kNN probe.")] = 20,
    epochs: Annotated[
        int, typer.Option("--epochs", min=1, max=10**5, help="Linear probe epochs (on cached features: fast).")
    ] = 100,
    baseline: Annotated[
        bool,
        typer.Option("--baseline", help="Also probe a random-init encoder of the same architecture, side by side."),
    ] = False,
    json_out: Json = False,
    seed: Seed = 0,
    batch_size: InferBatchSize = 64,
    workers: Workers = None,
    precision: InferPrecision = Precision.no,
):
    """Measure how good the embeddings are: kNN and linear probes on a labelled folder.

    Features are the frozen encoder's (whole image, mean-pooled), extracted once per split.

    Accuracies go to stderr as a table, and to stdout as JSON with --json.
    """
    for path in (data, val):
        if path is not None and not path.exists():
            fail(f"{path} does not exist")
    quiet_libraries()
    from ..console import console
    from ..labelled import load_labelled
    from ..probe import result_table, run_probe

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


class PredictFormat(str, Enum):
    jsonl = "jsonl"
    csv = "csv"


def predict(
    inputs: Inputs,
    weights: ClassifierWeights,
    fmt: Annotated[
        PredictFormat,
        typer.Option(
            "--format",
            "-f",
            help='jsonl: {"path", "class", "probability", "top_k"} per line; csv: '
            "path,class,probability,class_2,probability_2,...",
        ),
    ] = PredictFormat.jsonl,
    top_k: Annotated[
        int, typer.Option("--top-k", min=1, max=10**5, help="Classes listed per image (at most all).")
    ] = 5,
    batch_size: InferBatchSize = 64,
    workers: Workers = None,
    precision: InferPrecision = Precision.no,
    out: OutFile = None,
    strict: Strict = False,
    output: OldOutput = None,
):
    """Label images with a fine-tuned classifier: the predicted class, its probability and the top k.

    Each batch is written as soon as it is classified, in input order, so it works inside pipelines:

    find photos -name '*.jpg' | maecli predict - -w runs/ft > labels.jsonl

    Images are read as validation reads them (shorter side resized, center-cropped). Unreadable images are
    skipped with a warning and counted (exit 0), unless --strict.
    """
    for item in inputs:
        if item != "-" and not Path(item).exists() and not item.endswith(".tar"):  # shards: checked once expanded
            fail(f"{item} does not exist")
    if weights_missing(weights):
        fail(f"weights not found: {weights}")
    out = renamed_out(out, output)
    to_file = out is not None and str(out) != "-"
    if to_file and out.is_dir():
        fail(f"--out {out} is a folder; give a file", 2)
    quiet_libraries()
    from ..classifier import load_classifier
    from ..console import console, plural
    from ..files import guarded, open_output
    from ..prediction import write_predictions
    from ..runtime import default_device

    try:
        with reported(), contextlib.ExitStack() as files:
            device = default_device()
            host.tune_for_cpu(device)
            model, classes = load_classifier(weights)
            model = model.to(device)
            if to_file:  # whole or not at all, as every output (files.open_output)
                stream = files.enter_context(
                    open_output(out, "w", encoding="utf-8", errors="surrogateescape", newline="")
                )
            else:
                sys.stdout.reconfigure(errors="surrogateescape")  # paths that are not UTF-8 pass through as bytes
                stream = guarded(sys.stdout, STDOUT)
            summary = write_predictions(
                model,
                classes,
                inputs,
                out=stream,
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
        + (f"; [yellow]{plural(summary['skipped'], 'unreadable file')} skipped[/]" if summary["skipped"] else "")
        + (f"; written to {out}" if to_file else "")
    )


def serve(
    weights: Weights,
    images: Annotated[
        Path | None,
        typer.Option(
            "--images",
            help="Folder of images (any depth) to pick from and to search for similar ones; embedded once, then "
            "cached.",
        ),
    ] = None,
    address: Annotated[
        str,
        typer.Option(
            "--host",
            metavar="<address>",
            help="Address to listen on; the default keeps the page on this machine (there is no login).",
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Port to listen on, up to 65535 (0: any free one).")
    ] = 8000,
    show_bands: ShowBands = None,
):
    """Open a web page on a model: reconstructions under a mask slider, training progress, similar images.

    Reconstruct: drop an image or pick one from --images, move the mask slider; the picture is the one
    `maecli reconstruct` writes for the same image, mask and seed. Training progress: the run folder's previews
    and loss curve. Similar images: nearest neighbours in --images by cosine similarity of the embeddings.

    Needs the serve extra: pip install "maecli[serve]". Ctrl-C stops it.
    """
    if images is not None and not images.is_dir():
        fail(f"--images {images} is not a folder")
    if weights_missing(weights):
        fail(f"weights not found: {weights}")
    from ..serve import require_extra
    from ..serve import serve as run_serve

    with reported():
        require_extra()
    quiet_libraries()
    try:
        with reported():
            run_serve(weights, images, address, port, model=load_model(weights), show_bands=show_bands)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
