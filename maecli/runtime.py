"""Where and in what precision to run: shared by training and inference."""
from __future__ import annotations

import torch


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """Does this device run bf16 matmuls natively (GPU with bf16, CPU with AVX512-BF16/AMX)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device | None = None) -> str:
    """auto|no|bf16|fp16 -> accelerate's mixed_precision string ("no", "bf16" or "fp16")."""
    if precision != "auto":
        return precision
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return "bf16" if native_bf16(device) else "no"


def autocast(device: torch.device, precision: str):
    """A context that runs the model in the resolved precision on `device` (a no-op for fp32)."""
    import contextlib

    mode = resolve_precision(precision, device)
    if mode == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)
