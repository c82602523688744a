"""The start every training command shares: `RunArgs` (the settings every command has, and which of them a resumed
run may change) and `start()`, which turns them into a running setup: the accelerator and the folder lock, the batch
and the learning rate, the epoch batches and the schedule, the optimizer, the resumed state, the loader, the
opening lines and the Trainer.

A command brings its recipe: the model and its parameter groups, the training items, the data set, the loss, what
happens at an epoch end, and what its config.json records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from .. import data as D
from ..console import console, plural
from ..errors import TrainError
from ..files import write_json
from ..rundir import CONFIG_NAME, DataList, default_out, prepare, read_json_object
from ..runtime import default_workers, fused_attention_pays
from .checkpoint import TrainState, restore
from .loop import LoopSettings, Trainer, make_accelerator, make_optimizer
from .schedule import Schedule


@dataclass
class RunArgs:
    """The settings of every training command. A command's own arguments subclass this with its recipe's fields
    and its `command` name; `may_change` lists the settings a resumed run may take anew (none alters the model or
    the steps already taken)."""

    command: ClassVar[str] = "train"  # the config.json section the arguments are saved under is the same name
    may_change: ClassVar[tuple[str, ...]] = (
        "epochs",
        "steps",
        "workers",
        "log_every",
        "save_every",
        "keep",
        "precision",
        "log_with",
        "allow_data_change",
    )

    data: str
    out: str | None = None
    epochs: int = 100
    steps: int | None = None
    batch_size: int = 64
    blr: float = 1e-3
    lr: float | None = None
    warmup_epochs: float = 5
    accum_iter: int = 1
    clip_grad: float | None = None
    weight_decay: float = 0.05
    precision: str = "auto"
    workers: int | None = None
    seed: int = 0
    save_every: int = 500
    keep: int = 2
    log_every: int = 10
    resume: bool = False
    overwrite: bool = False
    allow_data_change: bool = False  # --resume on a changed file list: warn instead of refusing
    log_with: tuple[str, ...] = ()  # trackers (trackers.TRACKERS, "all", "none"), logging into RUN/logs

    @property
    def section(self) -> str:
        """The config.json key the arguments are saved under (pretrain's is "train", for older runs' sake)."""
        return "train" if self.command == "pretrain" else self.command

    def saved(self) -> dict:
        """The arguments as config.json records them: what a resume starts from."""
        return {**asdict(self), "resume": False, "overwrite": False, "allow_data_change": False}


def prepared(args: RunArgs, given: Iterable[str] = ()) -> RunArgs:
    """The arguments a run goes by: `out` filled in, and with `resume` the run's saved settings updated with those
    the user gave again (`given`) and may change."""
    from ..trackers import resolve

    args = replace(args, out=str(Path(args.out or default_out())))
    args = resumed_args(args, set(given)) if args.resume else args
    resolve(args.log_with)  # a tracker that is not installed is one line before any work
    return args


def saved_settings(run: Path, command: str, section: str) -> dict:
    """The arguments saved in RUN/config.json under `section`; a run made by another command is named as such."""
    try:
        config = read_json_object(Path(run) / CONFIG_NAME)
    except Exception as e:  # a UserError naming the damage
        raise TrainError(f"cannot resume: {e}") from None
    if config is None:
        raise TrainError(f"cannot resume: {run} holds no {CONFIG_NAME}")
    saved = config.get(section)
    if not isinstance(saved, dict):
        other = config.get("command") or next((k for k in ("train", "finetune") if k in config), None)
        other = "pretrain" if other == "train" else other
        if other and other != command:
            raise TrainError(f"cannot resume {run} with maecli {command}: maecli {other} made it")
        raise TrainError(f"cannot resume: {Path(run) / CONFIG_NAME} records no {section} settings")
    return saved


def resumed_args(args: RunArgs, given: set[str]) -> RunArgs:
    """The settings saved with the run in args.out, updated with those the user gave again and may change. One that
    differs from the saved run and may not change is refused rather than silently ignored or applied."""
    saved = saved_settings(Path(args.out), args.command, args.section)
    known = {f.name for f in dataclasses.fields(args)}
    merged = {k: v for k, v in saved.items() if k in known}
    if "log_with" in merged:
        merged["log_with"] = tuple(merged["log_with"])
    merged.update(data=args.data, out=str(args.out), resume=True, overwrite=False)
    may_change = type(args).may_change
    for name in sorted(given & known - {"data", "out", "resume", "overwrite"}):
        now, before = getattr(args, name), merged.get(name)
        if now == before:
            continue
        if name not in may_change:
            may = ", ".join("--" + n.replace("_", "-") for n in may_change[:7])
            raise TrainError(
                f"--{name.replace('_', '-')} {now} differs from the run's {before}; --resume keeps a run's "
                f"settings and may change only {may}; to train with it, start a new run with another --out"
            )
        merged[name] = now
    if "epochs" in given and "steps" not in given and merged.get("epochs") != saved.get("epochs"):
        merged["steps"] = None  # a new epoch count replaces the step count the run was started with
    try:
        return type(args)(**merged)
    except TypeError as e:
        raise TrainError(f"cannot resume: {Path(args.out) / CONFIG_NAME} is damaged ({e})") from None


def micro_seed(seed: int, micro: int, rank: int) -> int:
    """The seed of everything random in one micro-batch (masks, Mixup, drop path): the same on resume."""
    return (seed * 1_000_003 + micro * 4_099 + rank * 7 + 1) % 2**63


@dataclass
class Run:
    """A training run set up by `start()`: what the command's recipe needs to build its loader and Trainer."""

    args: RunArgs
    out: Path
    acc: object  # accelerate.Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    state: TrainState
    sampler: D.EpochBatches
    files: DataList
    images: int
    batch: int
    workers: int

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def effective_batch(self) -> int:
        return self.batch * self.args.accum_iter * self.world

    def loader(self, dataset, collate) -> torch.utils.data.DataLoader:
        """The DataLoader over the epoch batches from the resumed position; loader workers decode while the model
        trains."""
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=self.workers,
            collate_fn=collate,
            worker_init_fn=D.worker_init,
            pin_memory=self.acc.device.type == "cuda",
            persistent_workers=self.workers > 0,
            prefetch_factor=4 if self.workers > 0 else None,
        )

    def write_config(self, model_config: dict, **sections) -> None:
        """RUN/config.json: the command that made the run, the model, every argument, the schedule as planned (the
        batch and lr the arguments gave on this machine), and the command's own sections: enough to rebuild the model
        and to resume."""
        sched = self.schedule
        planned = {
            "effective_batch": self.effective_batch,
            "peak_lr": sched.peak_lr,
            "total_steps": sched.total_steps,
            "steps_per_epoch": sched.steps_per_epoch,
            "warmup_steps": sched.warmup_steps,
        }
        write_json(
            self.out / CONFIG_NAME,
            {
                "command": self.args.command,
                "model": model_config,
                self.args.section: self.args.saved(),
                "schedule": planned,
                **sections,
            },
        )

    def announce(self, what: str, extra: str = "") -> None:
        """The run's opening lines on stderr: what it trains (`what`), where, and the batch, learning rate and
        schedule (`extra` adds to that line)."""
        acc, args, sched = self.acc, self.args, self.schedule
        console.print(
            f"{what}; device {acc.device.type} x{self.world}, precision {acc.mixed_precision}, "
            f"{plural(self.workers, 'loader worker')}"
        )
        capped = ""
        if self.batch < args.batch_size:
            capped = f", capped at the {self.batch} images an epoch gives each process"
        console.print(
            f"effective batch {self.effective_batch} ({args.batch_size}{capped} x {args.accum_iter} accum x "
            f"{plural(self.world, 'process', 'processes')}), lr {sched.peak_lr:.3g}"
            + ("" if args.lr is not None else f" (blr {args.blr:g} x {self.effective_batch}/256)")
            + extra
            + f", {sched.total_steps} steps ({sched.steps_per_epoch}/epoch, {plural(sched.epochs, 'epoch')}), "
            f"warmup {plural(sched.warmup_steps, 'step')}"
        )

    def trainer(
        self,
        loss_fn: Callable,
        label: str,
        *,
        on_epoch_end: Callable | None = None,
        write_weights: Callable | None = None,
        model_config: dict | None = None,
        run_info: dict | None = None,
    ) -> Trainer:
        """The Trainer for this run; the trackers get the model config, every argument and the run's numbers."""
        args = self.args
        return Trainer(
            self.acc,
            self.model,
            self.optimizer,
            self.schedule,
            self.out,
            self.state,
            loss_fn=loss_fn,
            settings=LoopSettings(args.log_every, args.save_every, args.keep, args.clip_grad, label),
            on_epoch_end=on_epoch_end,
            write_weights=write_weights,
            checkpoint_files={DataList.NAME: self.files.linker(self.out)} if self.main else None,
            hparams={
                "model": model_config or {},
                args.section: asdict(args),
                "run": {
                    "images": self.images,
                    "processes": self.world,
                    "effective_batch": self.effective_batch,
                    "peak_lr": self.schedule.peak_lr,
                    "total_steps": self.schedule.total_steps,
                    **(run_info or {}),
                },
            },
        )

    def summary(self, result: dict, weights: Path) -> dict:
        """The Trainer's result with the run's place and size; `skipped` as a count."""
        return {
            "out": str(self.out),
            "weights": str(weights),
            "total_steps": self.schedule.total_steps,
            **result,
            "skipped": len(result["skipped"]),
        }


def plan(args: RunArgs, per_epoch: int, world: int, *, min_lr: float = 0.0) -> tuple[int, Schedule]:
    """The batch each process takes (capped at what an epoch gives it, never padded with repeats) and the schedule:
    lr = blr x effective batch / 256 unless `args.lr`, warmup capped at half the run."""
    batch = min(args.batch_size, math.ceil(per_epoch / world))
    peak_lr = args.lr if args.lr is not None else args.blr * batch * args.accum_iter * world / 256
    micro_per_epoch = D.EpochBatches(per_epoch, batch, args.seed, epochs=1, world=world).micro_per_epoch()
    schedule = Schedule.plan(
        micro_per_epoch,
        args.accum_iter,
        peak_lr,
        epochs=args.epochs,
        steps=args.steps,
        warmup_epochs=args.warmup_epochs,
        min_lr=min(min_lr, peak_lr),
    )
    return batch, schedule


@contextlib.contextmanager
def start(
    args: RunArgs,
    model: torch.nn.Module,
    param_groups: list[dict],
    items: list,
    *,
    repeat: int = 1,
    betas: tuple[float, float] = (0.9, 0.999),
    min_lr: float = 0.0,
) -> Iterator[Run]:
    """Set up a training run of `model` over `items` (paths, each `repeat` times an epoch) in `args.out`, holding the
    folder's lock until the block ends. The batch is capped at what an epoch gives each process, never padded with
    repeats; lr = blr x effective batch / 256 unless `args.lr`; with `args.resume` the newest checkpoint is loaded
    (refused if the training files changed, unless `args.allow_data_change`)."""
    out = Path(args.out)
    acc = make_accelerator(args.precision, args.log_with, out)
    world, rank = acc.num_processes, acc.process_index
    lock = prepare(out, args.resume, args.overwrite) if acc.is_main_process else None
    try:
        acc.wait_for_everyone()
        batch, schedule = plan(args, len(items) * repeat, world, min_lr=min_lr)
        sampler = D.EpochBatches(len(items) * repeat, batch, args.seed, epochs=1, rank=rank, world=world)
        peak_lr = schedule.peak_lr
        optimizer = make_optimizer(param_groups, peak_lr, acc.device, betas=betas)
        files = DataList.of(args.data, items)
        state = restore(args, out, model, optimizer, schedule, len(items), world, files=files) if args.resume else None
        state = state or TrainState()
        state.total_steps, state.images, state.processes = schedule.total_steps, len(items), world
        state.data = files.fingerprint()
        model.set_fused_attention(fused_attention_pays(acc.device, acc.mixed_precision))
        epoch = schedule.epoch_of(state.step)
        sampler = replace(
            sampler,
            epochs=schedule.epochs,
            start_epoch=epoch,
            start_micro=state.micro - epoch * schedule.micro_per_epoch,
        )
        workers = default_workers() if args.workers is None else args.workers
        yield Run(args, out, acc, model, optimizer, schedule, state, sampler, files, len(items), batch, workers)
    finally:
        if lock is not None:
            lock.release()
    acc.end_training()
