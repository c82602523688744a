"""Pretraining: `pretrain(TrainArgs)` trains an MAE on a folder of images; its recipe (the model, the crops, the
masked loss, the previews and probe at epoch ends) on the shared start (run.py) and loop (loop.py).

A run is a pure function of its arguments: data order, crops and masks all derive from (seed, epoch, step, index),
so resuming from a checkpoint continues exactly where the killed run was.
"""

from __future__ import annotations

import shlex
import signal
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from .. import data as D
from ..console import console, plural, warn
from ..errors import DataError, TrainError, UsageError
from ..model import MAE, MAEConfig, no_weight_decay_groups, num_visible
from ..presets import PRESETS
from ..rundir import WEIGHTS_NAME
from ..shards import SHUFFLE_BUFFER, ShardSet, is_shards, preview_sources
from ..shards import training_loader as shard_loader
from ..stats import DataStats, measure
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
    in_chans: int | None = None
    bands: tuple[int, ...] | None = None
    show_bands: tuple[int, ...] | None = None
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


# What --init-from's weights decide; a setting of these that disagrees with them is refused, not silently dropped.
# The band count is the data's: weights of another count are adapted (with_bands).
ARCHITECTURE = ("patch_size", "embed_dim", "depth", "num_heads", "norm_pix_loss")
DECODER = ("decoder_dim", "decoder_depth", "decoder_heads")


def build_config(
    args: TrainArgs, source: MAE | None = None, given: set[str] = frozenset(), data: DataStats | None = None
) -> MAEConfig:
    """The model to train: the preset and the size flags; with --init-from, the source's architecture (patch size,
    widths, depths, heads, the loss target) at --img-size; on --resume, the run's own. `data` (the folder's
    statistics) gives the bands and their normalization."""
    try:
        if args.resume and (saved := saved_model(args.out)) is not None:
            return checked_mask(args, saved)
        in_chans = data.in_chans if data is not None else args.in_chans
        if source is not None:
            cfg = continued_config(args, source, given, in_chans)
        else:
            cfg = MAEConfig.preset(
                args.model,
                img_size=args.img_size,
                patch_size=args.patch_size,
                in_chans=in_chans,
                norm_pix_loss=args.norm_pix_loss,
                **{name: getattr(args, name) for name in (*DECODER, "embed_dim", "depth", "num_heads")},
            )
        if data is not None:
            cfg = replace(cfg, mean=data.mean, std=data.std, bands=data.bands, units=data.units)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return checked_mask(args, cfg)


def checked_mask(args: TrainArgs, cfg: MAEConfig) -> MAEConfig:
    """cfg, once --mask leaves some of its patches visible and hides some."""
    if not 0 < args.mask < 1:
        raise UsageError(f"--mask must lie strictly between 0 and 1, got {args.mask}")
    if num_visible(cfg.num_patches, args.mask) < 1:
        raise UsageError(
            f"--mask {args.mask} leaves none of the {cfg.num_patches} patches visible; the encoder needs "
            f"at least one (at most {1 - 1 / cfg.num_patches:.4g} here)"
        )
    return cfg


def saved_model(out: str) -> MAEConfig | None:
    """The model a run was started with, from its config.json (a resumed run keeps it)."""
    from ..rundir import CONFIG_NAME, read_json_object

    model = (read_json_object(Path(out) / CONFIG_NAME) or {}).get("model")
    return MAEConfig.from_dict(model) if isinstance(model, dict) else None


def continued_config(args: TrainArgs, source: MAE, given: set[str], in_chans: int | None = None) -> MAEConfig:
    """--init-from's architecture at --img-size, for `in_chans` bands (the data's; a source of another count is
    adapted, with a warning); an encoder-only source gets a decoder of the flags' (or its size's) shape, trained from
    scratch. Flags set to another architecture are refused."""
    cfg, defaults = source.cfg, TrainArgs(data="")
    chosen = {n for n in ("model", *ARCHITECTURE, *DECODER) if n in given or getattr(args, n) != getattr(defaults, n)}
    if "model" in chosen:  # a preset names the encoder's shape
        chosen |= {"embed_dim", "depth", "num_heads"}
    if chosen:
        asked = MAEConfig.preset(
            args.model,
            img_size=cfg.img_size,
            in_chans=args.in_chans,
            norm_pix_loss=args.norm_pix_loss,
            **{name: getattr(args, name) for name in ("patch_size", "embed_dim", "depth", "num_heads", *DECODER)},
        )
        checked = [*ARCHITECTURE, *(DECODER if source.has_decoder else ())]
        for name in (n for n in checked if n in chosen and getattr(asked, n) != getattr(cfg, n)):
            flag = "--model" if name in ("embed_dim", "depth", "num_heads") and name not in given else "--" + name
            raise UsageError(
                f"{flag.replace('_', '-')} asks for {name.replace('_', ' ')} {getattr(asked, name)}, but "
                f"--init-from {args.init_from} has {getattr(cfg, name)}; a continued run takes the architecture of "
                f"the weights it continues (leave the flag out)"
            )
    if in_chans is not None and in_chans != cfg.in_chans:
        warn(f"--init-from {args.init_from}: {band_order_caveat(cfg.in_chans, in_chans)}")
        cfg = replace(cfg, in_chans=in_chans, mean=None, std=None, bands=None)  # the data's, set by build_config
    if source.has_decoder:
        return cfg
    preset = PRESETS.get(preset_of(cfg) or "", PRESETS["vit-base"])
    decoder = {name: getattr(args, name) or getattr(preset, name) for name in DECODER}
    warn(
        f"--init-from {args.init_from} has no decoder: a new one ({decoder['decoder_dim']}-d x "
        f"{decoder['decoder_depth']}) is trained from scratch beside its encoder"
    )
    return replace(cfg, **decoder)


def band_order_caveat(have: int, want: int) -> str:
    """What with_bands does to weights of `have` bands for `want`, and why the order of the bands then matters."""
    head = f"{plural(have, 'band')} adapted to {want} (timm's adapt_input_conv, and the decoder's output alike): "
    if want == 1:
        return head + f"its {have} bands' filters are summed into the one band"
    if have == 1:
        return head + f"its one band's filter is repeated for each band, scaled by 1/{want}"
    if want < have:
        how = f"its filters for {span(1, want)} are kept and those for {span(want + 1, have)} dropped"
    else:
        how = f"its filters for {span(1, have)} are reused for {span(1, have)} and cycled for {span(have + 1, want)}"
    first = "red, green and blue" if have == 3 else f"its {span(1, min(have, want))}"
    order = f"which band is which matters: put the ones that play {first} first (--bands orders them)"
    return head + f"{how}, scaled by {have}/{want}; {order}"


def span(first: int, last: int) -> str:
    return f"band {first}" if first == last else f"bands {first}-{last}"


def with_bands(state: dict, source: MAEConfig, in_chans: int) -> dict:
    """A source MAE's `state` for `in_chans` input bands. The patch embedding by timm's adapt_input_conv: the
    source's filters repeated over the new bands in order, scaled by source/new bands so a patch's response keeps its
    size (summed for one band). The decoder's output layer, whose rows predict one pixel of one band each, alike and
    unscaled: band b's rows are the source's for band b, cycled (averaged for one band). Re-initialising it instead
    would throw away what the decoder learnt for bands 1-3; cycling makes one rule for both ends of the model."""
    from timm.models import adapt_input_conv

    state = dict(state)
    proj = "patch_embed.proj.weight"
    state[proj] = adapt_input_conv(in_chans, state[proj], base_chans=source.in_chans)
    p2, have = source.patch_size**2, source.in_chans
    for name in ("decoder_pred.weight", "decoder_pred.bias"):
        if name in state:
            rows = state[name].reshape(p2, have, -1)  # (pixel, band, decoder width or 1)
            rows = rows.mean(1, keepdim=True) if in_chans == 1 else rows.repeat(1, -(-in_chans // have), 1)
            state[name] = rows[:, :in_chans].reshape(p2 * in_chans, *state[name].shape[1:])
    return state


def preset_of(cfg: MAEConfig) -> str | None:
    """The preset whose encoder `cfg` has, if any."""
    return next(
        (
            name
            for name, p in PRESETS.items()
            if (p.embed_dim, p.depth, p.num_heads) == (cfg.embed_dim, cfg.depth, cfg.num_heads)
        ),
        None,
    )


def init_source(args: TrainArgs, given: set[str]) -> MAE | None:
    """--init-from's model at --img-size (position embeddings interpolated, with a warning), unless a resumed run
    takes its weights from a checkpoint. --num-heads or --model tell the heads of a file that does not say."""
    if not args.init_from or (args.resume and checkpoint_dirs(Path(args.out))):
        return None
    from ..weights import load

    hint = args.model if "model" in given or args.model != TrainArgs.model else None
    return load(args.init_from, img_size=args.img_size, num_heads=args.num_heads, model_hint=hint)


def pretrain(args: TrainArgs, given: Iterable[str] = ()) -> dict:
    """Train an MAE on a folder of images; returns a summary dict. Raises a maecli UserError for the user.

    With `args.resume`, the run in `args.out` continues from its newest usable checkpoint with its saved
    settings; `given` names the settings the caller set explicitly (see `run.resumed_args`).
    """
    args = prepared(args, given)
    source = init_source(args, set(given))
    paths = find_training_images(args)
    sharded = isinstance(paths, ShardSet)  # streamed: no sample for statistics, no first file to try
    data = None if sharded or (args.resume and saved_model(args.out) is not None) else data_stats(args, paths)
    cfg = build_config(args, source, set(given), data)
    if not sharded:
        D.first_readable(paths, D.Pixels.of(cfg))
    model = initial_model(args, cfg, source)
    groups = no_weight_decay_groups(model, args.weight_decay)
    with start(args, model, groups, paths, repeat=args.repeat, betas=(0.9, 0.95)) as run:
        loader = training_loader(run, paths, cfg)
        if run.main:
            run.write_config(cfg.to_dict())
            times = f" (x{args.repeat} an epoch)" if args.repeat > 1 else ""
            if isinstance(paths, ShardSet):
                times = f" in {plural(len(paths.paths), 'shard')} (shuffle buffer {SHUFFLE_BUFFER})"
                paths = preview_sources(paths, run.out, args.previews, cfg.in_chans)
            run.announce(
                f"maecli pretrain: {run.images} images{times} in {args.data}; "
                f"{model_name(cfg)} at "
                f"{cfg.img_size}px, patch {cfg.patch_size}, mask {args.mask}"
                + (f"; continuing {args.init_from}" if args.init_from else "")
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


def model_name(cfg: MAEConfig) -> str:
    """The preset's name, or the encoder's shape when it is none of them."""
    return preset_of(cfg) or f"ViT {cfg.embed_dim}-d x {cfg.depth}, {cfg.num_heads} heads"


def mae_loss(seed: int, rank: int, mask_ratio: float, num_patches: int):
    """The loss of one micro-batch, its mask seeded by (seed, micro-batch, rank) so a resumed run draws the same."""

    def loss_fn(model, imgs: torch.Tensor, micro: int) -> torch.Tensor:
        g = torch.Generator(device=imgs.device).manual_seed(micro_seed(seed, micro, rank))
        noise = torch.rand(imgs.shape[0], num_patches, device=imgs.device, generator=g)
        loss, _, _ = model(imgs, mask_ratio=mask_ratio, noise=noise)
        return loss

    return loss_fn


def data_stats(args: TrainArgs, paths: list[Path]) -> DataStats:
    """The folder's bands and statistics (stats.measure). Every process reads the same seeded sample and gets the
    same numbers (no collective that a failing rank could leave waiting); the main one says them. The launcher's
    RANK says which that is: Accelerate's state must not exist yet (make_accelerator decides how it starts)."""
    import os

    main = os.environ.get("RANK", "0") == "0"
    return measure(
        paths, in_chans=args.in_chans, bands=args.bands, seed=args.seed, min_side=2 * args.img_size, quiet=not main
    )


def find_training_images(args: TrainArgs) -> D.FileList | ShardSet:
    """The data folder's images (or the shards DATA names), checked before the first step: some must exist, and the
    probe folder must work."""
    if is_shards(args.data):
        if args.repeat > 1:
            raise UsageError("--repeat is for small folders; an epoch of shards is one pass over them")
        paths = ShardSet(args.data)
    else:
        paths = D.find_images(args.data)
        if not paths:
            raise DataError(
                f"no image files found under {args.data} (looked for {', '.join(sorted(D.IMAGE_SUFFIXES))})"
            )
    if args.probe:
        from ..probe import labelled_for_training

        labelled_for_training(args.probe)
    return paths


def training_loader(run, paths, cfg: MAEConfig):
    """The loader of a folder's images (exact resume by index) or of shards (resume by stream position)."""
    if isinstance(paths, ShardSet):
        return shard_loader(run, paths, cfg.img_size, D.Pixels.of(cfg), SHUFFLE_BUFFER)
    return run.loader(D.PretrainDataset(paths, cfg.img_size, D.Pixels.of(cfg), run.args.seed), D.collate)


def initial_model(args: TrainArgs, cfg: MAEConfig, source: MAE | None) -> MAE:
    """A seeded fresh MAE, with --init-from's weights in it where given (all of them, or the encoder's), adapted to
    the data's band count."""
    torch.manual_seed(args.seed)
    model = MAE(cfg)
    if source is not None:
        state = source.state_dict()
        if source.cfg.in_chans != cfg.in_chans:
            state = with_bands(state, source.cfg, cfg.in_chans)
        result = model.load_state_dict(state, strict=False)
        decoder_only = all(k.startswith("decoder") or k == "mask_token" for k in result.missing_keys)
        if result.unexpected_keys or not decoder_only:
            missing = (result.unexpected_keys or result.missing_keys)[:2]
            raise TrainError(f"--init-from {args.init_from} does not fit the model it describes ({missing})")
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
                path = save_preview(
                    model,
                    self.paths,
                    self.out,
                    epoch,
                    self.args.previews,
                    self.args.seed,
                    self.args.mask,
                    self.args.show_bands,
                )
                if path:
                    self.preview = str(path)
                    with Image.open(path, formats=["PNG"]) as picture:
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
            f"saved.[/] Continue with:\n  maecli pretrain {shlex.quote(args.data)} --out {args.out} --resume"
        )
    else:
        console.print(
            f"[green]done:[/] {summary['steps']} steps, {summary['images_seen']} images seen, "
            f"{plural(summary['skipped'], 'file')} skipped, {summary['seconds']:.0f}s; weights in {summary['weights']}"
            + (f"; latest preview {summary['preview']}" if summary["preview"] else "")
        )
