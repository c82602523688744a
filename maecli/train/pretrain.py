"""Pretraining: `pretrain(TrainArgs)` trains an MAE on a folder of images; its recipe (the model, the crops, the
masked loss, the previews and probe at epoch ends) on the shared start (run.py) and loop (loop.py).

A run is a pure function of its arguments: data order, crops and masks all derive from (seed, epoch, step, index),
so resuming from a checkpoint continues exactly where the killed run was.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .. import data as D
from ..console import console, plural, warn
from ..errors import DataError, TrainError, UsageError
from ..model import MAE, MAEConfig, no_weight_decay_groups, num_visible
from ..presets import PRESETS
from ..rundir import WEIGHTS_NAME
from ..weights import save_weights
from .checkpoint import checkpoint_dirs
from .run import RunArgs, micro_seed, prepared, start


@dataclass
class TrainArgs(RunArgs):
    """pretrain's settings: the shared ones (RunArgs) and the MAE's."""

    command: ClassVar[str] = "pretrain"
    may_change: ClassVar[tuple[str, ...]] = (*RunArgs.may_change, "previews", "probe")

    blr: float = 1.5e-4
    model: str = "vit-base"
    img_size: int = 224
    patch_size: int | None = None
    in_chans: int = 3
    mask: float = 0.75
    repeat: int = 1
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


def pretrain(args: TrainArgs, given: Iterable[str] = ()) -> dict:
    """Train an MAE on a folder of images; returns a summary dict. Raises a maecli UserError for the user.

    With `args.resume`, the run in `args.out` continues from its newest usable checkpoint with its saved
    settings; `given` names the settings the caller set explicitly (see `run.resumed_args`).
    """
    args = prepared(args, given)
    cfg = build_config(args)
    paths = find_training_images(args, cfg)
    model = initial_model(args, cfg, Path(args.out))
    groups = no_weight_decay_groups(model, args.weight_decay)
    with start(args, model, groups, paths, repeat=args.repeat, betas=(0.9, 0.95)) as run:
        loader = run.loader(D.PretrainDataset(paths, cfg.img_size, cfg.in_chans, args.seed), D.collate)
        if run.main:
            run.write_config(cfg.to_dict())
            times = f" (x{args.repeat} an epoch)" if args.repeat > 1 else ""
            run.announce(
                f"maecli pretrain: {len(paths)} images{times} in {args.data}; {model_name(args, cfg)} at "
                f"{cfg.img_size}px, patch {cfg.patch_size}, mask {args.mask}"
            )
        hooks = EpochEnd(args, paths, run.out)
        weights = run.out / WEIGHTS_NAME
        trainer = run.trainer(
            mae_loss(args.seed, run.rank, args.mask, cfg.num_patches),
            "pretrain",
            on_epoch_end=hooks,
            write_weights=lambda m: save_weights(m, weights),
            model_config=cfg.to_dict(),
        )
        summary = {**run.summary(trainer.fit(loader), weights), "preview": hooks.preview}
        if run.main:
            report(summary, args)
    return summary


def model_name(args: TrainArgs, cfg: MAEConfig) -> str:
    """The preset's name, or the encoder's shape when --embed-dim, --depth or --num-heads changed it."""
    p = PRESETS[args.model]
    if (cfg.embed_dim, cfg.depth, cfg.num_heads) == (p.embed_dim, p.depth, p.num_heads):
        return args.model
    return f"ViT {cfg.embed_dim}-d x {cfg.depth}, {cfg.num_heads} heads"


def mae_loss(seed: int, rank: int, mask_ratio: float, num_patches: int):
    """The loss of one micro-batch, its mask seeded by (seed, micro-batch, rank) so a resumed run draws the same."""

    def loss_fn(model, imgs: torch.Tensor, micro: int) -> torch.Tensor:
        g = torch.Generator(device=imgs.device).manual_seed(micro_seed(seed, micro, rank))
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
        from ..probe import labelled_for_training

        labelled_for_training(args.probe)
    return paths


def initial_model(args: TrainArgs, cfg: MAEConfig, out: Path) -> MAE:
    """A seeded fresh MAE, or --init-from's weights (unless a resumed run takes its weights from a checkpoint)."""
    torch.manual_seed(args.seed)
    model = MAE(cfg)
    if args.init_from and not (args.resume and checkpoint_dirs(out)):
        from ..weights import load

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

            from ..reconstruct import save_preview

            try:
                path = save_preview(model, self.paths, self.out, epoch, self.args.previews, self.args.seed)
                if path:
                    self.preview = str(path)
                    with Image.open(path) as picture:
                        row["preview"] = picture.convert("RGB")
            except (OSError, DataError) as e:
                warn(f"no preview for epoch {epoch}: {e}")
        if self.args.probe:
            from ..probe import probe_during_training

            try:
                row.update(probe_during_training(model, self.args.probe, epoch) or {})
            except (OSError, DataError) as e:
                warn(f"no probe for epoch {epoch}: {e}")
        return row or None


def report(summary: dict, args: TrainArgs) -> None:
    """The run's last lines on stderr."""
    if summary["skipped"]:
        console.print(f"[yellow]{plural(summary['skipped'], 'unreadable file')} skipped[/]")
    if summary["signal"] is not None:
        name = "SIGINT" if summary["signal"] == signal.SIGINT else "SIGTERM"
        console.print(
            f"[yellow]{name}: stopped at step {summary['steps']}/{summary['total_steps']}; checkpoint "
            f"saved.[/] Continue with:\n  maecli pretrain {args.data} --out {args.out} --resume"
        )
    else:
        console.print(
            f"[green]done:[/] {summary['steps']} steps, {summary['images_seen']} images seen, "
            f"{plural(summary['skipped'], 'file')} skipped, {summary['seconds']:.0f}s; weights in {summary['weights']}"
            + (f"; latest preview {summary['preview']}" if summary["preview"] else "")
        )
