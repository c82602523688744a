"""`maecli info`: what a run folder or a weights file is, where a run stands, and what it has left on disk.

A run is read, never loaded, and without importing torch: config.json, metrics.jsonl, the checkpoints' state.json
and the safetensors headers (file names from rundir). Anything else is handed to `maecli.load`, to show what it
infers. Unknown keys are ignored, so runs from newer or other commands (finetune) still answer.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from pathlib import Path

from .console import clock, plural
from .errors import UserError
from .plot import NOT_PLOTTED, finite_number, metric_series, metrics_file
from .presets import PRESETS
from .rundir import (
    CHECKPOINT_FILES,
    CHECKPOINT_PATTERN,
    CHECKPOINTS_DIR,
    CONFIG_NAME,
    METRICS_NAME,
    STATE_NAME,
    WEIGHTS_NAME,
    read_json_object,
    read_metrics,
    regular_file,
)

# Rows of each kind read from metrics.jsonl (up to twice as many): a longer file is read as an even spread of its
# rows, each kind's last one kept, so a huge file answers in seconds; a best value may then fall between them.
INFO_ROWS = 5000
# What a data folder's images are, as data.find_images counts them (data.py imports torch; info must not).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# ----------------------------------------------------------------------------------------------
# Small readers


def _read_json(path: Path) -> tuple[dict | None, str | None]:
    """(the JSON object in `path`, None), or (None, a note saying why not); a missing file is (None, None).
    Only a regular file is opened: a FIFO would wait for a writer forever."""
    try:
        return read_json_object(path), None
    except UserError as e:
        return None, str(e)


def _whole(value) -> int | None:
    """`value` if it is a whole number of at least 0 (a count, a step), else None: a hand-edited or damaged file
    may hold anything where a count belongs."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def safetensors_header(path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """({tensor name: shape}, metadata) from a .safetensors header, without reading the tensors.

    The format: an 8-byte little-endian header length, then that many bytes of JSON.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000 or n > path.stat().st_size - 8:
            raise ValueError("not a safetensors header")
        try:
            header = json.loads(f.read(n))
        except RecursionError:
            raise ValueError("not a safetensors header: nested too deep") from None
    if not isinstance(header, dict):
        raise TypeError("not a safetensors header")
    meta = header.pop("__metadata__", None)
    meta = meta if isinstance(meta, dict) else {}
    shapes = {k: v["shape"] for k, v in header.items() if isinstance(v, dict) and "shape" in v}
    if not all(isinstance(shape, list) and all(_whole(d) is not None for d in shape) for shape in shapes.values()):
        raise ValueError("not a safetensors header: a shape is not a list of sizes")
    return shapes, meta


def _is_decoder(name: str) -> bool:
    return name.startswith("decoder_") or name == "mask_token"


def _is_encoder(name: str) -> bool:
    return name.split(".")[0] in ("patch_embed", "cls_token", "pos_embed", "blocks", "norm")


def parameter_counts(shapes: dict[str, list[int]]) -> dict[str, int]:
    """Numbers of values in the encoder, the decoder, anything else (a classifier head) and in all."""
    counts = {"encoder": 0, "decoder": 0, "other": 0}
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        counts["decoder" if _is_decoder(name) else "encoder" if _is_encoder(name) else "other"] += n
    counts["total"] = sum(counts.values())
    return counts


def preset_name(cfg: dict) -> str | None:
    """The named size whose width, depth and heads these are, or None for a custom one."""
    for name, p in PRESETS.items():
        if (p.embed_dim, p.depth, p.num_heads) == (cfg.get("embed_dim"), cfg.get("depth"), cfg.get("num_heads")):
            return name
    return None


def _model_summary(cfg: dict, shapes: dict[str, list[int]] | None) -> dict:
    """The model part of an answer: the config, its preset name, decoder or not, parameter counts.

    Without `shapes` (no weights written yet, in the run or its checkpoints) whether it has a decoder and how many
    parameters are None: building the model to count them would import torch, and a damaged config (a depth of a
    million) would take as long as it liked.
    """
    return {
        "preset": preset_name(cfg),
        "config": cfg,
        "has_decoder": any(_is_decoder(k) for k in shapes) if shapes else None,
        "parameters": parameter_counts(shapes) if shapes else None,
    }


def _statistics(cfg: dict | None) -> dict | None:
    """The data statistics a model records (stats.measure's, in MAEConfig's names): in_chans, units, the per-band
    mean and std it normalizes with, the files' bands it reads (None: all). None for a model from before they were
    recorded (ImageNet's) or a config that does not hold them as numbers."""
    if not cfg:
        return None
    mean, std, bands = (cfg.get(name) for name in ("mean", "std", "bands"))
    if not (_numbers(mean) and _numbers(std)):
        return None
    return {
        "in_chans": len(mean),
        "units": cfg.get("units") if isinstance(cfg.get("units"), str) else None,
        "mean": list(mean),
        "std": list(std),
        "bands": list(bands) if _numbers(bands) else None,
    }


def _numbers(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(finite_number(v) is not None for v in value)


# ----------------------------------------------------------------------------------------------
# Runs


def _checkpoints(run: Path) -> list[dict]:
    """Every folder in RUN/checkpoints, oldest step first; `.tmp-*` ones are saves cut short."""
    root = run / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if not p.is_dir():
            continue
        entry = {
            "name": p.name,
            "path": str(p),
            "bytes": _tree_bytes(p),
            "step": None,
            "complete": False,
            "resumable": False,
        }
        if p.name.startswith(".tmp-"):
            entry["why"] = "an unfinished save (a temporary folder)"
        elif match := CHECKPOINT_PATTERN.fullmatch(p.name):
            entry["step"] = int(match.group(1))
            missing = [f for f in CHECKPOINT_FILES if not (p / f).is_file()]
            state, note = _read_json(p / STATE_NAME)
            entry["complete"] = not missing
            entry["resumable"] = not missing and isinstance(state, dict) and isinstance(state.get("step"), int)
            if missing:
                entry["why"] = f"missing {', '.join(missing)}"
            elif not entry["resumable"]:
                entry["why"] = note or "state.json does not say its step"
        else:
            entry["why"] = "not a checkpoint folder"
        found.append(entry)
    return sorted(found, key=lambda e: (e["step"] is None, e["step"] or 0, e["name"]))


def _metrics_summary(rows: list[dict], recipe: dict, schedule: dict) -> dict:
    """For each series (loss, lr, knn_top1, val_top1, ...): the last value, and for all but lr the best one
    (lowest for a loss, highest otherwise) with the step and epoch it was logged at. For lr: the highest logged so
    far (not the schedule's peak, which a run in warmup has not reached; with log_every the logged steps may miss
    it), and the schedule's peak as config.json planned it (older runs: only where the recipe set lr itself)."""
    epoch_at = {}
    for row in rows:
        for name in row:
            epoch_at[(name, row.get("step"))] = finite_number(row.get("epoch"))
    out = {}
    for name, (steps, values) in metric_series(rows).items():
        if name in NOT_PLOTTED:
            continue
        entry = {"last": values[-1], "last_step": steps[-1]}
        if name == "lr":
            highest = max(range(len(values)), key=lambda i: values[i])
            entry.update(highest=values[highest], highest_step=steps[highest])
            entry["schedule_peak"] = finite_number(schedule.get("peak_lr", recipe.get("lr")))
        else:
            pick = min if name.endswith("loss") else max
            best = pick(range(len(values)), key=lambda i: values[i])
            entry.update(best=values[best], best_step=steps[best], best_epoch=epoch_at.get((name, steps[best])))
        out[name] = entry
    return out


def _count_images(data: str) -> int:
    """How many images `data` holds now, by data.find_images's rule: image suffixes, hidden names skipped, a folder
    reached twice through links counted once."""
    root = Path(data)
    if not root.is_dir():
        return 1 if root.is_file() and root.suffix.lower() in IMAGE_SUFFIXES else 0
    count, seen = 0, set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        count += sum(1 for n in filenames if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES)
    return count


def _epoch_at_last_step(rows: list[dict]) -> float | None:
    latest = None
    for row in rows:
        step, epoch = row.get("step"), row.get("epoch")
        if isinstance(step, int) and isinstance(epoch, (int, float)) and (latest is None or step >= latest[0]):
            latest = (step, epoch)
    return latest[1] if latest else None


def _command(config: dict) -> str:
    """ "pretrain" or "finetune": the command config.json says made the run; for a run from before it said so, a
    guess from its sections (a finetune run has a "finetune" section or class names)."""
    command = config.get("command")
    if command in ("pretrain", "finetune"):
        return command
    return "finetune" if isinstance(config.get("finetune"), dict) or "classes" in config else "pretrain"


def _run_recipe(config: dict, command: str) -> dict:
    """The run's recipe: config.json's "finetune" section for a finetune run, its "train" section otherwise."""
    key = "finetune" if command == "finetune" else "train"
    return config.get(key) if isinstance(config.get(key), dict) else {}


def _run_weights(weights: Path, notes: list[str]) -> tuple[dict | None, dict | None, dict]:
    """(the entry for RUN/model.safetensors, its tensor shapes, its header's metadata): the entry is None before the
    run has written its weights, the shapes None when there are none or they cannot be read."""
    if not weights.is_file():
        if weights.exists():
            notes.append(f"{weights} is not a regular file")
        return None, None, {}
    entry = {
        "path": str(weights),
        "bytes": weights.stat().st_size,
        "modified": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(weights.stat().st_mtime)),
    }
    try:
        shapes, meta = safetensors_header(weights)
    except (OSError, ValueError, TypeError) as e:
        notes.append(f"{weights} cannot be read ({e})")
        return entry, None, {}
    entry["tensors"] = len(shapes)
    return entry, shapes, meta


def _newest_checkpoint_header(checkpoints: list[dict]) -> tuple[dict, dict] | None:
    """(tensor shapes, header metadata) of the newest complete checkpoint whose weights can be read, else None."""
    for c in reversed(checkpoints):
        if c["complete"]:
            try:
                return safetensors_header(Path(c["path"]) / WEIGHTS_NAME)
            except (OSError, ValueError, TypeError):
                continue
    return None


def _model_config(config: dict, meta: dict, weights: Path, notes: list[str]) -> dict | None:
    """The model's config: config.json's "model" section, else the one in the weights' header; None if neither."""
    cfg = config.get("model") if isinstance(config.get("model"), dict) else None
    if cfg is None and "maecli_config" in meta:
        try:
            cfg = json.loads(meta["maecli_config"])
        except (TypeError, ValueError, RecursionError):
            notes.append(f"the config in {weights}'s header is not valid JSON")
    return cfg if isinstance(cfg, dict) else None


def _run_classes(config: dict) -> list[str] | None:
    """A finetune run's class names: config.json's "classes", or its "finetune" section's in older runs."""
    classes = config.get("classes")
    if classes is None and isinstance(config.get("finetune"), dict):
        classes = config["finetune"].get("classes")
    return [str(c) for c in classes] if isinstance(classes, list) else None


def _run_rows(run: Path, notes: list[str]) -> list[dict]:
    """The run's metrics rows (about INFO_ROWS of each kind), with a note when lines were damaged or thinned."""
    metrics = read_metrics(metrics_file(run), max_rows=INFO_ROWS)
    if metrics.bad:
        notes.append(f"{metrics_file(run)}: {plural(metrics.bad, 'damaged line')} skipped")
    if metrics.thinned:
        notes.append(
            f"{metrics_file(run)}: {plural(metrics.lines, 'line')}, read as an even spread of rows; a lowest or "
            "best value may fall between them"
        )
    return metrics.rows


def _newest_state(resumable: list[dict]) -> dict:
    """The newest resumable checkpoint's state.json, or {} when there is none."""
    if not resumable:
        return {}
    newest, _ = _read_json(Path(resumable[-1]["path"]) / STATE_NAME)
    return newest if isinstance(newest, dict) else {}


def _data_summary(recipe: dict, state: dict) -> dict | None:
    """The run's data: its path, whether it is still there, and its images now and when the run started."""
    data = recipe.get("data")
    if not isinstance(data, str):
        return None
    exists = Path(data).exists()
    return {
        "path": data,
        "exists": exists,
        "images": _count_images(data) if exists else None,
        "images_at_start": _whole(state.get("images")),
    }


def _last_logged(series: dict, name: str):
    """The latest value of the metric `name` in `series`, or None if it was never logged."""
    return series[name][1][-1] if name in series else None


def _total_steps(state: dict, recipe: dict) -> int | None:
    """The steps the run is to take: as its newest checkpoint's state says, else as its recipe set them."""
    if isinstance(state.get("total_steps"), int):
        return state["total_steps"]
    if isinstance(recipe.get("steps"), int) and recipe["steps"] > 0:
        return recipe["steps"]
    return None


def _epochs(rows: list[dict], state: dict, recipe: dict, step: int, total: int | None) -> tuple:
    """(the epoch the run is at, the epochs it is to run), the latter from the run's own steps per epoch if it can."""
    epoch = _epoch_at_last_step(rows)
    if epoch is None:
        epoch = finite_number(state.get("epoch"))
    epochs = finite_number(recipe.get("epochs"))
    if total and step and isinstance(epoch, (int, float)) and epoch > 0:
        epochs = round(total * epoch / step, 2)  # the steps per epoch as the run counted them
    return epoch, epochs


def _seconds_since_last_write(run: Path, checkpoints: list[dict]) -> float | None:
    """Seconds since the run last wrote its metrics, weights or a checkpoint; None if it wrote none of them."""
    written = [p.stat().st_mtime for p in (run / METRICS_NAME, run / WEIGHTS_NAME, run / CHECKPOINTS_DIR) if p.exists()]
    written += [os.stat(c["path"]).st_mtime for c in checkpoints if os.path.exists(c["path"])]
    return round(time.time() - max(written), 1) if written else None


def _progress(run: Path, recipe: dict, state: dict, rows: list[dict], checkpoints: list[dict]) -> dict:
    """How far the run got: step, epoch, images seen, seconds trained, the newest resumable step, the last write."""
    series = metric_series(rows)  # in step order, a resumed run's repeats resolved
    step = max([steps[-1] for steps, _ in series.values()] + [state.get("step") or 0])
    total = _total_steps(state, recipe)
    epoch, epochs = _epochs(rows, state, recipe, step, total)
    seconds = [s for s in (_last_logged(series, "time"), finite_number(state.get("seconds"))) if s is not None]
    resumable = [c for c in checkpoints if c["resumable"]]
    images_seen = _last_logged(series, "images_seen")
    return {
        "step": step,
        "total_steps": total,
        "epoch": epoch,
        "epochs": epochs,
        "images_seen": images_seen if images_seen is not None else _whole(state.get("images_seen")),
        "seconds": max(seconds, default=None),
        "checkpoint_step": resumable[-1]["step"] if resumable else None,
        "seconds_since_last_write": _seconds_since_last_write(run, checkpoints),
    }


def _run_status(progress: dict, rows: list[dict], checkpoints: list[dict]) -> str:
    """ "finished" once a resumable checkpoint reached the last step, "not started" before any row or checkpoint,
    else "unfinished"."""
    total, checkpoint_step = progress["total_steps"], progress["checkpoint_step"]
    if total is not None and checkpoint_step is not None and checkpoint_step >= total:
        return "finished"
    if not rows and not checkpoints:
        return "not started"
    return "unfinished"


def _run_info(run: Path, config: dict, notes: list[str]) -> dict:
    """Everything run_info says about a run folder, read from its files (torch is never imported)."""
    command = _command(config)
    recipe = _run_recipe(config, command)
    weights = run / WEIGHTS_NAME
    weights_entry, shapes, meta = _run_weights(weights, notes)
    checkpoints = _checkpoints(run)
    if shapes is None:  # no weights handed over yet: the newest checkpoint's have the same tensors
        header = _newest_checkpoint_header(checkpoints)
        if header is not None:
            shapes, meta = header
    cfg = _model_config(config, meta, weights, notes)
    model = _model_summary(cfg, shapes) if cfg is not None else None
    if weights_entry is not None and model is not None:
        weights_entry["has_decoder"] = model["has_decoder"]
    rows = _run_rows(run, notes)
    state = _newest_state([c for c in checkpoints if c["resumable"]])
    progress = _progress(run, recipe, state, rows, checkpoints)
    schedule = config.get("schedule") if isinstance(config.get("schedule"), dict) else {}
    skipped = state.get("skipped")
    info = {  # in the order a reader of --json wants them
        "path": str(run),
        "kind": f"{command} run",
        "command": command,
        "scratch": command == "finetune" and recipe.get("scratch") is True,  # finetune --baseline's own run
        "status": _run_status(progress, rows, checkpoints),
        "model": model,
        "classes": _run_classes(config),
        "data": _data_summary(recipe, state),
        "statistics": _statistics(cfg),
        "recipe": recipe,
        "progress": progress,
        "metrics": _metrics_summary(rows, recipe, schedule),
        "skipped": {str(k): str(v) for k, v in skipped.items()} if isinstance(skipped, dict) else {},
        "checkpoints": checkpoints,
        "weights": weights_entry,
        "notes": notes,
    }
    if info["classes"] is None:
        del info["classes"]  # only a run that names its classes (a finetune run) has the key
    return info


def _is_run(folder: Path, config: dict | None) -> bool:
    if (folder / METRICS_NAME).exists() or (folder / CHECKPOINTS_DIR).is_dir():
        return True
    return isinstance(config, dict) and any(k in config for k in ("train", "finetune", "classes"))


# ----------------------------------------------------------------------------------------------
# Weights that are not a run


def _weights_file(path: Path) -> Path | None:
    from .weights import FOLDER_WEIGHTS

    if path.is_file():
        return path
    return next((path / n for n in FOLDER_WEIGHTS if (path / n).exists()), None)


def _weights_info(path: Path) -> dict:
    """What maecli.load makes of a weights file or a folder that is not a run."""
    from . import load
    from .weights import FOLDER_WEIGHTS

    # maecli.load would open a FIFO or a device and wait on it forever: only regular files go on
    for candidate in (CONFIG_NAME, *FOLDER_WEIGHTS) if path.is_dir() else ():
        regular_file(path / candidate)
    try:
        model = load(path)
    except (UserError, ValueError, OSError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(message) from None
    cfg = model.cfg.to_dict()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    file = _weights_file(path)
    return {
        "path": str(path),
        "kind": "weights",
        "model": {
            "preset": preset_name(cfg),
            "config": cfg,
            "has_decoder": bool(model.has_decoder),
            "parameters": parameter_counts(shapes),
        },
        "statistics": _statistics(cfg),
        "weights": {
            "path": str(file),
            "bytes": _tree_bytes(file),
            "has_decoder": bool(model.has_decoder),
            "tensors": len(shapes),
        }
        if file
        else None,
    }


def _json_safe(value):
    """`value` with every float that is not finite as None: JSON has no NaN or Infinity, and a config.json may hold
    1e999 (read as infinity) where a number belongs."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def run_info(path: str | os.PathLike) -> dict:
    """Everything `maecli info` shows, as a dict that is valid JSON (no NaN or Infinity).

    For a run folder: kind ("pretrain run" or "finetune run"), command ("pretrain" or "finetune", from
    config.json or guessed for older runs), scratch (a finetune --baseline's run from random init), status
    ("finished", "unfinished" or "not started"), model, data, statistics (the data's bands, units, per-band mean and
    std the model normalizes with; None for runs that predate them), recipe, progress, metrics (last and best of each
    series), skipped files, checkpoints, weights, classes (finetune) and notes (files that could not be read,
    damaged lines skipped). For anything else maecli.load reads: kind "weights", the model it infers and the
    weights file. Bad paths raise UserError.
    """
    from .hub import fetch, is_hub_id

    if is_hub_id(path):  # its snapshot folder in the Hub's cache, fetched there if need be
        path = fetch(path)[0].parent
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; give a run folder, a weights file or a Hub id")
    if not path.is_dir():
        regular_file(path)  # a FIFO or a device is refused before anything opens it
    else:
        config, note = _read_json(path / CONFIG_NAME)
        if _is_run(path, config):
            notes = [note] if note else []
            if not (path / CONFIG_NAME).exists():
                notes.append(f"{path} has no {CONFIG_NAME}; the model comes from the weights' header, if any")
            return _json_safe(_run_info(path, config or {}, notes))
    return _json_safe(_weights_info(path))


# ----------------------------------------------------------------------------------------------
# Text

LABEL = 13  # the width of format_info's left column


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _number(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _model_line(model: dict) -> str:
    c = model["config"]
    name = model["preset"] or "custom"
    line = (
        f"{name}: {c.get('embed_dim')} wide, {c.get('depth')} deep, {c.get('num_heads')} heads; "
        f"{c.get('img_size')} px in {c.get('patch_size')} px patches, {c.get('in_chans')} channels"
    )
    if model["has_decoder"]:
        line += f"; decoder {c.get('decoder_dim')} wide, {c.get('decoder_depth')} deep"
    elif model["has_decoder"] is not None:  # None: no weights to tell yet
        line += "; no decoder (embeds, cannot reconstruct)"
    p = model.get("parameters")
    if p:
        parts = [f"{_count(p['encoder'])} encoder"]
        if p["decoder"]:
            parts.append(f"{_count(p['decoder'])} decoder")
        if p["other"]:
            parts.append(f"{_count(p['other'])} other")
        line += f"\n{'':{LABEL + 2}}{_count(p['total'])} parameters ({' + '.join(parts)})"
    return line


def _recipe_line(r: dict) -> str:
    """The recipe's numbers in a line; a setting that is not a number where one belongs is left out."""
    parts = []
    steps, epochs = _whole(r.get("steps")), finite_number(r.get("epochs"))
    if steps:
        parts.append(plural(steps, "step"))
    elif epochs is not None:
        parts.append(f"{_number(epochs)} epoch" + ("" if epochs == 1 else "s"))
    batch, accum = _whole(r.get("batch_size")), _whole(r.get("accum_iter")) or 1
    if batch is not None:
        parts.append(f"batch {batch}" + (f" x {accum} accumulated" if accum > 1 else ""))
    for key in ("lr", "blr"):
        if finite_number(r.get(key)) is not None:
            parts.append(f"{key} {_number(r[key])}")
            break
    for key, label in (
        ("mask", "mask"),
        ("warmup_epochs", "warmup epochs"),
        ("weight_decay", "weight decay"),
        ("seed", "seed"),
    ):
        if finite_number(r.get(key)) is not None:
            parts.append(f"{label} {_number(r[key])}")
    return ", ".join(parts)


def _row(label: str, text: str) -> str:
    """One line of format_info: `label` in the left column, then `text`."""
    return f"  {label:<{LABEL}}{text}".rstrip()


def _format_weights(info: dict) -> str:
    """format_info's lines for weights that are not a run: the model and the file."""
    head = f"{info['path']}: weights, "
    head += "with the decoder" if info["model"]["has_decoder"] else "encoder only"
    lines = [head, _row("model", _model_line(info["model"]))]
    if info.get("statistics"):
        lines.append(_row("statistics", _statistics_text(info["statistics"])))
    w = info.get("weights")
    if w:
        lines.append(_row("file", f"{w['path']} ({_size(w['bytes'])}, {plural(w['tensors'], 'tensor')})"))
    return "\n".join(lines)


def _run_head(info: dict) -> str:
    """The first line for a run: its path, its kind and where it stands."""
    status, prog = info["status"], info["progress"]
    head = f"{info['path']}: {info['kind']}" + (" from scratch (a baseline)" if info.get("scratch") else "")
    head += f", {status}"
    if status == "unfinished":
        ago = prog["seconds_since_last_write"]
        head += " (in progress, or stopped" + (f"; last write {clock(ago)} ago)" if ago is not None else ")")
    return head


def _classes_text(classes: list[str]) -> str:
    """How many classes, and the first eight of their names."""
    shown = ", ".join(classes[:8]) + (f", ... ({len(classes) - 8} more)" if len(classes) > 8 else "")
    return f"{len(classes)}: {shown}"


def _data_text(d: dict) -> str:
    """The data folder, with its images now and when the run started, or that it is not found here."""
    if not d["exists"]:
        return f"{d['path']} (not found here)"
    text = f"{d['path']} ({plural(d['images'], 'image')}"
    if d["images_at_start"] is not None and d["images_at_start"] != d["images"]:
        text += f"; {d['images_at_start']} when the run started"
    return text + ")"


def _statistics_text(s: dict) -> str:
    """The bands, their units and the mean and std the model normalizes with (the first eight of each)."""

    def first(values: list) -> str:
        return ", ".join(f"{v:.4g}" for v in values[:8]) + (", ..." if len(values) > 8 else "")

    read = f"bands {','.join(map(str, s['bands']))} of the files" if s["bands"] else "all the files' bands"
    units = f", {s['units']} units" if s["units"] else ""
    return f"{plural(s['in_chans'], 'band')} ({read}){units}; mean {first(s['mean'])}; std {first(s['std'])}"


def _progress_text(prog: dict) -> str:
    """Step, epoch, images seen and training time, as far as the run recorded them."""
    text = f"step {prog['step']}" + (f" of {prog['total_steps']}" if prog["total_steps"] else "")
    if prog["epoch"] is not None:
        text += f", epoch {_number(prog['epoch'])}" + (f" of {_number(prog['epochs'])}" if prog["epochs"] else "")
    if prog["images_seen"] is not None:
        text += f", {plural(prog['images_seen'], 'image')} seen"
    if prog["seconds"] is not None:
        text += f", {clock(prog['seconds'])} of training"
    return text


def _metric_text(name: str, m: dict) -> str:
    """One metric's last value and its best (for lr: its highest, and the schedule's peak)."""
    if name == "lr":
        text = f"last {m['last']:.3g} (step {m['last_step']}), highest logged {m['highest']:.3g}"
        text += f" (step {m['highest_step']})"
        if m["schedule_peak"] is not None:
            text += f"; the schedule's peak {m['schedule_peak']:.3g}"
        return text
    when = f"step {m['best_step']}" + (f", epoch {_number(m['best_epoch'])}" if m["best_epoch"] is not None else "")
    word = "lowest" if name.endswith("loss") else "best"
    return f"last {m['last']:.4f} (step {m['last_step']}), {word} {m['best']:.4f} ({when})"


def _skipped_text(skipped: dict) -> str:
    """How many files the run could not read, and the first three with why."""
    first = list(skipped.items())[:3]
    return (
        f"{plural(len(skipped), 'unreadable file')}: "
        + "; ".join(f"{p} ({why})" for p, why in first)
        + ("; ..." if len(skipped) > 3 else "")
    )


def _checkpoint_lines(checkpoints: list[dict]) -> list[str]:
    """The checkpoints heading, then one line per checkpoint: its size and whether it can be resumed."""
    if not checkpoints:
        return [_row("checkpoints", "none")]
    lines = [_row("checkpoints", "")]
    resumable = [c for c in checkpoints if c["resumable"]]
    for c in checkpoints:
        if c["resumable"]:
            state = "resumable" + (" (newest)" if c is resumable[-1] else "")
        else:
            state = f"incomplete: {c.get('why', 'unusable')}"
        lines.append(f"    {c['name']:<26}{_size(c['bytes']):>10}  {state}")
    return lines


def _run_weights_text(w: dict | None) -> str:
    """The run's weights file, its size and when it was written, or that there are none yet."""
    if not w:
        return "none yet (written at each epoch end)"
    return f"{w['path']} ({_size(w['bytes'])}, written {w['modified']})"


def format_info(info: dict) -> str:
    """A few readable lines from `run_info`'s answer."""
    if info["kind"] == "weights":
        return _format_weights(info)

    prog = info["progress"]
    lines = [_run_head(info)]
    if info["model"]:
        lines.append(_row("model", _model_line(info["model"])))
    if info.get("classes") is not None:
        lines.append(_row("classes", _classes_text(info["classes"])))
    if info["data"]:
        lines.append(_row("data", _data_text(info["data"])))
    if info.get("statistics"):
        lines.append(_row("statistics", _statistics_text(info["statistics"])))
    if info["recipe"]:
        lines.append(_row("recipe", _recipe_line(info["recipe"])))
    lines.append(_row("progress", _progress_text(prog)))
    if info["status"] == "unfinished" and info["command"] == "pretrain" and prog["checkpoint_step"] is not None:
        data = info["recipe"].get("data", "DATA")
        resume = f"maecli pretrain {data} --out {info['path']} --resume"
        lines.append(_row("", f"resumes from step {prog['checkpoint_step']}: {resume}"))
    lines += [_row(name, _metric_text(name, m)) for name, m in info["metrics"].items()]
    if info["skipped"]:
        lines.append(_row("skipped", _skipped_text(info["skipped"])))
    lines += _checkpoint_lines(info["checkpoints"])
    lines.append(_row("weights", _run_weights_text(info["weights"])))
    lines += [f"  note: {note}" for note in info["notes"]]
    return "\n".join(lines)
