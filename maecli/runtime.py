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
    """Does bf16 beat fp32 here: a GPU with bf16, or a CPU with AMX or AMD's AVX512-BF16 (Zen 4/5)?

    Intel's AVX512-BF16 without AMX (e.g. a VM that hides AMX) multiplies bf16 no faster than fp32 and pays
    the conversions: measured a bf16 GEMM at 0.55x fp32 and a ViT-B step at 0.6x (benchmarks/RESULTS.md).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        try:
            if cpu._is_amx_tile_supported():
                return True
            return bool(cpu._is_avx512_bf16_supported()) and cpu_vendor() == "AuthenticAMD"
        except (AttributeError, RuntimeError):
            return False
    return False


def cpu_vendor() -> str:
    """The x86 vendor string ("GenuineIntel", "AuthenticAMD"), or "" where it cannot be read."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    proc = platform.processor()  # e.g. "AMD64 Family 25 Model 97 Stepping 2, AuthenticAMD" on Windows
    return next((v for v in ("AuthenticAMD", "GenuineIntel") if v in proc), "")


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
