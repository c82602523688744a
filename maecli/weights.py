"""Weights on disk: the run folder's `model.safetensors` + `config.json`, written atomically, and `load`.

The model config also travels inside the safetensors header, so a lone weights file still loads.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import MAE, MAEConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class WeightsError(ValueError):
    """Weights that cannot be used; the message is one sentence for the user."""


def fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync it, then rename over `path`: readers see the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def state_dict_for_saving(model: MAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}


def save_weights(model: MAE, path: Path) -> None:
    """model.safetensors with the config in its header; atomic."""
    meta = {"format": "pt", "maecli_config": json.dumps(model.cfg.to_dict())}
    tensors = state_dict_for_saving(model)
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None


def resolve(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """A run folder or a weights file -> (weights file, config.json or None)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights not found: {path}")
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.exists():
            raise WeightsError(f"{path} holds no {WEIGHTS_NAME}; is it a maecli run folder?")
        cfg = path / CONFIG_NAME
        return weights, cfg if cfg.exists() else None
    cfg = path.parent / CONFIG_NAME
    return path, cfg if cfg.exists() else None


def model_from_state(state: dict[str, torch.Tensor], cfg: MAEConfig, source: str) -> MAE:
    """Build an MAE for `cfg` and load `state` strictly; encoder-only states build an encoder-only model."""
    has_decoder = any(k.startswith("decoder_") or k == "mask_token" for k in state)
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
    model.load_state_dict(state, strict=True)
    return model.eval()


def load(path: str | os.PathLike) -> MAE:
    """Rebuild an MAE from a maecli run folder or its model.safetensors (config from config.json or header)."""
    weights, cfg_path = resolve(path)
    state, meta = _read_safetensors(weights)
    cfg_dict = None
    if cfg_path is not None:
        try:
            cfg_dict = json.loads(cfg_path.read_text()).get("model")
        except (json.JSONDecodeError, OSError, AttributeError):
            cfg_dict = None
    if cfg_dict is None and "maecli_config" in meta:
        cfg_dict = json.loads(meta["maecli_config"])
    if cfg_dict is None:
        raise WeightsError(f"{weights} carries no maecli config (no config.json beside it, none in its header)")
    try:
        cfg = MAEConfig.from_dict(cfg_dict)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{weights}: invalid model config ({e})") from None
    return model_from_state(state, cfg, str(weights))
