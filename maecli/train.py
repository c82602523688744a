"""Pretraining on Accelerate: the run folder, the schedule, the loop, checkpoints and resume.

A run is a pure function of its arguments: data order, crops and masks all derive from (seed, epoch,
step, index), so resuming from a checkpoint continues exactly where the killed run was.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Iterable

import torch
from accelerate import Accelerator
from rich.console import Console

from . import data as D
from .heap import keep_freed_memory
from .model import MAE, MAEConfig, no_weight_decay_groups
from .runtime import resolve_precision
from .weights import CONFIG_NAME, WEIGHTS_NAME, atomic_write, fsync_dir, save_weights, write_json

console = Console(stderr=True, highlight=False, soft_wrap=True)

RUN_FILES = (CONFIG_NAME, WEIGHTS_NAME, "metrics.jsonl", "checkpoints", "previews")


class TrainError(RuntimeError):
    """Ends the run with one line on stderr."""


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


# ----------------------------------------------------------------------------------------------
# Small pure helpers


def lr_at(step: int, total: int, warmup: int, peak: float, min_lr: float = 0.0) -> float:
    """Linear warmup to `peak`, then half-cycle cosine down to `min_lr` (per optimizer step)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def default_workers() -> int:
    """Decoding workers for this process: on a small CPU box the model needs the cores; on a GPU box, feed it.

    The cores are shared among the processes `accelerate launch` started on this machine (LOCAL_WORLD_SIZE).
    On a GPU a worker decodes ~80 camera-size photos/s or ~700 small JPEGs/s (benchmarks/RESULTS.md), so a fast
    GPU wants all the cores it can get; the cap of 16 bounds the memory their prefetched batches hold.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    launched = os.environ.get("LOCAL_WORLD_SIZE", "1")  # read as cli.openmp_wait_env reads it
    share = max(1, cpus // max(1, int(launched) if launched.isdigit() else 1))
    if torch.cuda.is_available():
        return max(1, min(16, share - 1))
    return 1 if share <= 4 else min(4, share // 4)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device):
    """The paper's AdamW (betas 0.9, 0.95), fused into one kernel where torch has one: the default for-loop
    version launches ~10 small ops per tensor per step (measured 2.6x slower); the benchmarks use this too."""
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    return torch.optim.AdamW(no_weight_decay_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), **fused)


def mask_generator(seed: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + micro * 4_099 + rank * 7 + 1)
    return g


# ----------------------------------------------------------------------------------------------
# The run folder


def default_out() -> str:
    return str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Create or reuse `out`; refuse to clobber an earlier run; make sure it is writable, before any training."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"cannot use {out} as the output folder: it is a file")
    existing = out.exists() and any((out / name).exists() for name in RUN_FILES)
    if existing and not (resume or overwrite):
        raise TrainError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    if resume and not (out / CONFIG_NAME).exists():
        raise TrainError(f"cannot resume: {out} holds no {CONFIG_NAME}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".maecli-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"cannot write to output folder {out}: {e.strerror or e}") from None
    for name in (CONFIG_NAME, WEIGHTS_NAME, "metrics.jsonl"):  # atomic_write's temp files from a killed run
        for stale in out.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    if overwrite and not resume:
        for name in RUN_FILES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


CHECKPOINT_FILES = (WEIGHTS_NAME, "optimizer.pt", "state.json")


def checkpoint_dirs(out: Path) -> list[Path]:
    """Checkpoints with all their files, oldest first. A checkpoint gets its final name only once every file
    is written, so `.tmp-*` folders (a save cut short) never count."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and p.is_dir()
            and all((p / f).is_file() for f in CHECKPOINT_FILES)]
    return sorted(done, key=lambda p: int(p.name[5:]))


def save_checkpoint(out: Path, model: MAE, optimizer, state: dict, keep: int) -> Path:
    """Write checkpoints/step-N atomically (a temp folder, fsynced, then renamed) and prune old ones."""
    root = out / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"step-{state['step']:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_weights(model, tmp / WEIGHTS_NAME)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        write_json(tmp / "state.json", state)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
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
    for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def read_checkpoint(ckpt: Path, model: MAE, optimizer) -> tuple[dict, dict, dict]:
    """(weights, optimizer state, state.json) of a checkpoint, checked against `model` and `optimizer`
    without changing them; raises ValueError saying what is wrong."""
    from safetensors.torch import load_file

    try:
        weights = load_file(str(ckpt / WEIGHTS_NAME))
        # weights_only: a checkpoint folder from elsewhere cannot run code through its pickle
        optim = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        state = json.loads((ckpt / "state.json").read_text())
    except Exception as e:  # safetensors, zip and pickle errors have no common base class
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    expected = model.state_dict()
    if set(weights) != set(expected) or any(weights[k].shape != v.shape for k, v in expected.items()):
        raise ValueError("its weights do not fit this run's model")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        saved_ids = [i for group in optim["param_groups"] for i in group["params"]]
        fits = len(saved_ids) == len(params) and all(
            t.shape == params[saved_ids.index(i)].shape
            for i, st in optim["state"].items() for name, t in st.items() if name in ("exp_avg", "exp_avg_sq"))
        fits = fits and isinstance(state.get("step"), int) and state["step"] >= 0
    except (KeyError, TypeError, ValueError, AttributeError):
        fits = False
    if not fits:
        raise ValueError("its optimizer state or state.json does not fit this run")
    return weights, optim, state


def find_checkpoint(out: Path, model: MAE, optimizer, warn) -> tuple[Path, tuple[dict, dict, dict]] | None:
    """The newest checkpoint that reads back whole, falling back to older ones with a warning."""
    ckpts = checkpoint_dirs(out)
    for ckpt in reversed(ckpts):
        try:
            return ckpt, read_checkpoint(ckpt, model, optimizer)
        except ValueError as e:
            warn(f"checkpoint {ckpt} is unusable ({e}); trying an older one")
    if ckpts:
        raise TrainError(f"cannot resume: none of the {len(ckpts)} checkpoints in {out / 'checkpoints'} is usable; "
                         f"start again with --overwrite")
    return None


def trim_metrics(path: Path, step: int) -> None:
    """Drop the metrics rows a killed run logged after the checkpoint it resumes from (and a half-written
    last line), so the resumed run's rows follow on without repeats."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or row.get("step", 0) <= step:
            keep.append(line)
    text = "".join(line + "\n" for line in keep)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ----------------------------------------------------------------------------------------------
# Progress on stderr: a live bar on a terminal, plain lines otherwise


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self.bar = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress
            from rich.progress import TextColumn, TimeRemainingColumn

            self.bar = RichProgress(
                TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(), console=console, transient=False,
            )
            self.task = self.bar.add_task("steps", total=total, info="")
            self.bar.start()

    def update(self, step: int, info: str, log_line: bool):
        if not self.enabled:
            return
        if self.live:
            self.bar.update(self.task, completed=step, info=info)
        elif log_line:
            console.print(f"step {step}: {info}")

    def close(self):
        if self.bar is not None:
            self.bar.stop()


# ----------------------------------------------------------------------------------------------
# The loop


def build_config(args: TrainArgs) -> MAEConfig:
    try:
        return MAEConfig.preset(
            args.model, img_size=args.img_size, patch_size=args.patch_size, in_chans=args.in_chans,
            norm_pix_loss=args.norm_pix_loss, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
            decoder_heads=args.decoder_heads, embed_dim=args.embed_dim, depth=args.depth,
            num_heads=args.num_heads,
        )
    except ValueError as e:
        raise TrainError(str(e)) from None


class _Stop:
    """Remembers a SIGINT/SIGTERM so the loop can checkpoint and exit cleanly."""

    def __init__(self, verbose: bool):
        self.signum = None
        self.since = 0.0
        self.verbose = verbose
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            # A second Ctrl-C from the user aborts. A launcher (torchrun, accelerate launch) relaying the
            # first one to its processes within moments, or a repeated SIGTERM, asks for the same stop again.
            if signum == signal.SIGINT and time.monotonic() - self.since > 1.0:
                raise KeyboardInterrupt
            return
        self.signum, self.since = signum, time.monotonic()
        if self.verbose:
            console.print("[yellow]stopping after this step; saving a checkpoint (Ctrl-C again to abort)[/]")

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# What a resumed run may change: none of these alter the model or the steps already taken.
RESUME_MAY_CHANGE = ("epochs", "steps", "workers", "log_every", "save_every", "keep", "precision", "previews",
                     "probe")


def resumed_args(args: TrainArgs, given: set[str]) -> TrainArgs:
    """The settings saved with the run in args.out, updated with those the user gave again and may change.

    `given` names the settings the user set explicitly; one that differs from the saved run and is not in
    RESUME_MAY_CHANGE is refused rather than silently ignored or silently applied.
    """
    out = Path(args.out)
    path = out / CONFIG_NAME
    if not path.exists():
        raise TrainError(f"cannot resume: {out} holds no {CONFIG_NAME}")
    known = {f.name for f in fields(TrainArgs)}
    try:
        saved = json.loads(path.read_text())["train"]
        merged = {k: v for k, v in saved.items() if k in known}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise TrainError(f"cannot resume: {path} is unreadable ({e})") from None
    merged.update(data=args.data, out=str(out), resume=True, overwrite=False)
    for name in sorted(set(given) & known - {"data", "out", "resume", "overwrite"}):
        now, before = getattr(args, name), merged.get(name)
        if now == before:
            continue
        if name not in RESUME_MAY_CHANGE:
            may = ", ".join("--" + n.replace("_", "-") for n in RESUME_MAY_CHANGE[:7])
            raise TrainError(f"--{name.replace('_', '-')} {now} differs from the run's {before}; --resume keeps a "
                             f"run's settings and may change only {may}")
        merged[name] = now
    if "epochs" in given and "steps" not in given and merged.get("epochs") != saved.get("epochs"):
        merged["steps"] = None  # a new epoch count replaces the step count the run was started with
    return TrainArgs(**merged)


def pretrain(args: TrainArgs, given: Iterable[str] = ()) -> dict:
    """Train an MAE on a folder of images; returns a summary dict. Raises TrainError/DataError for the user.

    With `args.resume`, the run in `args.out` continues from its newest usable checkpoint with its saved
    settings; `given` names the settings the caller set explicitly (see `resumed_args`).
    """
    out = Path(args.out or default_out())
    if args.resume:
        args = resumed_args(replace(args, out=str(out)), set(given))
    if not 0 < args.mask < 1:
        raise TrainError(f"--mask must lie strictly between 0 and 1, got {args.mask}")
    cfg = build_config(args)
    keep_freed_memory()  # every step reuses the last one's memory instead of faulting in fresh pages

    from accelerate.state import AcceleratorState

    # Accelerate keeps one global state and refuses a second run in this process with another precision
    # (tests, notebooks); the process group, if any, lives in PartialState and is kept.
    AcceleratorState._reset_state()
    # Launched as several processes (accelerate launch, torchrun) on a machine without a GPU, Accelerate
    # would run each process alone, all of them writing one folder; cpu=True makes them one gloo group.
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(mixed_precision=resolve_precision(args.precision),
                              cpu=launched > 1 and not torch.cuda.is_available())
    if accelerator.num_processes != launched:
        raise TrainError(f"started as {launched} processes, but Accelerate runs {accelerator.num_processes}; "
                         f"check the launcher's settings")
    main = accelerator.is_main_process
    device = accelerator.device
    if main:
        prepare_run_dir(out, args.resume, args.overwrite)
    accelerator.wait_for_everyone()

    paths = D.find_images(args.data)
    if not paths:
        raise D.DataError(f"no image files found under {args.data} (looked for {', '.join(sorted(D.IMAGE_SUFFIXES))})")
    D.first_readable(paths, cfg.in_chans)
    if args.probe and main:
        from .probe import labelled_for_training

        labelled_for_training(args.probe)  # a bad probe folder fails now, not after the first epoch

    torch.manual_seed(args.seed)
    model = MAE(cfg)
    # A resumed run takes its weights from a checkpoint; one killed before its first starts as it did.
    if args.init_from and not (args.resume and checkpoint_dirs(out)):
        from .weights import load as load_weights

        src = load_weights(args.init_from, num_heads=cfg.num_heads, img_size=cfg.img_size).state_dict()
        target = model.state_dict()
        wrong = [k for k, v in src.items() if k in target and v.shape != target[k].shape]
        if wrong:
            raise TrainError(f"--init-from {args.init_from} does not fit this model: {wrong[0]} has shape "
                             f"{tuple(src[wrong[0]].shape)}, the model expects {tuple(target[wrong[0]].shape)}")
        missing = model.load_state_dict(src, strict=False)
        if missing.unexpected_keys:
            raise TrainError(f"--init-from {args.init_from} does not fit this model ({missing.unexpected_keys[:2]})")
    peak_lr_given = args.lr
    world = accelerator.num_processes
    rank = accelerator.process_index
    eff_batch = args.batch_size * args.accum_iter * world
    peak_lr = peak_lr_given if peak_lr_given is not None else args.blr * eff_batch / 256

    batches = D.EpochBatches(len(paths), args.batch_size, args.seed, epochs=1, rank=accelerator.process_index,
                             world=world)
    micro_per_epoch = batches.micro_per_epoch()
    steps_per_epoch = math.ceil(micro_per_epoch / args.accum_iter)
    total_steps = args.steps if args.steps else args.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = min(int(round(args.warmup_epochs * steps_per_epoch)), total_steps // 2)

    def micro_at(step: int) -> int:
        """Micro-batches taken before `step`; seeds the masks. An epoch's last step may take fewer than
        accum_iter, so this is not simply step * accum_iter."""
        return (step // steps_per_epoch) * micro_per_epoch + (step % steps_per_epoch) * args.accum_iter

    optimizer = make_optimizer(model, peak_lr, args.weight_decay, device)

    def warn(message: str):
        if main:
            console.print(f"[yellow]warning:[/] {message}")

    # Everything a checkpoint restores beyond the model and the optimizer.
    step, images_seen, seconds_before = 0, 0, 0.0
    skipped: dict[str, str] = {}
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    resumed = None
    if args.resume:
        found = find_checkpoint(out, model, optimizer, warn) if main else None
        if world > 1:  # every rank loads the checkpoint the main process chose
            from accelerate.utils import broadcast_object_list

            name = [found[0].name if found else None]
            broadcast_object_list(name)
            if not main and name[0]:
                ckpt = out / "checkpoints" / name[0]
                found = ckpt, read_checkpoint(ckpt, model, optimizer)
        if found:
            resumed, (weights, optim_state, st) = found
            model.load_state_dict(weights, strict=True)
            optimizer.load_state_dict(optim_state)
            step, images_seen = st["step"], st["images_seen"]
            seconds_before = st.get("seconds", 0.0)
            skipped = dict(st.get("skipped", {}))
            window = st.get("loss_sum", [])
            if len(window) == world:  # the loss average in progress, so the next metrics row is exact too
                loss_sum.fill_(window[rank])
                loss_count = st.get("loss_count", 0)
            if st.get("images", len(paths)) != len(paths) or st.get("processes", world) != world:
                warn(f"the run was saved with {st.get('images')} images and {st.get('processes')} processes, now "
                     f"{len(paths)} and {world}: from here on it differs from an uninterrupted run")
        elif main:
            console.print(f"[yellow]no checkpoint in {out}; starting from step 0[/]")
    if step > total_steps:
        raise TrainError(f"the run in {out} is at step {step}, past the {total_steps} steps asked for; "
                         f"pass a larger --steps or --epochs to extend it")

    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    workers = default_workers() if args.workers is None else args.workers
    start_epoch, start_micro = step // steps_per_epoch, (step % steps_per_epoch) * args.accum_iter
    sampler = D.EpochBatches(len(paths), args.batch_size, args.seed, epochs=epochs, start_epoch=start_epoch,
                             start_micro=start_micro, rank=accelerator.process_index, world=world)
    dataset = D.PretrainDataset(paths, cfg.img_size, cfg.in_chans, args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=D.collate,
                                         worker_init_fn=D.worker_init, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                         prefetch_factor=4 if workers > 0 else None)

    train_config = {"model": cfg.to_dict(), "train": {**asdict(args), "out": str(out), "resume": False,
                                                      "overwrite": False}}
    if main:
        write_json(out / CONFIG_NAME, train_config)
        if resumed is not None:
            console.print(f"resuming {out} from step {step} ({resumed.name})")
            trim_metrics(out / "metrics.jsonl", step)
        elif args.resume:
            trim_metrics(out / "metrics.jsonl", 0)
        console.print(
            f"maecli pretrain: {len(paths)} images in {args.data}; {args.model} at {cfg.img_size}px, patch "
            f"{cfg.patch_size}, mask {args.mask}; device {device.type} x{world}, precision "
            f"{accelerator.mixed_precision}, {workers} loader workers"
        )
        console.print(
            f"effective batch {eff_batch} ({args.batch_size} x {args.accum_iter} accum x {world} processes), "
            f"lr {peak_lr:.3g}" + ("" if peak_lr_given is not None else f" (blr {args.blr:g} x {eff_batch}/256)")
            + f", {total_steps} steps ({steps_per_epoch}/epoch, {epochs} epochs), warmup {warmup} steps"
        )

    metrics = open(out / "metrics.jsonl", "a") if main else None
    progress = Progress(total_steps, enabled=main)
    progress.update(step, "starting", log_line=False)
    t0 = time.time() - seconds_before  # "time" in metrics counts training time across resumes
    t_log, images_at_log = time.time(), images_seen
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # the first step with a non-finite loss, 1-based
    micro = micro_at(step)
    weights_at = -1  # the step whose weights model.safetensors holds, when written by this session
    exit_signal = None
    summary_preview = None

    def check_finite():
        """Stop on a non-finite loss. The flag lives on the device, so this syncs only when called; every
        rank calls it at the same steps and sees the same verdict."""
        bad = first_bad.view(1) if world == 1 else accelerator.gather(first_bad.view(1))
        bad = [b for b in bad.tolist() if b > 0]
        if bad:
            ckpts = checkpoint_dirs(out)
            kept = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was saved before it"
            raise TrainError(f"loss became non-finite at step {min(bad)} (precision {accelerator.mixed_precision});"
                             f" stopped, and {kept}; try a lower --lr, --clip-grad, or --precision no")

    def gathered_skipped() -> dict[str, str]:
        if world == 1:
            return skipped
        from accelerate.utils import gather_object

        merged = {}
        for part in gather_object([skipped]):
            merged.update(part)
        return merged

    def checkpoint(final_weights: bool):
        nonlocal weights_at
        check_finite()
        window = (loss_sum.view(1) if world == 1 else accelerator.gather(loss_sum.view(1))).tolist()
        all_skipped = gathered_skipped()
        if main:
            state = {"step": step, "epoch": step / steps_per_epoch, "images_seen": images_seen,
                     "total_steps": total_steps, "micro": micro, "images": len(paths), "processes": world,
                     "seconds": round(time.time() - t0, 3), "loss_sum": window, "loss_count": loss_count,
                     "skipped": all_skipped}
            save_checkpoint(out, raw_model, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                            state, args.keep)
            if final_weights:
                save_weights(raw_model, out / WEIGHTS_NAME)
        if final_weights:
            weights_at = step
        accelerator.wait_for_everyone()

    def agree(flag: bool) -> bool:
        """True on every rank if it is true on any: ranks must take the same branch around collectives.
        A CPU (gloo) group carries it, so asking every step never waits on the GPU."""
        if world == 1:
            return flag
        t = torch.tensor([int(flag)])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=control)
        return bool(t.item())

    # every rank creates it, in the same order: a collective of its own
    control = torch.distributed.new_group(backend="gloo") if world > 1 else None
    model.train()
    it = iter(loader)
    with _Stop(verbose=main) as stop:
        try:
            while step < total_steps:
                epoch = step // steps_per_epoch
                in_epoch = step % steps_per_epoch
                n_micro = min(args.accum_iter, micro_per_epoch - in_epoch * args.accum_iter)
                lr = lr_at(step, total_steps, warmup, peak_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_images = 0
                for m in range(n_micro):
                    imgs, failed = next(it)
                    for path, why in failed:
                        if path not in skipped:
                            skipped[path] = why
                            console.print(f"[yellow]warning:[/] skipped {path}: {why}")
                    imgs = imgs.to(device, non_blocking=True)
                    g = mask_generator(args.seed, micro, rank, device)
                    noise = torch.rand(imgs.shape[0], cfg.num_patches, device=device, generator=g)
                    sync = contextlib.nullcontext() if m == n_micro - 1 else accelerator.no_sync(model)
                    with sync:
                        with accelerator.autocast():
                            loss, _, _ = model(imgs, mask_ratio=args.mask, noise=noise)
                        accelerator.backward(loss / n_micro)
                    loss_d = loss.detach().float()
                    first_bad = torch.where((first_bad == 0) & ~torch.isfinite(loss_d), step + 1, first_bad)
                    loss_sum += loss_d
                    loss_count += 1
                    micro += 1
                    step_images += imgs.shape[0]
                if args.clip_grad:
                    accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                images_seen += step_images * world

                epoch_end = step % steps_per_epoch == 0 or step == total_steps
                stop_now = agree(stop.signum is not None)  # a signal may reach some ranks only, or later
                log_now = step % args.log_every == 0 or epoch_end or stop_now
                if log_now:
                    check_finite()
                    loss_val = accelerator.reduce(loss_sum / max(loss_count, 1), "mean").item()
                    now = time.time()
                    ips = (images_seen - images_at_log) / max(now - t_log, 1e-9)
                    t_log, images_at_log = now, images_seen
                    loss_sum.zero_()
                    loss_count = 0
                    rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss_val, "lr": lr,
                           "images_per_sec": round(ips, 2), "images_seen": images_seen,
                           "time": round(now - t0, 2)}
                    if main:
                        metrics.write(json.dumps(rec) + "\n")
                        metrics.flush()
                    progress.update(step, f"epoch {epoch + 1}/{epochs} loss {loss_val:.4f} lr {lr:.2e} "
                                          f"{ips:.1f} img/s", log_line=True)
                if epoch_end or stop_now or (args.save_every and step % args.save_every == 0):
                    checkpoint(final_weights=epoch_end or stop_now)
                if epoch_end and main:
                    summary_preview = epoch_end_hooks(raw_model, args, paths, cfg, out, epoch + 1, metrics,
                                                      step, accelerator)
                if stop_now:
                    exit_signal = stop.signum or signal.SIGTERM
                    break
            if exit_signal is None and weights_at != step and main:
                # a resume of a finished run (perhaps killed while writing these): write them from the checkpoint
                console.print(f"the run in {out} was already complete at step {step}")
                save_weights(raw_model, out / WEIGHTS_NAME)
        except OSError as e:  # a full disk, a folder removed under us: the checkpoints on disk stay whole
            ckpts = checkpoint_dirs(out)
            kept = f"; the newest complete checkpoint is {ckpts[-1]}" if ckpts else ""
            raise TrainError(f"cannot write to {out}: {e.strerror or e}{kept}") from None
        finally:
            progress.close()
            if metrics:
                metrics.close()
            shutdown = getattr(it, "_shutdown_workers", None)  # workers ignore SIGTERM: stop them here
            if shutdown is not None:
                shutdown()

    elapsed = time.time() - t0
    skipped = gathered_skipped()
    summary = {"out": str(out), "steps": step, "total_steps": total_steps, "images_seen": images_seen,
               "skipped": len(skipped), "seconds": round(elapsed, 1), "weights": str(out / WEIGHTS_NAME),
               "preview": summary_preview, "signal": exit_signal}
    if main:
        if skipped:
            console.print(f"[yellow]{len(skipped)} unreadable file(s) skipped[/]")
        if exit_signal is not None:
            name = "SIGINT" if exit_signal == signal.SIGINT else "SIGTERM"
            console.print(
                f"[yellow]{name}: stopped at step {step}/{total_steps}; checkpoint saved.[/] Continue with:\n"
                f"  maecli pretrain {args.data} --out {out} --resume"
            )
        else:
            console.print(
                f"[green]done:[/] {step} steps, {images_seen} images seen, {len(skipped)} files skipped, "
                f"{elapsed:.0f}s; weights in {out / WEIGHTS_NAME}"
                + (f"; latest preview {summary_preview}" if summary_preview else "")
            )
    accelerator.end_training()
    return summary


def epoch_end_hooks(model, args, paths, cfg, out, epoch, metrics, step, accelerator):
    """Per-epoch extras on the main process (previews, probes); returns the latest preview path."""
    preview = None
    if args.previews:
        from .reconstruct import save_preview

        try:
            preview = save_preview(model, paths, out, epoch, args.previews, args.seed)
        except (OSError, D.DataError) as e:  # a picture is not worth a long run: warn and train on
            console.print(f"[yellow]warning:[/] no preview for epoch {epoch}: {e}")
    if args.probe:
        from .probe import probe_during_training

        try:
            probe_during_training(model, args.probe, epoch, step, metrics, console)
        except (OSError, D.DataError) as e:  # a probe folder gone bad must not end the run
            console.print(f"[yellow]warning:[/] no probe for epoch {epoch}: {e}")
    return str(preview) if preview else None
