"""Resumable training state: what a checkpoint holds beyond the weights, the one pair of functions that writes and
reads `checkpoints/step-N/` (model.safetensors, optimizer.pt, state.json), and `restore`, which resumes a run.

A checkpoint folder gets its final name only once every file in it is on disk, so a kill at any moment leaves
the previous checkpoint whole; `.tmp-*` folders are saves cut short and never count.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..console import console, warn
from ..errors import TrainError
from ..files import fsync_dir, open_output, write_bytes, write_json
from ..rundir import (
    CHECKPOINT_FILES,
    CHECKPOINT_PATTERN,
    CHECKPOINTS_DIR,
    OPTIMIZER_NAME,
    STATE_NAME,
    WEIGHTS_NAME,
    DataList,
    checkpoint_name,
    trim_metrics,
)
from ..weights import save_weights

if TYPE_CHECKING:
    from .schedule import Schedule


@dataclass
class TrainState:
    """Everything a resumed run needs besides the model and the optimizer to continue exactly."""

    step: int = 0  # optimizer steps done
    images_seen: int = 0  # over all processes
    seconds: float = 0.0  # training time so far, across resumes
    micro: int = 0  # micro-batches taken: seeds the masks
    total_steps: int = 0
    images: int = 0  # images in the data folder when saved
    processes: int = 1
    loss_sum: list[float] = field(default_factory=list)  # per process: the loss average in progress since the
    loss_count: int = 0  # last logged row, so the next metrics row is exact after a resume too
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable files: path -> why
    extra: dict = field(default_factory=dict)  # a training command's own values (e.g. the best epoch so far)
    data: dict = field(default_factory=dict)  # the training files' fingerprint (rundir.DataList): resume checks it

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class NonFiniteError(RuntimeError):
    """The weights or the optimizer state hold NaN or inf: such a checkpoint is never written."""


def all_finite(tensors) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all().item()) if flags else True  # one device sync for all of them


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]


def checkpoint_dirs(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    done = [
        p
        for p in root.iterdir()
        if CHECKPOINT_PATTERN.fullmatch(p.name) and p.is_dir() and all((p / f).is_file() for f in CHECKPOINT_FILES)
    ]
    return sorted(done, key=lambda p: int(p.name[5:]))


def save_checkpoint(
    run: Path,
    model,
    optimizer,
    state: TrainState,
    steps_per_epoch: int,
    keep: int,
    extra_files: dict[str, bytes | Callable[[Path], None]] | None = None,
) -> Path:
    """Write checkpoints/step-N atomically (a temp folder, fsynced, then renamed) and prune all but `keep`.
    `extra_files` go into the folder too (the training file list, say): name -> bytes, or name -> a function that
    writes the file at the path it is given (rundir.DataList.linker links one written once).

    Raises NonFiniteError, writing nothing, if the weights or the optimizer state are not all finite.
    """
    if not all_finite([*model.state_dict().values(), *optimizer_tensors(optimizer)]):
        raise NonFiniteError(f"the weights or the optimizer state hold NaN or inf at step {state.step}")
    root = Path(run) / CHECKPOINTS_DIR
    root.mkdir(exist_ok=True)
    final = root / checkpoint_name(state.step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_weights(model, tmp / WEIGHTS_NAME)
        with open_output(tmp / OPTIMIZER_NAME) as f:  # a file object: torch.save hides a path's write errors
            torch.save(optimizer.state_dict(), f)
        write_json(tmp / STATE_NAME, {**asdict(state), "epoch": state.step / steps_per_epoch})
        for name, data in (extra_files or {}).items():
            if callable(data):
                data(tmp / name)
            else:
                write_bytes(tmp / name, data)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # the same step saved before: swap it out, so some copy exists at every moment
        old = root / f".tmp-old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    for old in checkpoint_dirs(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def read_checkpoint(ckpt: Path, model, optimizer) -> tuple[dict, dict, TrainState]:
    """(weights, optimizer state, TrainState) of a checkpoint, checked against `model` and `optimizer` without
    changing them; raises ValueError saying what is wrong."""
    from safetensors.torch import load_file

    try:
        weights = load_file(str(ckpt / WEIGHTS_NAME))
        # weights_only: a checkpoint folder from elsewhere cannot run code through its pickle
        optim = torch.load(ckpt / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
        state = json.loads((ckpt / STATE_NAME).read_text())
    except Exception as e:  # safetensors, zip and pickle errors have no common base class
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    expected = model.state_dict()
    if set(weights) != set(expected) or any(weights[k].shape != v.shape for k, v in expected.items()):
        raise ValueError("its weights do not fit this run's model")
    if not all_finite(weights.values()):
        raise ValueError("its weights hold NaN or inf")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        saved_ids = [i for group in optim["param_groups"] for i in group["params"]]
        fits = len(saved_ids) == len(params) and all(
            t.shape == params[saved_ids.index(i)].shape
            for i, st in optim["state"].items()
            for name, t in st.items()
            if name in ("exp_avg", "exp_avg_sq")
        )
        fits = fits and isinstance(state.get("step"), int) and state["step"] >= 0
    except (KeyError, TypeError, ValueError, AttributeError):
        fits = False
    if not fits:
        raise ValueError("its optimizer state or state.json does not fit this run")
    return weights, optim, TrainState.from_dict(state)


def find_checkpoint(run: Path, model, optimizer, warn: Callable[[str], None]):
    """(path, (weights, optimizer state, TrainState)) of the newest checkpoint that reads back whole, falling back
    to older ones with a warning; None when there is none. ValueError when none of several is usable."""
    ckpts = checkpoint_dirs(run)
    for ckpt in reversed(ckpts):
        try:
            return ckpt, read_checkpoint(ckpt, model, optimizer)
        except ValueError as e:
            warn(f"checkpoint {ckpt} is unusable ({e}); trying an older one")
    if ckpts:
        raise ValueError(f"none of the {len(ckpts)} checkpoints in {Path(run) / CHECKPOINTS_DIR} is usable")
    return None


def restore(
    args, out: Path, model, optimizer, schedule: Schedule, images: int, world: int, *, files: DataList | None = None
) -> TrainState:
    """Load the newest usable checkpoint into `model` and `optimizer` (every rank loads the one the main process
    chose) and return its TrainState; a fresh state when there is none.

    With `files`, a checkpoint saved on other data is refused (TrainError saying what changed), unless
    `args.allow_data_change`, which warns instead."""
    from accelerate.state import PartialState

    main = PartialState().is_main_process
    try:
        found = find_checkpoint(out, model, optimizer, warn) if main else None
    except ValueError as e:
        raise TrainError(f"cannot resume: {e}; start a new run with another --out") from None
    if world > 1:
        from accelerate.utils import broadcast_object_list

        name = [found[0].name if found else None]
        broadcast_object_list(name)
        if not main and name[0]:
            ckpt = out / CHECKPOINTS_DIR / name[0]
            found = ckpt, read_checkpoint(ckpt, model, optimizer)
    if not found:
        if main:
            console.print(f"[yellow]no checkpoint in {out}; starting from step 0[/]")
            trim_metrics(out, 0)
        return TrainState()
    ckpt, (weights, optim_state, state) = found
    change = files.changes_since(state.data, ckpt) if files is not None else None
    if change and not getattr(args, "allow_data_change", False):
        raise TrainError(
            f"cannot resume {out}: {change}; restore the files to continue the same run, or pass "
            f"--allow-data-change to go on with these"
        )
    if change:
        warn(f"{change}; going on with these (--allow-data-change): the run is no longer the one it started as")
    model.load_state_dict(weights, strict=True)
    optimizer.load_state_dict(optim_state)
    if state.step > schedule.total_steps:
        raise TrainError(
            f"the run in {out} is at step {state.step}, past the {schedule.total_steps} steps asked "
            f"for; pass a larger --steps or --epochs to extend it"
        )
    if (state.images or images) != images or state.processes != world:
        warn(
            f"the run was saved with {state.images} images and {state.processes} processes, now {images} and "
            f"{world}: from here on it differs from an uninterrupted run"
        )
    state.micro = schedule.micro_before(state.step)
    if main:
        console.print(f"resuming {out} from step {state.step} ({ckpt.name})")
        trim_metrics(out, state.step)
    return state
