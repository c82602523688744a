"""The training loop every maecli training command runs on, over Accelerate: micro-batches and gradient
accumulation, the learning-rate schedule, logging, checkpoints and resume, signals, and the non-finite-loss stop.

A command supplies the model, the optimizer, a loader of (batch, failed files) and a `loss_fn`; the loop owns
everything else. Several processes (`accelerate launch`) run it in step; only the main process writes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch

from ..console import Progress, console
from ..data import shutdown_workers
from ..errors import TrainError
from ..rundir import MetricsLog
from ..runtime import resolve_precision
from ..trackers import Curves, Tracking, logs_dir, place_trackio_store
from ..trackers import resolve as resolve_trackers
from .checkpoint import NonFiniteError, TrainState, checkpoint_dirs, save_checkpoint


def make_accelerator(precision: str, log_with=(), run: Path | None = None):
    """One Accelerator for this process, in the resolved precision; several launched processes on a machine
    without a GPU become one gloo group (Accelerate would otherwise run each alone, all writing one folder).

    `log_with` names trackers (`--log-with`: tensorboard, trackio, mlflow, wandb, all, none) that log into
    `run`/logs; one not installed is a UserError naming its pip command, raised here, before any training."""
    trackers = resolve_trackers(log_with)
    if "trackio" in trackers:
        place_trackio_store(run)  # before Accelerate imports trackio
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Accelerate keeps one global state and refuses a second run in this process with another precision (tests,
    # notebooks); the process group, if any, lives in PartialState and is kept.
    AcceleratorState._reset_state()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        mixed_precision=resolve_precision(precision),
        cpu=launched > 1 and not torch.cuda.is_available(),
        log_with=trackers or None,
        project_dir=str(logs_dir(run)) if trackers else None,
    )
    if accelerator.num_processes != launched:
        raise TrainError(
            f"started as {launched} processes, but Accelerate runs {accelerator.num_processes}; "
            f"check the launcher's settings"
        )
    return accelerator


def make_optimizer(param_groups, lr: float, device: torch.device, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW, fused into one kernel where torch has one (the for-loop version launches many small ops per tensor)."""
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, **fused)


def to_device(batch, device: torch.device):
    """A tensor, or a tuple or list of them, on `device` (pinned host memory copies asynchronously)."""
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch.to(device, non_blocking=True)


class StopSignal:
    """Remembers a SIGINT or SIGTERM so the loop can checkpoint and exit cleanly; a second Ctrl-C aborts."""

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
            # A launcher (torchrun, accelerate launch) relays the first Ctrl-C to its processes within moments,
            # and a repeated SIGTERM asks for the same stop again; a later Ctrl-C from the user aborts.
            if signum == signal.SIGINT and time.monotonic() - self.since > 1.0:
                raise KeyboardInterrupt
            return
        self.signum, self.since = signum, time.monotonic()
        if self.verbose:
            console.print("[yellow]stopping after this step; saving a checkpoint (Ctrl-C again to abort)[/]")

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class LoopSettings:
    log_every: int = 10
    save_every: int = 500  # steps between checkpoints; every epoch end saves one too
    keep: int = 2  # checkpoints kept
    clip_grad: float | None = None
    label: str = "train"  # the progress bar's label
    curves: bool = True  # redraw RUN/curves.png at epoch ends


class Trainer:
    """Runs `schedule.total_steps` optimizer steps from `state.step` on.

    loss_fn(model, batch, micro) -> loss for one micro-batch (`micro` counts micro-batches from the start of the
    run, to seed anything random). on_epoch_end(epoch, step, model) runs on the main process after the epoch's
    checkpoint and returns extra metrics to log, or None; values that are PIL images in it (the preview grid) go to
    the trackers as pictures, not to metrics.jsonl. write_weights(model), if given, writes the hand-over weights at
    each epoch end and on a stop. hparams (the run's config, nested dicts) go to the trackers as hyper-parameters.
    checkpoint_files (name -> bytes, or a function writing the file) are saved in every checkpoint (the training
    file list: rundir.DataList.linker).
    """

    def __init__(
        self,
        accelerator,
        model,
        optimizer,
        schedule,
        run: Path,
        state: TrainState,
        *,
        loss_fn: Callable,
        settings: LoopSettings,
        on_epoch_end: Callable | None = None,
        write_weights: Callable | None = None,
        hparams: dict | None = None,
        checkpoint_files: dict | None = None,
    ):
        self.acc, self.schedule, self.run, self.state = accelerator, schedule, Path(run), state
        self.checkpoint_files = checkpoint_files
        self.loss_fn, self.settings, self.hparams = loss_fn, settings, hparams
        self.on_epoch_end, self.write_weights = on_epoch_end, write_weights
        self.main, self.world, self.device = accelerator.is_main_process, accelerator.num_processes, accelerator.device
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.raw_model = accelerator.unwrap_model(self.model)
        self.loss_sum = torch.zeros((), device=self.device)
        if len(state.loss_sum) == self.world:  # the loss average in progress when the checkpoint was saved
            self.loss_sum.fill_(state.loss_sum[accelerator.process_index])
        else:
            state.loss_count = 0
        self.first_bad = torch.zeros((), dtype=torch.long, device=self.device)  # first step with a non-finite loss
        # every rank creates it, in the same order: a collective of its own; it carries the stop flag on the CPU
        self.control = torch.distributed.new_group(backend="gloo") if self.world > 1 else None
        self.weights_at = -1

    def fit(self, loader) -> dict:
        """Train to the end or to a signal; returns {"steps", "images_seen", "seconds", "skipped", "signal"}."""
        st, sched = self.state, self.schedule
        self.metrics = MetricsLog(self.run, enabled=self.main)
        self.tracking = Tracking(self.acc if self.main else None, self.run, self.hparams, st.step)
        self.curves = Curves(self.run, enabled=self.main and self.settings.curves)
        self.t0 = time.time() - st.seconds
        self.t_log, self.images_at_log = time.time(), st.images_seen
        exit_signal = None
        it = iter(loader)
        self.model.train()
        with (
            StopSignal(verbose=self.main) as stop,
            Progress(self.settings.label, sched.total_steps, keep=True, enabled=self.main) as progress,
        ):
            progress.update(st.step, "starting")
            try:
                while st.step < sched.total_steps:
                    epoch = sched.epoch_of(st.step)
                    lr = self.train_step(it)
                    epoch_end = sched.is_epoch_end(st.step)
                    stop_now = self.agree(stop.signum is not None)  # a signal may reach some ranks only, or later
                    if st.step % self.settings.log_every == 0 or epoch_end or stop_now:
                        self.log(lr, epoch, progress)
                    if epoch_end or stop_now or (self.settings.save_every and st.step % self.settings.save_every == 0):
                        self.checkpoint(hand_over=epoch_end or stop_now)
                    if epoch_end and self.main and self.on_epoch_end is not None:
                        row = self.on_epoch_end(epoch + 1, st.step, self.raw_model) or {}
                        images = {k: v for k, v in row.items() if isinstance(v, PIL.Image.Image)}
                        row = {k: v for k, v in row.items() if k not in images}
                        if row or images:
                            self.record({"step": st.step, "epoch": epoch + 1, **row}, images, write=bool(row))
                    if epoch_end:
                        self.curves.update(final=st.step == sched.total_steps)
                    if stop_now:
                        exit_signal = stop.signum or signal.SIGTERM
                        break
                if exit_signal is None and self.weights_at != st.step and self.main and self.write_weights:
                    # a resume of a finished run (perhaps killed while writing them): write them from the checkpoint
                    console.print(f"the run in {self.run} was already complete at step {st.step}")
                    self.write_weights(self.raw_model)
            except OSError as e:  # a full disk, a folder removed under us: the checkpoints on disk stay whole
                raise TrainError(
                    f"cannot write to {self.run}: {e.strerror or e}{self.newest_checkpoint('; ')}"
                ) from None
            finally:
                self.metrics.close()
                self.tracking.finish()
                shutdown_workers(it)  # workers ignore SIGINT and SIGTERM: stop them here
        st.seconds = time.time() - self.t0
        return {
            "steps": st.step,
            "images_seen": st.images_seen,
            "seconds": round(st.seconds, 1),
            "skipped": self.gathered_skipped(),
            "signal": exit_signal,
        }

    def train_step(self, it) -> float:
        """One optimizer step over its micro-batches; returns its learning rate."""
        st, sched, acc = self.state, self.schedule, self.acc
        lr = sched.lr_at(st.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # layer-wise decay keeps its scale in the group
        n_micro, step_images = sched.micro_in_step(st.step), 0
        for m in range(n_micro):
            batch, failed = next(it)
            batch = to_device(batch, self.device)
            for path, why in failed:
                if path not in st.skipped:
                    st.skipped[path] = why
                    console.print(f"[yellow]warning:[/] skipped {path}: {why}")
            with contextlib.nullcontext() if m == n_micro - 1 else acc.no_sync(self.model):
                with acc.autocast():
                    loss = self.loss_fn(self.model, batch, st.micro)
                acc.backward(loss / n_micro)
            loss = loss.detach().float()
            self.first_bad = torch.where((self.first_bad == 0) & ~torch.isfinite(loss), st.step + 1, self.first_bad)
            self.loss_sum += loss
            st.loss_count += 1
            st.micro += 1
            step_images += len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)
        if self.settings.clip_grad:
            acc.clip_grad_norm_(self.model.parameters(), self.settings.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.step += 1
        st.images_seen += step_images * self.world
        return lr

    def log(self, lr: float, epoch: int, progress: Progress) -> None:
        st = self.state
        self.check_finite()
        loss = self.acc.reduce(self.loss_sum / max(st.loss_count, 1), "mean").item()
        now = time.time()
        ips = (st.images_seen - self.images_at_log) / max(now - self.t_log, 1e-9)
        self.t_log, self.images_at_log = now, st.images_seen
        self.loss_sum.zero_()
        st.loss_count = 0
        self.record(
            {
                "step": st.step,
                "epoch": round(st.step / self.schedule.steps_per_epoch, 4),
                "loss": loss,
                "lr": lr,
                "images_per_sec": round(ips, 2),
                "images_seen": st.images_seen,
                "time": round(now - self.t0, 2),
            }
        )
        progress.update(
            st.step, f"epoch {epoch + 1}/{self.schedule.epochs} loss {loss:.4f} lr {lr:.2e} {ips:.1f} img/s", line=True
        )

    def record(self, row: dict, images: dict | None = None, write: bool = True) -> None:
        """One metrics row to metrics.jsonl and the trackers (main process only), pictures to the trackers."""
        if write:
            self.metrics.write(row)
        if self.main:
            self.tracking.log(row if write else {"step": row["step"]}, images)

    def checkpoint(self, hand_over: bool) -> None:
        """Save a checkpoint (and with `hand_over`, the hand-over weights); every rank takes part."""
        st = self.state
        self.check_finite()
        st.loss_sum = (self.loss_sum.view(1) if self.world == 1 else self.acc.gather(self.loss_sum.view(1))).tolist()
        st.skipped = self.gathered_skipped()
        if self.world > 1 and "shards" in st.extra:  # each rank's shard streams (shards.Positions): all of them
            st.extra["shards"] = self.gathered(st.extra["shards"])
        st.seconds = round(time.time() - self.t0, 3)
        if self.main:
            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # Accelerate's wrapper holds the real one
            try:
                save_checkpoint(
                    self.run,
                    self.raw_model,
                    optimizer,
                    st,
                    self.schedule.steps_per_epoch,
                    self.settings.keep,
                    self.checkpoint_files,
                )
            except NonFiniteError as e:
                raise TrainError(
                    f"{e}; stopped{self.newest_checkpoint(', and the last good checkpoint is ')}; try "
                    f"a lower --lr, --clip-grad, or --precision no"
                ) from None
            if hand_over and self.write_weights is not None:
                self.write_weights(self.raw_model)
        if hand_over:
            self.weights_at = st.step
        self.acc.wait_for_everyone()

    def check_finite(self) -> None:
        """Stop on a non-finite loss. The flag lives on the device, so this syncs only when called; every rank calls
        it at the same steps and sees the same verdict."""
        bad = self.first_bad.view(1) if self.world == 1 else self.acc.gather(self.first_bad.view(1))
        bad = [b for b in bad.tolist() if b > 0]
        if bad:
            kept = self.newest_checkpoint("the last good checkpoint is ") or "no checkpoint was saved before it"
            raise TrainError(
                f"loss became non-finite at step {min(bad)} (precision {self.acc.mixed_precision}); "
                f"stopped, and {kept}; try a lower --lr, --clip-grad, or --precision no"
            )

    def newest_checkpoint(self, prefix: str) -> str:
        ckpts = checkpoint_dirs(self.run)
        return f"{prefix}{ckpts[-1]}" if ckpts else ""

    def gathered_skipped(self) -> dict[str, str]:
        return self.state.skipped if self.world == 1 else self.gathered(self.state.skipped)

    def gathered(self, part: dict) -> dict:
        """Every rank's dict merged into one (on every rank)."""
        from accelerate.utils import gather_object

        merged = {}
        for one in gather_object([part]):
            merged.update(one)
        return merged

    def agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any: ranks must take the same branch around collectives."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.control)
        return bool(t.item())
