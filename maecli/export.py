"""Export: any weights `load` reads, written for timm (the encoder as a ViT state dict) or for Hugging Face
transformers (a ViTMAE folder, with a model card for the Hub), each with the Python that loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import hub, rundir
from .classifier import POOLS as CLASSIFIER_POOLS
from .classifier import classifier_info, load_classifier, save_classifier
from .errors import UsageError, UserError
from .files import atomic_write, write_bytes, write_json
from .formats import HF_PIXELS, hf_config, to_hf
from .model import MAE, MAEConfig
from .presets import PRESETS
from .weights import load, read_config, resolve, state_dict_for_saving

CARD_NAME = "README.md"
CARD_TAGS = ("mae", "masked-autoencoder", "vision", "maecli")


def encoder_state(model: MAE) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict_for_saving(model).items() if not k.startswith(("decoder_", "mask_token"))}


def preset_name(cfg: MAEConfig) -> str | None:
    """The named size whose encoder width, depth and heads these are; None for another size."""
    dims = (cfg.embed_dim, cfg.depth, cfg.num_heads)
    return next((name for name, p in PRESETS.items() if (p.embed_dim, p.depth, p.num_heads) == dims), None)


def timm_create_call(cfg: MAEConfig, num_classes: int = 0, global_pool: str | None = None) -> str:
    """The `timm.create_model(...)` call that builds an encoder (or, given classes, a classifier) these weights load
    into with strict=True."""
    preset = PRESETS[preset_name(cfg) or "vit-base"]
    base = dict(
        embed_dim=preset.embed_dim,
        depth=preset.depth,
        num_heads=preset.num_heads,
        mlp_ratio=4.0,
        patch_size=preset.patch_size,
        img_size=224,
        in_chans=3,
    )
    ours = dict(
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        patch_size=cfg.patch_size,
        img_size=cfg.img_size,
        in_chans=cfg.in_chans,
    )
    kwargs = "".join(f", {k}={v!r}" for k, v in ours.items() if v != base[k])
    pool = f", global_pool={global_pool!r}" if global_pool is not None else ""
    return f"timm.create_model('{preset.timm_name}', num_classes={num_classes}{pool}{kwargs})"


def export_timm(model: MAE, out: Path) -> str:
    """The encoder as a timm ViT state dict in one safetensors file; returns Python that loads it."""
    meta = {"format": "pt", "maecli_config": json.dumps(model.cfg.to_dict())}
    tensors = encoder_state(model)
    atomic_write(Path(out), lambda tmp: save_file(tensors, tmp, metadata=meta))
    lines = [
        "import timm, safetensors.torch",
        f"model = {timm_create_call(model.cfg)}",
        f"model.load_state_dict(safetensors.torch.load_file({str(out)!r}))",
    ]
    if model.cfg.norm_eps != 1e-6:
        lines.append(
            f"# timm's LayerNorm eps is 1e-6; these weights used {model.cfg.norm_eps:g} (a negligible difference)"
        )
    return "\n".join(lines)


def export_hf(model: MAE, out: Path, mask_ratio: float = 0.75, record: dict | None = None) -> str:
    """A transformers folder (config.json + model.safetensors) with a model card for the Hub (README.md, from
    `record`, what the run recorded: see run_record); ViTMAEForPreTraining when the model has a decoder, else
    ViTMAEModel. Returns Python that loads it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoder_only = not model.has_decoder
    config = hf_config(model.cfg, encoder_only=encoder_only, mask_ratio=mask_ratio)
    tensors = to_hf(encoder_state(model) if encoder_only else state_dict_for_saving(model), encoder_only)
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(out / "config.json", config)
    cls = config["architectures"][0]
    write_bytes(out / CARD_NAME, model_card(model, cls, mask_ratio, record or {}).encode())
    return f"from transformers import {cls}\nmodel = {cls}.from_pretrained({str(out)!r})"


def trained_mask_ratio(path) -> float:
    """The mask ratio the weights were trained with where their folder says (maecli run, transformers config)."""
    config = read_config(resolve(path)[1])
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    ratio = train.get("mask", config.get("mask_ratio"))
    return float(ratio) if isinstance(ratio, (int, float)) and 0 < ratio < 1 else 0.75


def export(source, out, fmt: str, *, model_hint: str | None = None) -> str:
    """Load any weights `load` reads and write them for timm or transformers (fmt "timm" or "hf").

    Returns Python that loads the result.
    """
    check_apart(source, out)
    if fmt == "timm":
        if classifier_info(source) is not None:  # a fine-tuned run: the whole classifier, head included
            return export_timm_classifier(source, out)
    model = load(source, model_hint=model_hint)
    if fmt == "timm":
        return export_timm(model, out)
    if fmt == "hf":
        return export_hf(model, out, mask_ratio=trained_mask_ratio(source), record=run_record(source))
    raise ValueError(f"unknown export format {fmt!r}; choose timm or hf")


def check_apart(source, out) -> None:
    """The output may not be the input, hold it, or (for a run folder) lie inside it: writing it would replace or
    mix with what it is read from, and --overwrite would delete the run."""
    if hub.is_hub_id(source):
        return
    src, dst = Path(source).resolve(), Path(out).resolve()
    if dst == src or dst in src.parents:
        raise UsageError(f"{out} holds the weights being exported ({source}); choose an OUT outside it")
    if src.is_dir() and src in dst.parents:
        raise UsageError(f"{out} lies inside {source}, the run being exported; choose an OUT outside it")


def export_timm_classifier(source, out: Path) -> str:
    """The classifier as a timm state dict in one safetensors file; returns Python that loads it strictly."""
    model, classes = load_classifier(source)
    save_classifier(model, classes, out)
    lines = [
        "import timm, safetensors.torch",
        f"model = {timm_create_call(model.cfg, num_classes=len(classes), global_pool=CLASSIFIER_POOLS[model.pooling])}",
        f"model.load_state_dict(safetensors.torch.load_file({str(out)!r}))",
        f"classes = {classes!r}",
    ]
    if model.cfg.norm_eps != 1e-6:
        lines.append(
            f"# timm's LayerNorm eps is 1e-6; these weights used {model.cfg.norm_eps:g} (a negligible difference)"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The model card: README.md with the Hub's metadata block


def run_record(source) -> dict:
    """What the run behind `source` recorded, for its model card; the image counts, never the paths.

    {"command": "pretrain" | "finetune", "recipe": its arguments, "images", "steps", "total_steps", "epoch",
    "knn_top1", "val_top1" (the last logged), "best_epoch", "best_top1" (finetune's per_class.json), ...};
    {"from": id} for a Hub id with no run; {} for other weights. A damaged file is left out, never raised.
    """
    _, config_path = resolve(source)
    record = {"from": str(source)} if hub.is_hub_id(source) else {}
    config = _json_object(config_path) if config_path is not None else None
    command = next((c for c in ("train", "finetune") if isinstance((config or {}).get(c), dict)), None)
    if command is None:
        return record
    run = config_path.parent
    record.update(command="pretrain" if command == "train" else "finetune", recipe=config[command])
    if command == "finetune":
        data = config.get("data") if isinstance(config.get("data"), dict) else {}
        record.update(
            images=_whole_or_none(data.get("train_images")),
            val_images=_whole_or_none(data.get("val_images")),
            classes=len(config["classes"]) if isinstance(config.get("classes"), list) else None,
        )
        per_class = _json_object(run / rundir.PER_CLASS_NAME) or {}
        rows = per_class.get("classes") if isinstance(per_class.get("classes"), list) else []
        counts = [(r.get("correct"), r.get("images")) for r in rows if isinstance(r, dict)]
        counts = [(right, n) for right, n in counts if _is_whole(right) and _is_whole(n)]
        if sum(n for _, n in counts):
            best = sum(right for right, _ in counts) / sum(n for _, n in counts)
            record.update(best_epoch=_whole_or_none(per_class.get("best_epoch")), best_top1=best)
    state = _latest_state(run)
    if record.get("images") is None:
        record["images"] = _whole_or_none(state.get("images"))
    for key in ("total_steps", "processes", "step"):
        record[key] = _whole_or_none(state.get(key))
    try:
        rows = rundir.read_metrics(run).rows
    except UserError:
        rows = []
    for row in rows:  # the last value of each: the file is in step order
        if "loss" in row:  # a training row; probe and validation rows name their epoch by its number
            record.update(steps=row["step"], epoch=row.get("epoch"))
        for key in ("knn_top1", "val_top1"):
            if _is_number(row.get(key)):
                record[key] = row[key]
    if record.get("steps") is None:
        record["steps"] = record["step"]
    return record


def _is_whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _whole_or_none(x) -> int | None:
    return x if _is_whole(x) else None


def _json_object(path: Path) -> dict | None:
    try:
        return rundir.read_json_object(path)
    except UserError:
        return None


def _latest_state(run: Path) -> dict:
    """The state.json of the run's latest checkpoint: the image count and the planned steps; {} where none."""
    steps = []
    folder = run / rundir.CHECKPOINTS_DIR
    if folder.is_dir():
        for entry in folder.iterdir():
            m = rundir.CHECKPOINT_PATTERN.fullmatch(entry.name)
            if m:
                steps.append((int(m.group(1)), entry))
    for _, entry in sorted(steps, reverse=True):
        state = _json_object(entry / rundir.STATE_NAME)
        if state is not None:
            return state
    return {}


MAE_CITATION = """@article{he2021mae,
  title   = {Masked Autoencoders Are Scalable Vision Learners},
  author  = {Kaiming He and Xinlei Chen and Saining Xie and Yanghao Li and Piotr Doll{\\'a}r and Ross Girshick},
  journal = {arXiv:2111.06377},
  year    = {2021}
}"""


def model_card(model: MAE, architecture: str, mask_ratio: float, record: dict) -> str:
    """README.md for the Hub: the metadata block (license left for the user), what the model is, how it was trained
    and how well it probed, how to load it, and the MAE paper to cite."""
    cfg = model.cfg
    name = preset_name(cfg)
    decoder = (
        f"its decoder ({cfg.decoder_dim} wide, {_blocks(cfg.decoder_depth)}), so it also reconstructs masked images"
        if model.has_decoder
        else "no decoder: the encoder only, for features and fine-tuning"
    )
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-feature-extraction",
        "tags:",
        *[f"- {tag}" for tag in CARD_TAGS],
        "# license: choose one (e.g. apache-2.0, mit, cc-by-nc-4.0) that fits your weights and your training data",
        "---",
        "",
        f"# Masked Autoencoder, {name or 'ViT'} at {cfg.img_size} px",
        "",
        f"A Masked Autoencoder (He et al., 2021) trained with maecli. The encoder is {name or 'a ViT'} "
        f"({cfg.embed_dim} wide, {_blocks(cfg.depth)}, {cfg.num_heads} heads) on {cfg.img_size} px images in "
        f"{cfg.patch_size} px patches ({cfg.num_patches} patches, {cfg.in_chans} channels), with {decoder}. "
        f"The folder is in transformers' ViTMAE layout (`{architecture}`).",
        "",
        *_input_lines(cfg),
        "## Training",
        "",
        *_training_lines(cfg, mask_ratio, record),
        "## How to load",
        "",
        "Replace `YOU/NAME` with this repository's id.",
        "",
        "```python",
        "import maecli",
        "",
        'model = maecli.load("hf-hub:YOU/NAME")',
        "features = model.encode(images)  # (N, 1 + L, D): the cls token, then one token per patch",
        "```",
        "",
        "or `maecli embed photos/ -w hf-hub:YOU/NAME > embeddings.jsonl` on the command line, and with transformers:",
        "",
        "```python",
        f"from transformers import {architecture}",
        "",
        f'model = {architecture}.from_pretrained("YOU/NAME")',
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        MAE_CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


def _input_lines(cfg: MAEConfig) -> list[str]:
    """The model card's account of what the inputs are normalized with, where the model records it."""
    if cfg.mean is None:
        return []
    units = "0-255" if cfg.units == "8-bit" else "the files' own units (16-bit counts, floats, ...)"
    read = f"bands {','.join(map(str, cfg.bands))} of the files, in that order" if cfg.bands else "every band"
    return [
        "## Inputs",
        "",
        f"{read.capitalize()}, in {units}, each normalized as (x - mean) / std with these (config.json's "
        f"`{HF_PIXELS}`, which `maecli.load` reads; transformers' image processors do not):",
        "",
        "| channel | mean | std |",
        "|---|---|---|",
        *[f"| {i} | {m:.6g} | {s:.6g} |" for i, (m, s) in enumerate(zip(cfg.mean, cfg.std), 1)],
        "",
    ]


def _training_lines(cfg: MAEConfig, mask_ratio: float, record: dict) -> list[str]:
    """The model card's account of how the weights were trained: a sentence, a settings table and the results."""
    if "command" not in record:
        origin = f"`{record['from']}`" if "from" in record else "other weights"
        return [f"Converted by `maecli export` from {origin}; no training record came with them.", ""]
    out = [_training_sentence(record)]
    out += ["", "| setting | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in _card_settings(cfg, mask_ratio, record) if v is not None]
    out.append("")
    results = _card_results(record)
    if results:
        out += ["## Results", "", *[f"- {r}" for r in results], ""]
    return out


def _training_sentence(record: dict) -> str:
    """One sentence on the command that trained the weights, on how many images, and for how many steps."""
    if record["command"] == "finetune":
        data = f"{_count(record.get('images'))} training images"
        if record.get("val_images") is not None:
            data += f", {_count(record['val_images'])} validation images"
        if record.get("classes"):
            data += f", {record['classes']} classes"
        said = f"Fine-tuned with `maecli finetune` (the classifier head is not in this folder) on {data}"
    else:
        said = f"Pretrained with `maecli pretrain` on {_count(record.get('images'))} images"
    if record.get("steps") is not None:
        said += f" for {record['steps']:,} steps"
        if record.get("total_steps") not in (None, record["steps"]):
            said += f" of {record['total_steps']:,}"
        if _is_number(record.get("epoch")):
            said += f" ({record['epoch']:.4g} epochs)"
    return said + "."


def _learning_rate(recipe: dict, effective: int | None) -> str | None:
    """The recipe's learning rate as the card shows it: lr itself, or blr scaled by the effective batch."""
    lr, blr = recipe.get("lr"), recipe.get("blr")
    if _is_number(lr):
        return f"{lr:g}"
    if _is_number(blr):
        return f"{blr * effective / 256:.3g} ({blr:g} x {effective} / 256)" if effective else f"{blr:g} x batch / 256"
    return None


def _card_settings(cfg: MAEConfig, mask_ratio: float, record: dict) -> list[tuple[str, object]]:
    """The rows of the card's settings table, as (setting, value); a value of None is a row the card leaves out."""
    recipe = record["recipe"]
    finetuned = record["command"] == "finetune"
    batch = recipe.get("batch_size")
    accum, processes = recipe.get("accum_iter") or 1, record.get("processes") or 1
    effective = batch * accum * processes if isinstance(batch, int) and isinstance(accum, int) else None
    rows = [
        ("model", preset_name(cfg) or f"custom: {cfg.embed_dim} wide, {cfg.depth} blocks, {cfg.num_heads} heads"),
        ("image size, patch", f"{cfg.img_size} px, {cfg.patch_size} px"),
        ("mask ratio", f"{mask_ratio:g}" if not finetuned else None),
        ("norm-pix loss", ("yes" if cfg.norm_pix_loss else "no") if not finetuned else None),
        ("epochs", recipe.get("epochs") if recipe.get("steps") is None else None),
        ("steps", recipe.get("steps")),
        ("batch", f"{batch} per step" + (f", {effective} effective" if effective not in (None, batch) else "")),
        ("learning rate", _learning_rate(recipe, effective)),
        ("warmup epochs", recipe.get("warmup_epochs")),
        ("weight decay", recipe.get("weight_decay")),
        ("layer decay", recipe.get("layer_decay") if finetuned else None),
        ("labels used", _fraction(recipe) if finetuned else None),
        ("seed", recipe.get("seed")),
    ]
    init = recipe.get("init_from") if not finetuned else recipe.get("weights")
    if init:
        rows.append(("started from", f"`{init}`" if hub.is_hub_id(init) else "other weights"))
    return rows


def _card_results(record: dict) -> list[str]:
    """The scores the run recorded at its end: kNN top-1 for pretraining, validation top-1 for fine-tuning."""
    results = []
    if record.get("knn_top1") is not None:
        results.append(f"kNN top-1 on the run's probe folder, at the end: {record['knn_top1']:.1%}")
    if record.get("val_top1") is not None:
        results.append(f"validation top-1 at the end: {record['val_top1']:.1%}")
    if record.get("best_top1") is not None:
        results.append(f"validation top-1 at the best epoch ({record.get('best_epoch')}): {record['best_top1']:.1%}")
    return results


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _blocks(n: int) -> str:
    return f"{n} block{'s' if n != 1 else ''}"


def _count(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "an unrecorded number of"


def _fraction(recipe: dict) -> str | None:
    if recipe.get("fraction") is not None:
        return f"{recipe['fraction']:.0%} of each class"
    if recipe.get("per_class") is not None:
        return f"{recipe['per_class']} per class"
    return None
