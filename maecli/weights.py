"""Weights on disk: maecli's `model.safetensors` (+ the run's `config.json`), and `load`, which reads those and other
people's MAE and ViT weights too (their layouts are converted by formats.py).

The model config also travels inside the safetensors header, so a lone weights file still loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import formats, hub
from .errors import UsageError, UserError, WeightsError
from .files import atomic_write, write_json
from .model import MAE, MAEConfig
from .rundir import CONFIG_NAME, WEIGHTS_NAME, regular_file

# What a folder may hold, in order of preference: maecli and transformers write the first.
FOLDER_WEIGHTS = (WEIGHTS_NAME, "model.safetensors.index.json", "pytorch_model.bin")


def write_config(run: Path, cfg: MAEConfig, train: dict, **sections) -> None:
    """RUN/config.json: {"model": the MAEConfig, "train": the command's arguments, ...}: enough to rebuild, resume."""
    write_json(Path(run) / CONFIG_NAME, {"model": cfg.to_dict(), "train": train, **sections})


def state_dict_for_saving(model: MAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}


def sort_metadata(path) -> None:
    """Rewrite a safetensors header with its metadata keys in sorted order.

    safetensors writes metadata in hash order, which changes from process to process, so equal weights
    would give files with different bytes (and checksums). Reordering keeps the header's length, so it
    is rewritten in place; were it ever spelled longer, the file is left as written (still valid).
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:
            f.seek(8)
            f.write(text + b" " * (n - len(text)))  # safetensors pads its header with spaces too


def save_weights(model: MAE, path: Path) -> None:
    """model.safetensors with the config in its header; atomic, and the same bytes for the same weights."""
    meta = {"format": "pt", "maecli_config": json.dumps(model.cfg.to_dict())}
    tensors = state_dict_for_saving(model)

    def write(tmp):
        save_file(tensors, tmp, metadata=meta)
        sort_metadata(tmp)

    atomic_write(Path(path), write)


def _gist(error: Exception) -> str:
    """The first sentence of a library's error message, to quote in ours."""
    lines = str(error).strip().splitlines()
    return lines[0].split(". ")[0] if lines else type(error).__name__


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({_gist(e)})") from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch .pth/.bin, unpickled by torch's weights-only unpickler: tensors and plain values, never code."""
    import argparse
    import pickle

    _check_records(path)
    try:
        # The release's training checkpoints carry their argparse settings; a Namespace only holds values.
        allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        wanted = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if wanted:
            raise WeightsError(
                f"refused {path}: its pickle asks for {wanted.group(1)}, which could run code; maecli reads .pth "
                f"files only with torch.load(weights_only=True), and nothing in the file was run"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", message)
        raise WeightsError(
            f"{path} is not a PyTorch checkpoint of plain tensors ({detail.group(1) if detail else 'unreadable'}); "
            f"maecli reads .pth files only with torch.load(weights_only=True)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise WeightsError(
            f"{path} is not a readable PyTorch checkpoint, truncated or corrupted? ({_gist(e)})"
        ) from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):  # {"model": ...} is the release's layout
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not state:
        raise WeightsError(
            f"{path} holds no tensors (expected a state dict, or {{'model': state dict}} as the "
            f"original MAE release saves)"
        )
    if all(k.startswith("module.") for k in state):  # saved from inside a DistributedDataParallel wrapper
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _check_records(path: Path) -> None:
    """Refuse a torch.save zip whose records claim far more bytes than the file holds, before reading any: torch
    would inflate them in memory first (a few MB can claim GBs). torch.save stores records uncompressed."""
    import zipfile

    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            claimed = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a zip (a bare pickle), or a broken one: torch.load says what is wrong
    if claimed > 8 * size + (1 << 20):
        raise WeightsError(
            f"refused {path}: its records claim {claimed / 2**20:.0f} MiB uncompressed, "
            f"{claimed / max(size, 1):.0f} times the file's {size / 2**20:.1f} MiB (a zip bomb?); "
            f"torch.save files are stored uncompressed"
        )


def _is_safetensors(path: Path) -> bool:
    """By name, or by content: 8 bytes of header length, then the JSON header."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and safetensors metadata from a .safetensors file, a sharded Hugging Face index or a .pth/.bin."""
    path = Path(path)
    if path.name.endswith(".safetensors.index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, OSError, KeyError, AttributeError) as e:
            raise WeightsError(f"{path} is not a readable safetensors index ({e})") from None
        state = {}
        for shard in shards:
            state.update(_read_safetensors(path.parent / shard)[0])
        return state, {}
    if _is_safetensors(path):
        return _read_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip, or a bare pickle
        raise WeightsError(f"{path} is not a weights file (expected .safetensors, or a PyTorch .pth/.bin checkpoint)")
    return _read_pickle(path), {}


def resolve(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """A run or Hugging Face folder, a weights file, or a Hub id (hf-hub:ORG/NAME[@REVISION], fetched into the
    Hub's cache) -> (weights file, the config.json beside it or None)."""
    if hub.is_hub_id(path):
        return hub.fetch(path)
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights not found: {path}")
    if path.is_dir():
        weights = next((path / name for name in FOLDER_WEIGHTS if (path / name).exists()), None)
        if weights is None:
            raise WeightsError(f"{path} holds no {WEIGHTS_NAME}; is it a maecli run or a Hugging Face model folder?")
    else:
        weights = path
    try:
        regular_file(weights)  # a FIFO would block the read forever
    except UserError as e:
        raise WeightsError(f"weights {e}") from None
    cfg = weights.parent / CONFIG_NAME
    return weights, cfg if cfg.exists() else None


def read_config(path: Path | None, strict: bool = False) -> dict:
    """The config.json beside weights as a dict; {} where there is none. A file that is not a JSON object is {}
    too, or with `strict` a WeightsError: what it would have said (heads, eps, the loss target) must not be
    silently replaced by defaults."""
    if path is None:
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
        if strict:
            raise WeightsError(
                f"{path} is not readable JSON ({e}); fix it, or remove it if the weights file says "
                f"all (a maecli model.safetensors does)"
            ) from None
        return {}
    if not isinstance(config, dict):
        if strict:
            raise WeightsError(f"{path} holds a JSON {type(config).__name__}, not an object of settings")
        return {}
    return config


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or inf (a run that diverged): they would load and compute NaN without a word.
    Names the first such tensor, in the file's own names."""
    for name, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise WeightsError(
                f"{source}: tensor {name} holds NaN or inf; these weights cannot be used (from a run "
                f"that diverged? its earlier checkpoints may be fine)"
            )


def model_from_state(state: dict[str, torch.Tensor], cfg: MAEConfig, source: str) -> MAE:
    """Build an MAE for `cfg` and load `state` strictly; encoder-only states build an encoder-only model."""
    has_decoder = any(k.startswith("decoder_") or k == "mask_token" for k in state)
    with torch.device("meta"):  # shapes only: the weights come from `state`, so skip initializing (1-3 s at ViT-B/L)
        model = MAE(cfg, decoder=has_decoder)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"{source} does not match the MAE architecture "
            f"({len(missing)} missing tensors, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise WeightsError(
                f"{source}: tensor {k} has shape {tuple(v.shape)}, the config expects {tuple(expected[k].shape)}"
            )
        if expected[k].is_floating_point() and not v.is_floating_point():
            raise WeightsError(
                f"{source}: tensor {k} holds {str(v.dtype).removeprefix('torch.')} values; weights "
                f"must be floating point (float32, float16 or bfloat16)"
            )
    model.load_state_dict(_owned(state), strict=True, assign=True)
    return model.eval()


def _owned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as fp32 parameters can own: each in its own contiguous memory, none a view of a file or
    of another tensor (training goes on to update them in place)."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.float() if v.is_floating_point() else v
        storage = v.untyped_storage()
        if not v.is_contiguous() or storage.nbytes() != v.nbytes or storage.data_ptr() in seen:
            v = v.clone(memory_format=torch.contiguous_format)
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def load(
    path: str | os.PathLike,
    *,
    model_hint: str | None = None,
    num_heads: int | None = None,
    img_size: int | None = None,
) -> MAE:
    """Rebuild an MAE from any weights maecli reads; every command loads through here.

    Accepts a maecli run folder or its model.safetensors; an original MAE release .pth ({"model": ...}, with or
    without the decoder); a timm ViT state dict (.safetensors or .pth); a Hugging Face ViTMAE folder; and any of
    these folders published on the Hugging Face Hub, by id: "hf-hub:facebook/vit-mae-base",
    "hf-hub:timm/vit_base_patch16_224.mae", "hf-hub:ORG/NAME@REVISION" (see hub.py).
    `model_hint` (a preset name) or `num_heads` gives the heads where the file does not say and the width is not a
    released size. `img_size` rebuilds the position embeddings for another input size, with a warning.
    Weights without a decoder give a model with `has_decoder` False.
    """
    weights, config_path = resolve(path)
    state, meta = read_tensors(weights)
    source = f"{os.fspath(path)} ({weights.name})" if hub.is_hub_id(path) else str(weights)
    check_finite(state, source)
    config = read_config(config_path, strict=True)
    if num_heads is None and "architecture" in config:  # a timm config.json, as timm's push_to_hub writes it
        num_heads = formats.timm_heads(config, source)
    cfg_dict = config.get("model") if isinstance(config.get("model"), dict) else None
    if cfg_dict is None and "maecli_config" in meta:
        try:
            cfg_dict = json.loads(meta["maecli_config"])
        except json.JSONDecodeError:
            raise WeightsError(f"{weights}: the maecli config in its header is not valid JSON") from None
    if cfg_dict is not None:
        try:
            cfg = MAEConfig.from_dict(cfg_dict)
        except (TypeError, ValueError, AttributeError) as e:
            raise WeightsError(f"{weights}: invalid model config ({e})") from None
        if "head.weight" in state:  # a `maecli finetune` classifier: its encoder, as for a timm classifier
            state = formats.clean_original(state, source)
    elif formats.is_hf_layout(state):
        if config.get("model_type", "vit_mae") not in ("vit_mae", "vit"):
            raise WeightsError(
                f"{config_path} is a {config['model_type']!r} config, not a ViTMAE or ViT one; the "
                f"weights beside it cannot be read with it"
            )
        hf = formats.hf_settings(config, source)
        state = formats.from_hf(state, source)
        heads = hf.pop("num_heads") or num_heads
        cfg = formats.infer_config(state, source, num_heads=heads, model_hint=model_hint, **hf)
        cfg = formats.with_hf_pixels(cfg, config, source)
    else:
        state = formats.clean_original(state, source)
        cfg = formats.infer_config(state, source, num_heads=num_heads, model_hint=model_hint)
    model = model_from_state(state, cfg, source)
    if img_size is not None and img_size != cfg.img_size:
        model = resize_input(model, img_size)
    return model


def resize_input(model: MAE, img_size: int) -> MAE:
    """The same weights for `img_size`-pixel inputs: position embeddings rebuilt for the new grid, with a warning."""
    cfg = model.cfg
    try:
        new_cfg = replace(cfg, img_size=img_size)
    except ValueError as e:  # a size the patch grid cannot take: the user's setting, not the weights
        raise UsageError(f"--img-size {img_size}: {e}") from None
    state = model.state_dict()
    state["pos_embed"], how = formats.resize_pos_embed(state["pos_embed"], new_cfg.grid)
    if model.has_decoder:
        state["decoder_pos_embed"], _ = formats.resize_pos_embed(state["decoder_pos_embed"], new_cfg.grid)
    warnings.warn(
        f"position embeddings resized from {cfg.grid}x{cfg.grid} to {new_cfg.grid}x{new_cfg.grid} patches ({how}): "
        f"the model was trained on {cfg.img_size}-pixel images and is used on {img_size}-pixel ones"
    )
    resized = MAE(new_cfg, decoder=model.has_decoder)
    resized.load_state_dict(state, strict=True)
    return resized.eval()
