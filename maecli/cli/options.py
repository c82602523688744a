"""Each option that several commands take, declared once as an `Annotated` alias; a command states its default.

An option whose meaning differs between commands (the weights a command needs, a training or an inference batch)
is one alias per meaning, never one flag with a help text that fits neither.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperArgument, TyperCommand, TyperOption

from ..presets import PRESETS
from ..runtime import Precision

ModelName = Enum("ModelName", {name.replace("-", "_"): name for name in PRESETS}, type=str)


class Pool(str, Enum):
    mean = "mean"
    cls = "cls"


# --log-with's choices (trackers.TRACKERS, plus all and none), shared by the training commands
Tracker = Enum(
    "Tracker", {name: name for name in ("tensorboard", "trackio", "mlflow", "wandb", "all", "none")}, type=str
)

WEIGHTS_HELP = (
    "A maecli run folder or weights file, an original MAE .pth, a timm ViT state dict, a Hugging Face ViTMAE folder, "
    "or a Hub id: hf-hub:ORG/NAME[@REVISION] (e.g. hf-hub:facebook/vit-mae-base)."
)
SEED_MAX = 2**31 - 1  # numpy's generators take seeds below 2**32, and pretrain derives others from it


class Option(TyperOption):
    """An option whose help shows no range: a bound that tells the user something is in the help's own words
    (--mask, --port); the others only guard against overflow and absurd values (1<=x<=1000000000)."""

    def _get_number_range_help_str(self):
        return None

    def display_type(self, ctx):
        descriptor = getattr(self, "type_descriptor", None)
        if descriptor is not None and descriptor.is_ranged:
            return f"<{descriptor.ranged_type_name}>"  # <int>, not <int range>
        return super().display_type(ctx)


class Argument(TyperArgument):
    """An argument shown by its metavar alone: IMAGES..., not images... <list[Path]>."""

    def _get_number_range_help_str(self):
        return None

    def display_type_rich(self, ctx):
        return None

    def _rich_display_name(self):
        return self.display_name_raw + ("..." if self.nargs != 1 else "")

    def _usage_display_name(self):
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")


class Command(TyperCommand):
    """Every maecli command: its parameters show their help as Option and Argument above say."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if type(param) is TyperOption:
                param.__class__ = Option  # typer builds the parameters itself; only their help changes
            elif type(param) is TyperArgument:
                param.__class__ = Argument


def finite(value: float | None) -> float | None:
    """Option callback: a number flag must be a finite number (inf and nan pass click's range checks)."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def band_list(value: str | None) -> tuple[int, ...] | None:
    """Option callback: "4,3,2" -> (4, 3, 2), bands numbered from 1."""
    if value is None:
        return None
    try:
        bands = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a comma-separated list of band numbers, e.g. 4,3,2") from None
    if min(bands) < 1:
        raise typer.BadParameter(f"{value!r}: bands are numbered from 1")
    return bands


ShowBands = Annotated[
    str | None,
    typer.Option(
        "--show-bands",
        metavar="<B,B,B>",
        callback=band_list,
        help="Bands of the model's input shown as red, green, blue (or one, in gray) in pictures, e.g. 4,3,2; data "
        "that is not 8-bit is stretched between its 2nd and 98th percentiles [default: bands 1,2,3; gray for one].",
    ),
]

# -- what goes in -------------------------------------------------------------------------------

Inputs = Annotated[
    list[str],
    typer.Argument(
        metavar="INPUTS",
        help="Image files, folders (searched at any depth), or - to read newline-separated paths from stdin.",
    ),
]
LabelledData = Annotated[
    Path,
    typer.Argument(
        metavar="DATA",
        help="Labelled folder: one subfolder per class, or train/ and val/ (or test/) that each hold them.",
    ),
]
Weights = Annotated[Path, typer.Option("--weights", "-w", help=WEIGHTS_HELP)]
EncoderWeights = Annotated[
    Path | None,
    typer.Option("--weights", "-w", help="The pretrained encoder (required, except with --resume): " + WEIGHTS_HELP),
]
ClassifierWeights = Annotated[
    Path, typer.Option("--weights", "-w", help="A `maecli finetune` run folder or its model.safetensors.")
]
Val = Annotated[
    Path | None,
    typer.Option(
        "--val", help="Validation folder with the same class subfolders (when DATA holds no train/ and val/)."
    ),
]
ValSplit = Annotated[
    float | None,
    typer.Option(
        "--val-split",
        min=0.0,
        max=1.0,
        callback=finite,
        help="Fraction of each class held out when there is no validation folder (default 0.2).",
    ),
]
Strict = Annotated[
    bool,
    typer.Option("--strict", help="Stop with an error at the first unreadable image instead of skipping it."),
]

# -- what comes out -----------------------------------------------------------------------------

RunOut = Annotated[Path | None, typer.Option("--out", "-o", help="Run folder [default: runs/<date-time>].")]
OutFile = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Write to this file instead of stdout; it appears whole when done."),
]
OldOutput = Annotated[Path | None, typer.Option("--output", hidden=True, help="The old name of --out.")]
PngOut = Annotated[str, typer.Option("--out", "-o", metavar="<path>", help="The PNG to write.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing run, file or folder at the output.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]

# -- how the model runs -------------------------------------------------------------------------

TrainPrecision = Annotated[
    Precision,
    typer.Option(
        "--precision",
        help="auto (default): bf16 where it is faster than fp32 (GPUs with bf16, CPUs with AMX or AMD's "
        "AVX512-BF16), else fp32; no: fp32; bf16; fp16.",
    ),
]
InferPrecision = Annotated[
    Precision,
    typer.Option(
        "--precision",
        help="no (default): fp32, so an image's result does not depend on its batch; auto: bf16 where it is "
        "faster; bf16; fp16.",
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(
        "--workers",
        min=0,
        max=256,
        help="Image decoding processes (0: decode in this process) [default: chosen for this machine].",
    ),
]
TrainBatchSize = Annotated[
    int, typer.Option("--batch-size", min=1, max=10**6, help="Images per process per micro-batch.")
]
InferBatchSize = Annotated[
    int,
    typer.Option("--batch-size", min=1, max=10**6, help="Images per forward pass (does not change the results)."),
]
Seed = Annotated[
    int,
    typer.Option(
        "--seed",
        min=0,
        max=SEED_MAX,
        help="Seed of everything random (init, data order, augmentation, masks, splits): the same seed gives the "
        "same result.",
    ),
]
Pooling = Annotated[
    Pool,
    typer.Option(
        "--pool",
        help="mean: average of the patch tokens (finetune adds a LayerNorm: the paper's default); cls: the cls token.",
    ),
]
Mask = Annotated[
    float,
    typer.Option(
        "--mask", min=0.0, max=1.0, callback=finite, help="Fraction of patches hidden, strictly between 0 and 1."
    ),
]

# -- the training recipe and the run ------------------------------------------------------------

Epochs = Annotated[int, typer.Option("--epochs", min=1, max=10**7, help="Passes over the training images.")]
Steps = Annotated[
    int | None,
    typer.Option("--steps", min=1, max=10**9, help="Stop after this many optimizer steps (wins over --epochs)."),
]
Blr = Annotated[
    float,
    typer.Option("--blr", min=0.0, callback=finite, help="Base learning rate: lr = blr x effective batch / 256."),
]
Lr = Annotated[
    float | None,
    typer.Option("--lr", min=0.0, callback=finite, help="Absolute learning rate (overrides --blr)."),
]
WarmupEpochs = Annotated[
    float,
    typer.Option(
        "--warmup-epochs",
        min=0.0,
        max=10**7,
        callback=finite,
        help="Linear warmup, in epochs (at most half the run).",
    ),
]
AccumIter = Annotated[int, typer.Option("--accum-iter", min=1, max=10**4, help="Micro-batches per optimizer step.")]
ClipGrad = Annotated[
    float | None, typer.Option("--clip-grad", min=0.0, callback=finite, help="Clip the gradient norm.")
]
WeightDecay = Annotated[float, typer.Option("--weight-decay", min=0.0, callback=finite, help="AdamW weight decay.")]
SaveEvery = Annotated[
    int,
    typer.Option("--save-every", min=0, max=10**9, help="Checkpoint every N steps (and at each epoch end)."),
]
Keep = Annotated[int, typer.Option("--keep", min=1, max=10**6, help="How many checkpoints to keep.")]
LogEvery = Annotated[int, typer.Option("--log-every", min=1, max=10**9, help="Log to metrics.jsonl every N steps.")]
Resume = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue the run in --out (and a finetune run's baseline) from its newest checkpoints.",
    ),
]
AllowDataChange = Annotated[
    bool,
    typer.Option(
        "--allow-data-change",
        help="With --resume: go on although the training images differ from the run's (added, removed, "
        "resized), with a warning.",
    ),
]
LogWith = Annotated[
    list[Tracker],
    typer.Option(
        "--log-with",
        metavar="<" + "|".join(Tracker.__members__) + ">",
        help="Also log to a tracker, inside RUN/logs and offline (repeatable): tensorboard, trackio, mlflow, "
        "wandb; all: every one installed; none: stop logging to them on --resume. Each is an extra: "
        'pip install "maecli[tensorboard]".',
    ),
]
