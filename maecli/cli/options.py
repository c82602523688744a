"""What several commands share in their options: the choices, the help texts, the number checks."""

from __future__ import annotations

from enum import Enum

import typer

from ..presets import PRESETS

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


def finite(value: float | None) -> float | None:
    """Option callback: a number flag must be a finite number (inf and nan pass click's range checks)."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value
