"""Pretraining: `pretrain(TrainArgs)` wires the data, the MAE and its loss into the shared training loop (loop.py).

A run is a pure function of its arguments: data order, crops and masks all derive from (seed, epoch, step, index),
so resuming from a checkpoint continues exactly where the killed run was.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import data as D
from . import rundir
from .checkpoint import TrainState, checkpoint_dirs, find_checkpoint
from .console import console, warn
from .errors import DataError, TrainError, UsageError
from .loop import LoopSettings, Trainer, make_accelerator, make_optimizer
from .model import MAE, MAEConfig, no_weight_decay_groups, num_visible
from .rundir import DataList, default_out, prepare, resumed_args, trim_metrics
from .runtime import default_workers, fused_attention_pays
from .schedule import Schedule
from .weights import WEIGHTS_NAME, save_weights, write_config


@dataclass
class TrainArgs:
    data: str
    out: str | None = None
    model: str = "vit-base"
    img_size: int = 224
    patch_size: int | None = None
    in_chans: int = 3
    mask: float = 0.75
    epochs: int = 100
    steps: int | None = None
    repeat: int = 1
    batch_size: int = 64
    blr: float = 1.5e-4
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
    norm_pix_loss: bool = True
    decoder_dim: int | None = None
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    init_from: str | None = None
    previews: int = 4
    probe: str | None = None
    log_with: tuple[str, ...] = ()  # trackers (trackers.TRACKERS, "all", "none"), logging into RUN/logs
    allow_data_change: bool = False  # --resume on a changed file list: warn instead of refusing


RESUME_MAY_CHANGE = (*rundir.RESUME_MAY_CHANGE, "previews", "probe")


def build_config(args: TrainArgs) -> MAEConfig:
    try:
        cfg = MAEConfig.preset(
            args.model,
            img_size=args.img_size,
            patch_size=args.patch_size,
            in_chans=args.in_chans,
            norm_pix_loss=args.norm_pix_loss,
            decoder_dim=args.decoder_dim,
            decoder_depth=args.decoder_depth,
            decoder_heads=args.decoder_heads,
            embed_dim=args.embed_dim,
            depth=args.depth,
            num_heads=args.num_heads,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not 0 < args.mask < 1:
        raise UsageError(f"--mask must lie strictly between 0 and 1, got {args.mask}")
    if num_visible(cfg.num_patches, args.mask) < 1:
        raise UsageError(
            f"--mask {args.mask} leaves none of the {cfg.num_patches} patches visible; the encoder needs "
            f"at least one (at most {1 - 1 / cfg.num_patches:.4g} here)"
        )
    return cfg


def mask_generator(seed: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + micro * 4_099 + rank * 7 + 1)
    return g


def pretrain(args: TrainArgs, given: Iterable[str] = ()) -> dict:
    """Train an MAE on a folder of images; returns a summary dict. Raises a maecli UserError for the user.

    With `args.resume`, the run in `args.out` continues from its newest usable checkpoint with its saved
    settings; `given` names the settings the caller set explicitly (see `rundir.resumed_args`).
    """
    out = Path(args.out or default_out())
    args = replace(args, out=str(out))
    if args.resume:
        args = resumed_args(args, set(given), RESUME_MAY_CHANGE)
    cfg = build_config(args)
    acc = make_accelerator(args.precision, args.log_with, out)
    main, world, rank = acc.is_main_process, acc.num_processes, acc.process_index
    lock = prepare(out, args.resume, args.overwrite) if main else None
    try:
        acc.wait_for_everyone()
        paths = find_training_images(args, cfg)
        files = DataList.of(args.data, paths)
        model = initial_model(args, cfg, out)
        per_epoch = len(paths) * args.repeat  # a small folder repeated: each pass with fresh crops
        batch = min(args.batch_size, math.ceil(per_epoch / world))  # a batch is never padded with repeats
        eff_batch = batch * args.accum_iter * world
        peak_lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
        sampler = D.EpochBatches(per_epoch, batch, args.seed, epochs=1, rank=rank, world=world)
        schedule = Schedule.plan(
            sampler.micro_per_epoch(),
            args.accum_iter,
            peak_lr,
            epochs=args.epochs,
            steps=args.steps,
            warmup_epochs=args.warmup_epochs,
        )
        optimizer = make_optimizer(
            no_weight_decay_groups(model, args.weight_decay), peak_lr, acc.device, betas=(0.9, 0.95)
        )
        state = (
            restore(args, out, model, optimizer, schedule, len(paths), world, files=files)
            if args.resume
            else TrainState()
        )
        state.total_steps, state.images, state.processes = schedule.total_steps, len(paths), world
        state.data = files.fingerprint()
        model.set_fused_attention(fused_attention_pays(acc.device, acc.mixed_precision))
        workers = default_workers() if args.workers is None else args.workers
        sampler = replace(
            sampler,
            epochs=schedule.epochs,
            start_epoch=schedule.epoch_of(state.step),
            start_micro=state.micro - schedule.epoch_of(state.step) * schedule.micro_per_epoch,
        )
        loader = training_loader(paths, cfg, args.seed, sampler, workers, pin_memory=acc.device.type == "cuda")
        if main:
            write_config(out, cfg, {**asdict(args), "resume": False, "overwrite": False, "allow_data_change": False})
            announce(args, cfg, len(paths), acc, workers, batch, schedule)
        hooks = EpochEnd(args, paths, out)
        trainer = Trainer(
            acc,
            model,
            optimizer,
            schedule,
            out,
            state,
            loss_fn=mae_loss(args.seed, rank, args.mask, cfg.num_patches),
            settings=LoopSettings(args.log_every, args.save_every, args.keep, args.clip_grad, "pretrain"),
            on_epoch_end=hooks,
            write_weights=lambda m: save_weights(m, out / WEIGHTS_NAME),
            checkpoint_files={DataList.NAME: files.compressed()} if main else None,
            hparams={
                "model": cfg.to_dict(),
                "train": asdict(args),
                "run": {
                    "images": len(paths),
                    "processes": world,
                    "effective_batch": eff_batch,
                    "peak_lr": peak_lr,
                    "total_steps": schedule.total_steps,
                },
            },
        )
        result = trainer.fit(loader)
    finally:
        if lock is not None:
            lock.release()
    summary = {
        "out": str(out),
        "total_steps": schedule.total_steps,
        "weights": str(out / WEIGHTS_NAME),
        "preview": hooks.preview,
        **result,
        "skipped": len(result["skipped"]),
    }
    if main:
        report(summary, args)
    acc.end_training()
    return summary


def training_loader(paths, cfg: MAEConfig, seed: int, sampler, workers: int, pin_memory: bool):
    """The DataLoader over the sampler's micro-batches; loader workers decode while the model trains."""
    return torch.utils.data.DataLoader(
        D.PretrainDataset(paths, cfg.img_size, cfg.in_chans, seed),
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=D.collate,
        worker_init_fn=D.worker_init,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def announce(args: TrainArgs, cfg: MAEConfig, images: int, acc, workers: int, batch: int, schedule: Schedule):
    """The run's first two lines on stderr: what it trains on, and the batch, learning rate and schedule."""
    world = acc.num_processes
    eff_batch = batch * args.accum_iter * world
    times = f" (x{args.repeat} an epoch)" if args.repeat > 1 else ""
    console.print(
        f"maecli pretrain: {images} images{times} in {args.data}; {args.model} at {cfg.img_size}px, "
        f"patch {cfg.patch_size}, mask {args.mask}; device {acc.device.type} x{world}, precision "
        f"{acc.mixed_precision}, {workers} loader workers"
    )
    capped = f", capped at the {batch} images an epoch gives each process" if batch < args.batch_size else ""
    console.print(
        f"effective batch {eff_batch} ({args.batch_size}{capped} x {args.accum_iter} accum x "
        f"{world} processes), lr {schedule.peak_lr:.3g}"
        + ("" if args.lr is not None else f" (blr {args.blr:g} x {eff_batch}/256)")
        + f", {schedule.total_steps} steps ({schedule.steps_per_epoch}/epoch, {schedule.epochs} "
        f"epochs), warmup {schedule.warmup_steps} steps"
    )


def mae_loss(seed: int, rank: int, mask_ratio: float, num_patches: int):
    """The loss of one micro-batch, its mask seeded by (seed, micro-batch, rank) so a resumed run draws the same."""

    def loss_fn(model, imgs: torch.Tensor, micro: int) -> torch.Tensor:
        g = mask_generator(seed, micro, rank, imgs.device)
        noise = torch.rand(imgs.shape[0], num_patches, device=imgs.device, generator=g)
        loss, _, _ = model(imgs, mask_ratio=mask_ratio, noise=noise)
        return loss

    return loss_fn


def find_training_images(args: TrainArgs, cfg: MAEConfig) -> list[Path]:
    """The data folder's images, checked before the first step: some must decode, and the probe folder must work."""
    paths = D.find_images(args.data)
    if not paths:
        raise DataError(f"no image files found under {args.data} (looked for {', '.join(sorted(D.IMAGE_SUFFIXES))})")
    D.first_readable(paths, cfg.in_chans)
    if args.probe:
        from .probe import labelled_for_training

        labelled_for_training(args.probe)
    return paths


def initial_model(args: TrainArgs, cfg: MAEConfig, out: Path) -> MAE:
    """A seeded fresh MAE, or --init-from's weights (unless a resumed run takes its weights from a checkpoint)."""
    torch.manual_seed(args.seed)
    model = MAE(cfg)
    if args.init_from and not (args.resume and checkpoint_dirs(out)):
        from .weights import load

        src = load(args.init_from, num_heads=cfg.num_heads, img_size=cfg.img_size).state_dict()
        target = model.state_dict()
        wrong = [k for k, v in src.items() if k in target and v.shape != target[k].shape]
        if wrong:
            raise TrainError(
                f"--init-from {args.init_from} does not fit this model: {wrong[0]} has shape "
                f"{tuple(src[wrong[0]].shape)}, the model expects {tuple(target[wrong[0]].shape)}"
            )
        result = model.load_state_dict(src, strict=False)
        if result.unexpected_keys:
            raise TrainError(f"--init-from {args.init_from} does not fit this model ({result.unexpected_keys[:2]})")
    return model


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
        raise TrainError(f"cannot resume: {e}; start again with --overwrite") from None
    if world > 1:
        from accelerate.utils import broadcast_object_list

        from .checkpoint import read_checkpoint

        name = [found[0].name if found else None]
        broadcast_object_list(name)
        if not main and name[0]:
            ckpt = out / "checkpoints" / name[0]
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


class EpochEnd:
    """Per-epoch extras on the main process: the reconstruction preview (also returned as a picture for the
    trackers) and the kNN probe. A failure here is a warning, never the end of a long run."""

    def __init__(self, args: TrainArgs, paths: list[Path], out: Path):
        self.args, self.paths, self.out = args, paths, out
        self.preview = None

    def __call__(self, epoch: int, step: int, model) -> dict | None:
        row = {}
        if self.args.previews:
            from PIL import Image

            from .reconstruct import save_preview

            try:
                path = save_preview(model, self.paths, self.out, epoch, self.args.previews, self.args.seed)
                if path:
                    self.preview = str(path)
                    with Image.open(path) as picture:
                        row["preview"] = picture.convert("RGB")
            except (OSError, DataError) as e:
                warn(f"no preview for epoch {epoch}: {e}")
        if self.args.probe:
            from .probe import probe_during_training

            try:
                row.update(probe_during_training(model, self.args.probe, epoch) or {})
            except (OSError, DataError) as e:
                warn(f"no probe for epoch {epoch}: {e}")
        return row or None


def report(summary: dict, args: TrainArgs) -> None:
    """The run's last lines on stderr."""
    if summary["skipped"]:
        console.print(f"[yellow]{summary['skipped']} unreadable file(s) skipped[/]")
    if summary["signal"] is not None:
        name = "SIGINT" if summary["signal"] == signal.SIGINT else "SIGTERM"
        console.print(
            f"[yellow]{name}: stopped at step {summary['steps']}/{summary['total_steps']}; checkpoint "
            f"saved.[/] Continue with:\n  maecli pretrain {args.data} --out {args.out} --resume"
        )
    else:
        console.print(
            f"[green]done:[/] {summary['steps']} steps, {summary['images_seen']} images seen, "
            f"{summary['skipped']} files skipped, {summary['seconds']:.0f}s; weights in {summary['weights']}"
            + (f"; latest preview {summary['preview']}" if summary["preview"] else "")
        )
