"""Fine-tuning: `finetune(FinetuneArgs)` turns an MAE encoder into a classifier on a labelled folder with the paper's
recipe (timm's RandAugment, random erasing, Mixup/CutMix, label smoothing, layer-wise lr decay, drop path), on the
shared training loop (loop.py), and with `baseline` trains the same recipe from random init beside it.

As in pretraining, every random choice derives from (seed, epoch, index) or (seed, micro-batch), so a resumed run
continues exactly; the best epoch on the validation set is tracked in the resumable state.
"""

from __future__ import annotations

import json
import random
import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .. import data as D
from ..classifier import Classifier, from_encoder, save_classifier
from ..console import console, plural, warn
from ..errors import DataError, UsageError
from ..files import write_json
from ..labelled import Labelled, Split, load_labelled
from ..model import MAE
from ..rundir import BASELINE_DIR, CONFIG_NAME, METRICS_NAME, PER_CLASS_NAME, WEIGHTS_NAME, MetricsLog
from .checkpoint import TrainState
from .run import RunArgs, micro_seed, prepared, start
from .schedule import Schedule


@dataclass(kw_only=True)
class FinetuneArgs(RunArgs):
    """finetune's settings: the shared ones (RunArgs) and the classifier's recipe (the paper's defaults)."""

    command: ClassVar[str] = "finetune"
    may_change: ClassVar[tuple[str, ...]] = (*RunArgs.may_change, "baseline")

    weights: str
    epochs: int = 50
    recipe: str = "auto"  # auto, paper or light (RECIPES): what the settings left as None take
    blr: float | None = None
    warmup_epochs: float | None = None
    crop_scale: float | None = None  # the smallest area of the random resized crop, as a fraction
    val: str | None = None
    val_split: float | None = None
    fraction: float | None = None
    per_class: int | None = None
    img_size: int | None = None  # default: the weights'
    pool: str = "mean"
    min_lr: float = 1e-6
    layer_decay: float = 0.75
    drop_path: float = 0.1
    mixup: float | None = None
    cutmix: float | None = None
    smoothing: float = 0.1
    reprob: float | None = None
    aa: str | None = None
    baseline: bool = False
    scratch: bool = False  # this run starts from random init (the baseline's own run)


# ----------------------------------------------------------------------------------------------
# The recipe: the paper's for long runs, a light one for short ones


# The settings each recipe gives where the user set none. paper: the MAE paper's fine-tuning (Mixup 0.8, CutMix
# 1.0, RandAugment m9, random erasing 0.25, warmup 5 epochs, timm's crop scale 0.08-1). light: none of that
# regularisation, a larger lr, a milder crop (0.35-1: harsh crops of small images leave little object) and
# warmup over 10% of the run; measured better over a few thousand steps or less (docs/finetune.md).
RECIPES = {
    "paper": {"mixup": 0.8, "cutmix": 1.0, "aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "blr": 1e-3,
              "warmup_epochs": 5.0, "crop_scale": 0.08},
    "light": {"mixup": 0.0, "cutmix": 0.0, "aa": "none", "reprob": 0.0, "blr": 5e-3,
              "warmup_epochs": None, "crop_scale": 0.35},
}  # fmt: skip
LIGHT_WARMUP = 0.1  # of the run's steps
PAPER_FROM = 2000  # optimizer steps from which `auto` takes the paper's recipe


def with_recipe(args: FinetuneArgs, train_images: int) -> tuple[FinetuneArgs, str]:
    """`args` with every recipe setting the user left as None filled from its recipe, and a line saying which (and,
    for auto, why). auto: the paper's from PAPER_FROM optimizer steps on, the light one below."""
    import os

    from .run import plan

    world = int(os.environ.get("WORLD_SIZE", "1"))
    _, schedule = plan(replace(args, blr=args.blr or 1.0, warmup_epochs=0.0), train_images, world)
    steps = schedule.total_steps
    name = args.recipe
    if name == "auto":
        name = "paper" if steps >= PAPER_FROM else "light"
    if name not in RECIPES:
        raise UsageError(f"--recipe must be auto, paper or light, got {args.recipe}")
    values = {k: v for k, v in RECIPES[name].items() if getattr(args, k) is None}
    if "warmup_epochs" in values and values["warmup_epochs"] is None:
        values["warmup_epochs"] = round(LIGHT_WARMUP * steps / schedule.steps_per_epoch, 4)
    why = f" (auto: {steps} steps, {'at least' if name == 'paper' else 'under'} {PAPER_FROM})"
    return replace(args, **values), f"recipe {name}{why if args.recipe == 'auto' else ''}"


# ----------------------------------------------------------------------------------------------
# Data: a seeded stratified subset, timm's training transform, seeded per image


def subset(split: Split, classes: list[str], fraction: float | None, per_class: int | None, seed: int) -> Split:
    """A seeded stratified subset of `split`: round(n x fraction), or min(n, per_class), images of each class."""
    if fraction is None and per_class is None:
        return split
    by_class: dict[int, list[str]] = {}
    for path, label in zip(split.paths, split.labels):
        by_class.setdefault(label, []).append(path)
    kept = []
    for label, paths in sorted(by_class.items()):
        n = round(len(paths) * fraction) if fraction is not None else min(len(paths), per_class)
        if n < 1:
            need = 0.5 / len(paths)
            raise DataError(
                f"--fraction {fraction:g} leaves class {classes[label]} ({len(paths)} training images) "
                f"with none; use more than {need:.3g}, or --per-class N"
            )
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
        kept += [(paths[i], label) for i in sorted(order[:n])]
    return Split([p for p, _ in kept], [y for _, y in kept])


def posterize_at_least_one_bit(img, bits_to_keep, **_):
    """timm's posterize for Pillow 13, which refuses 0 bits. RandAugment's `inc1` posterize keeps 4 - 4 x m/10
    bits, so a magnitude drawn at 10 (m9 with mstd0.5 reaches it about 2% of the time) asks for 0; older Pillow
    returned a black image there. One bit, the strongest posterize Pillow now allows, keeps the image."""
    from PIL import ImageOps

    return img if bits_to_keep >= 8 else ImageOps.posterize(img, max(1, int(bits_to_keep)))


RAND_AUGMENT_SECTION = re.compile(r"(m|n|w|mstd|mmax|p)(\d+(\.\d+)?)|inc[01]")


def check_augment(aa: str | None) -> None:
    """timm parses a RandAugment string leniently ("inc" reads as off, m99 goes through): a typo would train with a
    policy the user did not ask for. Each section must be one timm knows, with a value in its range."""
    if not aa or aa.lower() == "none" or not aa.startswith("rand"):
        return
    name, *sections = aa.split("-")
    for section in sections:
        m = RAND_AUGMENT_SECTION.fullmatch(section)
        if name != "rand" or m is None:
            raise UsageError(f"--aa {aa}: {section or name!r} is not a RandAugment setting (e.g. rand-m9-mstd0.5-inc1)")
        if m.group(1) in ("m", "mmax") and float(m.group(2)) > 30:
            raise UsageError(f"--aa {aa}: magnitude {m.group(2)} is out of range (0 to 10, up to 30 with mmax)")


def is_picture(px: D.Pixels) -> bool:
    """8-bit gray or RGB pictures: what RandAugment's colour operations (and PIL) are made for."""
    return px.units == "8-bit" and px.in_chans in (1, 3)


def augment_note(args: FinetuneArgs, px: D.Pixels) -> str:
    """Said once in the start line when --aa's RandAugment is left out."""
    if is_picture(px) or not args.aa or args.aa.lower() == "none":
        return ""
    return f"; RandAugment off ({px.in_chans} bands in {px.units} units: its colour operations are for 8-bit pictures)"


def band_transform(args: FinetuneArgs, img_size: int, px: D.Pixels):
    """For N bands or data in native units, on tensors: pretraining's crop and flip, normalize, random erasing."""
    from timm.data.random_erasing import RandomErasing
    from torchvision.transforms import v2

    steps = list(D.train_transform(img_size, px).transforms)
    if args.reprob > 0:
        steps.append(RandomErasing(args.reprob, mode="pixel", max_count=1, device="cpu"))
    return v2.Compose(steps)


def train_transform(args: FinetuneArgs, img_size: int, in_chans: int | D.Pixels):
    """timm's training transform on PIL images: random resized crop, flip, RandAugment, normalize, random erasing;
    for other data (is_picture), band_transform on tensors, without RandAugment."""
    from timm.data import create_transform

    px = D.Pixels.of(in_chans)
    if not is_picture(px):
        return band_transform(args, img_size, px)
    mean, std = (tuple(v / 255 for v in values) for values in px.norm())  # timm's are for [0, 1] pixels
    aa = args.aa if args.aa and args.aa.lower() != "none" else None
    try:
        transform = create_transform(
            img_size,
            is_training=True,
            auto_augment=aa,
            re_prob=args.reprob,
            re_mode="pixel",
            re_count=1,
            interpolation="bicubic",
            scale=(args.crop_scale, 1.0),
            mean=mean,
            std=std,
        )
    except (AssertionError, ValueError, KeyError) as e:
        raise UsageError(f"--aa {args.aa}: timm cannot build it ({e})") from None
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):  # RandAugment's operations
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = posterize_at_least_one_bit
    return transform


def to_pil(img: torch.Tensor):
    """uint8 (C, H, W) from data.decode -> the PIL image timm's transforms take."""
    from PIL import Image

    arr = img.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


class LabelledTrainSet(D.PretrainDataset):
    """Items are (epoch, index) pairs; returns (image, label, [paths that failed]). PretrainDataset's reading (batch
    at once, an unreadable file replaced by the next readable one, whose label comes along), with timm's transform.
    Every random draw (python's, numpy's, torch's CPU generator) is seeded by (seed, epoch, index)."""

    def __init__(self, paths: list[str], labels: list[int], transform, img_size: int, in_chans, seed: int):
        super().__init__([Path(p) for p in paths], img_size, D.Pixels.of(in_chans), seed)
        self.labels, self.transform = labels, transform

    def __getitems__(self, items: list[tuple[int, int]]) -> list:
        loaded = [self._load(index, first=0, failed=[]) for _, index in items]
        out = []
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                for (epoch, index), (img, attempt, failed) in zip(items, loaded):
                    while True:
                        seed = D.sample_seed(self.seed, epoch, index)
                        random.seed(seed)
                        np.random.seed(seed % 2**32)
                        torch.default_generator.manual_seed(seed)
                        try:
                            x = self.transform(to_pil(img) if is_picture(self.in_chans) else img)
                            break
                        except Exception as e:  # decodes but cannot be transformed: skip it too
                            path = self.paths[(index + attempt) % len(self.paths)]
                            failed.append((str(path), D.describe_error(e, path)))
                            img, attempt, failed = self._load(index, attempt + 1, failed)
                    out.append((x, self.labels[(index + attempt) % len(self.paths)], failed))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return out


def collate(items):
    xs, ys, failed = zip(*items)
    return (torch.stack(xs), torch.tensor(ys, dtype=torch.long)), [f for fs in failed for f in fs]


# ----------------------------------------------------------------------------------------------
# Loss: Mixup/CutMix and label smoothing (timm's), seeded per micro-batch


def classification_loss(args: FinetuneArgs, num_classes: int, rank: int):
    """loss_fn(model, (images, labels), micro) for the Trainer. Mixup's draws (numpy) and drop path's (torch) are
    seeded by (seed, micro-batch, rank), so a resumed run mixes and drops exactly as the uninterrupted one."""
    from timm.data import Mixup
    from timm.data.mixup import mixup_target
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mixing = args.mixup > 0 or args.cutmix > 0
    mixup = (
        Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing, num_classes=num_classes)
        if mixing
        else None
    )
    if mixing:
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    def loss_fn(model, batch, micro: int) -> torch.Tensor:
        x, y = batch
        seed = micro_seed(args.seed, micro, rank) % 2**32
        np.random.seed(seed)
        torch.manual_seed(seed)
        if mixup is not None:
            # Mixup pairs each image with the batch reversed and wants an even batch; an odd last image of an
            # epoch goes in unmixed (with the smoothed target it would get at lam 1).
            even = len(x) - len(x) % 2
            if even:
                mixed, target = mixup(x[:even].clone(), y[:even])
            else:
                mixed, target = x[:0], torch.empty(0, num_classes, device=x.device)
            if even < len(x):
                mixed = torch.cat([mixed, x[even:]])
                target = torch.cat([target, mixup_target(y[even:], num_classes, 1.0, args.smoothing)])
            x, y = mixed, target
        return criterion(model(x).float(), y)

    return loss_fn


# ----------------------------------------------------------------------------------------------
# Validation at each epoch end, and the best epoch


@torch.no_grad()
def evaluate(model, split: Split, num_classes: int, *, batch_size: int = 64, workers: int = 0, on_error=None) -> dict:
    """Top-1, top-5 (None for 5 classes or fewer, where it holds every class), mean cross-entropy and per-class
    correct counts of `model` on `split`, each image whole (data.eval_batches: resized, center-cropped), in fp32
    and eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    cfg = model.cfg
    label_of = dict(zip(split.paths, split.labels))
    k = min(5, num_classes)
    correct1 = correct5 = seen = 0
    loss_sum = 0.0
    per_class = [[0, 0] for _ in range(num_classes)]  # [correct, images]
    try:
        for paths, x in D.eval_batches(
            split.paths,
            cfg.img_size,
            cfg.pixels,
            batch_size=batch_size,
            workers=workers,
            on_error=on_error,
            pin_memory=device.type == "cuda",
        ):
            y = torch.tensor([label_of[p] for p in paths])
            logits = model(x.to(device)).float().cpu()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            top = logits.topk(k, dim=1).indices
            hit1 = top[:, 0] == y
            correct1 += hit1.sum().item()
            correct5 += (top == y[:, None]).any(dim=1).sum().item()
            seen += len(y)
            for label, hit in zip(y.tolist(), hit1.tolist()):
                per_class[label][0] += int(hit)
                per_class[label][1] += 1
    finally:
        model.train(was_training)
    if not seen:
        raise DataError("none of the validation images could be read")
    return {
        "top1": correct1 / seen,
        "top5": correct5 / seen if num_classes > 5 else None,
        "loss": loss_sum / seen,
        "images": seen,
        "per_class": per_class,
    }


class Validation:
    """on_epoch_end for the Trainer: validate, log val_top1/val_top5/val_loss, and write the classifier to
    RUN/model.safetensors when this epoch is the best so far (higher top-1, then lower loss). The best epoch lives
    in state.extra, so it is saved with every later checkpoint."""

    def __init__(self, args: FinetuneArgs, labelled: Labelled, out: Path, state: TrainState, workers: int):
        self.args, self.labelled, self.out, self.state, self.workers = args, labelled, out, state, workers
        self.warned: set[str] = set()
        self.unreadable = 0

    def on_error(self, source, why, missing):
        if source not in self.warned:  # once per file, not once per epoch
            self.warned.add(source)
            self.unreadable += 1
            warn(f"skipped validation image {source}: {why}")

    def __call__(self, epoch: int, step: int, model) -> dict:
        result = evaluate(
            model,
            self.labelled.val,
            len(self.labelled.classes),
            batch_size=self.args.batch_size,
            workers=self.workers,
            on_error=self.on_error,
        )
        best = self.state.extra.get("best")
        if best is None or (result["top1"], -result["loss"]) > (best["top1"], -best["loss"]):
            save_classifier(model, self.labelled.classes, self.out / WEIGHTS_NAME)
            self.state.extra["best"] = {"epoch": epoch, "step": step, **result}
        best_now = self.state.extra["best"]["epoch"] == epoch
        console.print(
            f"epoch {epoch}: val top-1 {result['top1']:.4f}, "
            + ("" if result["top5"] is None else f"top-5 {result['top5']:.4f}, ")
            + f"loss {result['loss']:.4f}"
            + (" (best so far)" if best_now else "")
        )
        row = {"val_top1": round(result["top1"], 6), "val_loss": round(result["loss"], 6)}
        if result["top5"] is not None:
            row["val_top5"] = round(result["top5"], 6)
        return row

    def catch_up(self, schedule: Schedule, model) -> None:
        """On resume from an epoch-end checkpoint: that epoch's validation ran after the checkpoint was written, so
        it is not in the saved state. Run it again (the same weights give the same result) and log it unless the
        killed run already did."""
        st = self.state
        if st.step == 0 or not schedule.is_epoch_end(st.step):
            return
        epoch = schedule.epoch_of(st.step - 1) + 1
        row = self(epoch, st.step, model)
        path = self.out / METRICS_NAME
        logged = path.exists() and any(
            '"val_top1"' in line and json.loads(line).get("step") == st.step
            for line in path.read_text().splitlines()
            if line.strip()
        )
        if not logged:
            log = MetricsLog(self.out)
            log.write({"step": st.step, "epoch": epoch, **row})
            log.close()


# ----------------------------------------------------------------------------------------------
# The command


def finetune(args: FinetuneArgs, given: Iterable[str] = ()) -> dict:
    """Fine-tune `args.weights` on the labelled folder `args.data`, then (with `args.baseline`) the same recipe from
    random init into RUN/baseline. Returns {"finetuned": summary, "baseline": summary or None, "classes"}.

    Raises a maecli UserError for the user before anything is written. With `args.resume`, both runs continue
    from their newest checkpoints; `given` names the settings the caller set explicitly (run.resumed_args).
    """
    args = prepared(args, given)
    out = Path(args.out)
    labelled = load_labelled(args.data, args.val, args.val_split, args.seed)
    labelled = replace(
        labelled, train=subset(labelled.train, labelled.classes, args.fraction, args.per_class, args.seed)
    )
    args, recipe = with_recipe(args, len(labelled.train.paths))
    check_recipe(args)
    if args.resume:
        check_same_classes(out, labelled.classes)
    encoder = load_encoder(args)
    check_readable(labelled, encoder.cfg.pixels)
    finetuned = train_classifier(args, labelled, encoder, out, recipe)
    baseline = None
    if args.baseline and finetuned["signal"] is None:
        base_out = out / BASELINE_DIR
        resume = args.resume and (base_out / CONFIG_NAME).exists()  # killed before the baseline began: start it
        base_args = replace(args, out=str(base_out), resume=resume, overwrite=not resume, baseline=False, scratch=True)
        torch.manual_seed(args.seed)  # the same seeded init the pretraining began from
        scratch = MAE(encoder.cfg, decoder=False)
        baseline = train_classifier(base_args, labelled, scratch, base_out, recipe)
    return {"finetuned": finetuned, "baseline": baseline, "classes": labelled.classes, "labelled": labelled}


def check_recipe(args: FinetuneArgs) -> None:
    if args.pool not in ("mean", "cls"):
        raise UsageError(f"--pool must be mean or cls, got {args.pool}")
    if args.fraction is not None and args.per_class is not None:
        raise UsageError("--fraction and --per-class contradict each other; pick one")
    if args.fraction is not None and not 0 < args.fraction <= 1:
        raise UsageError(f"--fraction must lie in (0, 1], got {args.fraction}")
    if args.per_class is not None and args.per_class < 1:
        raise UsageError(f"--per-class must be at least 1, got {args.per_class}")
    for name in ("mixup", "cutmix", "smoothing", "drop_path", "reprob"):
        value = getattr(args, name)
        if not (0 <= value < 1 if name in ("smoothing", "drop_path") else 0 <= value):
            raise UsageError(f"--{name.replace('_', '-')} {value} is out of range")
    if not 0 < args.layer_decay <= 1:
        raise UsageError(f"--layer-decay must lie in (0, 1], got {args.layer_decay}")
    check_augment(args.aa)


def check_readable(labelled: Labelled, in_chans: int | D.Pixels) -> None:
    """Before any training: every class has a training image that decodes, and the validation set has one. A class
    whose files are all unreadable would be trained as an empty class, and the run would report success."""
    for name, split in (("training", labelled.train), ("validation", labelled.val)):
        by_class: dict[int, list[str]] = {}
        for path, label in zip(split.paths, split.labels):
            by_class.setdefault(label, []).append(path)
        for label, paths in sorted(by_class.items()):
            try:
                D.first_readable(paths, in_chans)
            except DataError:
                raise DataError(
                    f"class {labelled.classes[label]} has no readable {name} image (all {len(paths)} files failed to "
                    f"decode); fix or remove them, or remove the class folder"
                ) from None


def check_same_classes(out: Path, classes: list[str]) -> None:
    """On --resume: the class folders must be the run's (the classifier's outputs are those classes, in order)."""
    from ..rundir import read_json_object

    saved = (read_json_object(out / CONFIG_NAME) or {}).get("classes")
    if not isinstance(saved, list) or saved == classes:
        return
    added, removed = sorted(set(classes) - set(saved)), sorted(set(saved) - set(classes))
    change = "; ".join(
        f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
        for what, names in (("added", added), ("removed", removed))
        if names
    )
    raise DataError(
        f"cannot resume {out}: the classes differ from the run's ({change or 'another order'}); restore the class "
        f"folders to continue it, or fine-tune into a new --out"
    )


def load_encoder(args: FinetuneArgs) -> MAE:
    """The pretrained encoder from any weights maecli.load reads; a ViT that does not fit timm's is refused."""
    from ..weights import load

    return load(args.weights, img_size=args.img_size)


def train_classifier(args: FinetuneArgs, labelled: Labelled, encoder: MAE, out: Path, recipe: str = "") -> dict:
    """One fine-tuning run into `out`: the classifier on `encoder`, trained by the shared loop, validated at each
    epoch end. Returns {"out", "top1", "top5", "loss", "best_epoch", "per_class", "steps", ...}."""
    cfg, classes, train = encoder.cfg, labelled.classes, labelled.train
    torch.manual_seed(args.seed)
    model = from_encoder(encoder, len(classes), args.pool, args.drop_path)
    groups = layer_decay_groups(model, args)
    with start(args, model, groups, train.paths, betas=(0.9, 0.999), min_lr=args.min_lr) as run:
        transform = train_transform(args, cfg.img_size, cfg.pixels)
        dataset = LabelledTrainSet(train.paths, train.labels, transform, cfg.img_size, cfg.pixels, args.seed)
        loader = run.loader(dataset, collate)
        validation = Validation(args, labelled, out, run.state, run.workers)
        if run.main:
            run.write_config(
                cfg.to_dict(),
                classes=classes,
                classifier={"num_classes": len(classes), "pool": args.pool},
                data={
                    "layout": labelled.layout,
                    "train_images": len(train.paths),
                    "val_images": len(labelled.val.paths),
                },
            )
            kind = "from random init (baseline)" if args.scratch else f"from {args.weights}"
            run.announce(
                f"maecli finetune {kind}: {len(train.paths)} training images in {len(classes)} classes, "
                f"{len(labelled.val.paths)} validation images ({labelled.layout}); ViT {cfg.embed_dim}-d x "
                f"{cfg.depth} at {cfg.img_size}px, patch {cfg.patch_size}, {args.pool} pool",
                extra=f", layer decay {args.layer_decay:g}" + augment_note(args, cfg.pixels),
            )
            console.print(recipe_line(args, recipe))
            hint = None if args.scratch else short_run_hint(args, run.schedule.total_steps)
            if hint:
                console.print(hint)
        trainer = run.trainer(
            classification_loss(args, len(classes), run.rank),
            "baseline" if args.scratch else "finetune",
            on_epoch_end=validation,
            model_config=cfg.to_dict(),
            run_info={"classes": len(classes)},
        )
        if run.main and args.resume:
            validation.catch_up(run.schedule, trainer.raw_model)
        summary = run.summary(trainer.fit(loader), out / WEIGHTS_NAME)
    best = run.state.extra.get("best")
    summary.update(
        val_unreadable=validation.unreadable,
        top1=best["top1"] if best else None,
        top5=best["top5"] if best else None,
        loss=best["loss"] if best else None,
        best_epoch=best["epoch"] if best else None,
        per_class=per_class_rows(classes, best["per_class"]) if best else None,
    )
    if run.main and best:
        write_json(out / PER_CLASS_NAME, {"best_epoch": best["epoch"], "classes": summary["per_class"]})
    return summary


def recipe_line(args: FinetuneArgs, recipe: str) -> str:
    """The regularisation the run trains with, in one line."""
    aa = args.aa if args.aa and args.aa.lower() != "none" else "off"
    return (
        f"{recipe or 'recipe'}: mixup {args.mixup:g}, cutmix {args.cutmix:g}, RandAugment {aa}, erasing "
        f"{args.reprob:g}, crop scale {args.crop_scale:g}-1, smoothing {args.smoothing:g}, drop path {args.drop_path:g}"
    )


def short_run_hint(args: FinetuneArgs, total_steps: int) -> str | None:
    """A line of advice when a short run keeps the paper's regularisation, which is made for long ones: measured on
    flowers-160 over 300 steps, it cost the pretrained run 9.5 points of top-1."""
    heavy = args.mixup > 0 or args.cutmix > 0 or (bool(args.aa) and args.aa.lower() != "none") or args.reprob > 0
    if total_steps >= PAPER_FROM or not heavy:
        return None
    return (
        f"hint: {plural(total_steps, 'step')} is a short fine-tuning for the paper's regularisation; on small data "
        f"sets --recipe light does better over a few thousand steps or less (docs/finetune.md)"
    )


def layer_decay_groups(model: Classifier, args: FinetuneArgs) -> list[dict]:
    """timm's layer-wise lr decay groups (each with its lr_scale; the loop applies it): the head at full lr, each
    block below it `layer_decay` times less; no weight decay on biases, norms, tokens and positions."""
    from timm.optim import param_groups_layer_decay

    return param_groups_layer_decay(
        model, args.weight_decay, no_weight_decay_list=model.no_weight_decay(), layer_decay=args.layer_decay
    )


def per_class_rows(classes: list[str], counts: list[list[int]]) -> list[dict]:
    return [
        {"class": c, "correct": right, "images": n, "accuracy": right / n if n else None}
        for c, (right, n) in zip(classes, counts)
    ]


# ----------------------------------------------------------------------------------------------
# The closing report (stderr)


def result_table(result: dict) -> str:
    """Pretrained against scratch, top-1 and top-5 at each run's best epoch; then accuracy per class."""
    runs = [("finetuned", result["finetuned"]), ("scratch", result["baseline"])]
    runs = [(name, r) for name, r in runs if r is not None]

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    five = len(result["classes"]) > 5  # with 5 classes or fewer, top-5 holds every class
    lines = [f"{'':<10} {'top-1':>8} " + (f"{'top-5':>8} " if five else "") + f"{'best epoch':>11}"]
    for name, r in runs:
        top5 = f"{pct(r['top5']):>8} " if five else ""
        lines.append(f"{name:<10} {pct(r['top1']):>8} {top5}{str(r['best_epoch'] or '-'):>11}")
    width = max([len("class")] + [len(c) for c in result["classes"]])
    lines.append("")
    lines.append(f"{'class':<{width}} {'images':>6} " + " ".join(f"{name:>10}" for name, _ in runs))
    for i, c in enumerate(result["classes"]):
        rows = [r["per_class"][i] if r["per_class"] else None for _, r in runs]
        n = next((row["images"] for row in rows if row), 0)
        lines.append(f"{c:<{width}} {n:>6} " + " ".join(f"{pct(row['accuracy'] if row else None):>10}" for row in rows))
    return "\n".join(lines)


def json_summary(result: dict) -> dict:
    def brief(r):
        return None if r is None else {"top1": r["top1"], "top5": r["top5"], "best_epoch": r["best_epoch"]}

    return {
        "finetuned": brief(result["finetuned"]),
        "baseline": brief(result["baseline"]),
        "classes": result["classes"],
    }


def stopped_message(result: dict, args: FinetuneArgs) -> str | None:
    """How to continue a run stopped by a signal, or None."""
    for r in (result["finetuned"], result["baseline"]):
        if r is not None and r["signal"] is not None:
            name = "SIGINT" if r["signal"] == signal.SIGINT else "SIGTERM"
            return (
                f"{name}: stopped at step {r['steps']}/{r['total_steps']} of {r['out']}; checkpoint saved. "
                f"Continue with:\n  maecli finetune {args.data} --weights {args.weights} --out {args.out} --resume"
            )
    return None
