"""The commands on run folders and weights: export them, plot a run's curves, say what a run is."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .common import fail, quiet_libraries, reported, weights_missing
from .options import WEIGHTS_HELP, Json, ModelName, Overwrite, PngOut


class ExportFormat(str, Enum):
    timm = "timm"
    hf = "hf"


def export(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="A maecli run folder, or any weights --weights accepts.")],
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="timm: the .safetensors file to write; hf: the folder to write.")
    ],
    format: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            "-f",
            help="timm: the encoder as a timm ViT state dict; hf: a Hugging Face transformers ViTMAE folder.",
        ),
    ],
    model: Annotated[
        ModelName | None,
        typer.Option("--model", help="Heads hint for weights that do not record them (original and timm files)."),
    ] = None,
    overwrite: Overwrite = False,
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
    written = ("config.json", "model.safetensors", "README.md")  # what --format hf writes
    taken = out.is_file() or (out.is_dir() and any((out / n).exists() for n in written))
    if taken and not overwrite:
        fail(f"{out} already holds weights or a model card; pass --overwrite to replace them")
    if weights_missing(run):
        fail(f"weights not found: {run}")
    quiet_libraries()
    from ..export import export as run_export

    with reported():
        snippet = run_export(run, out, format.value, model_hint=model.value if model else None)
    typer.echo(f"wrote {out}; load it with:\n{snippet}", err=True)
    typer.echo(str(out))


def plot(
    runs: Annotated[
        list[Path], typer.Argument(metavar="RUNS", help="Run folders (or their metrics.jsonl files) to draw, overlaid.")
    ],
    out: PngOut = "curves.png",
):
    """Draw a run's curves as one picture: loss, learning rate, and every other logged series (kNN top-1,
    validation accuracy, ...), one panel each.

    Several runs are overlaid with a legend, labelled by folder name, to compare recipes. A run still in progress
    shows its rows so far. A sweep's folder (finetune --fraction A,B --seeds N) is drawn as top-1 against the
    fraction of labels, pretrained beside scratch, with the seeds' spread. The written path goes to stdout.

    Needs matplotlib: pip install "maecli[plot]".
    """
    from ..console import console, warn
    from ..plot import plot_runs

    with reported():
        written = plot_runs(runs, out, warn=warn)
    console.print(f"curves of {len(runs)} run{'s' if len(runs) != 1 else ''} drawn in {written}")
    typer.echo(str(written))


def info(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="A run folder, or weights: " + WEIGHTS_HELP)],
    json_out: Json = False,
):
    """Say what a run is and where it stands: model and size, data, recipe, step of total, last and best loss,
    best kNN or validation accuracy, skipped files, checkpoints (which can resume) and the weights file.

    Works on a run in progress, a finished or killed one, a finetune run, and on plain weights (what
    maecli.load infers from them).
    """
    quiet_libraries()
    from ..info import format_info, run_info

    with reported():
        summary = run_info(run)
    if json_out:
        import json

        typer.echo(json.dumps(summary))
    else:
        typer.echo(format_info(summary))
