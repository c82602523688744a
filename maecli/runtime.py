"""Where and in what precision the model runs: one precision setting and one way to resolve it, for every command.

torch is imported inside the functions, so the CLI can offer these choices without loading it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from enum import Enum


class Precision(str, Enum):
    auto = "auto"  # bf16 where it is faster than fp32, else fp32
    no = "no"  # fp32
    bf16 = "bf16"
    fp16 = "fp16"


def default_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The x86 vendor string ("GenuineIntel", "AuthenticAMD"), or "" where it cannot be read."""
    import platform

    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    proc = platform.processor()  # e.g. "AMD64 Family 25 Model 97 Stepping 2, AuthenticAMD" on Windows
    return next((v for v in ("AuthenticAMD", "GenuineIntel") if v in proc), "")


def native_bf16(device) -> bool:
    """Does bf16 beat fp32 here: a GPU with bf16, or a CPU with AMX or AMD's AVX512-BF16 (Zen 4 and later)?

    Intel's AVX512-BF16 without AMX multiplies bf16 no faster than fp32 and pays for the conversions on top
    (benchmarks/RESULTS.md has the numbers).
    """
    import torch

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


def resolve_precision(precision: str | Precision, device=None) -> str:
    """auto|no|bf16|fp16 -> Accelerate's mixed_precision string: "no", "bf16" or "fp16".

    `auto` is bf16 where it is native (`native_bf16`), else fp32. An explicit bf16 on a CPU where it is slower
    than fp32 is honoured, with one warning.
    """
    precision = Precision(precision).value
    device = device or default_device()
    if precision == "auto":
        return "bf16" if native_bf16(device) else "no"
    if precision == "bf16" and device.type == "cpu" and not native_bf16(device):
        warnings.warn(
            "bf16 was asked for, but this CPU has no fast bf16 matrix units (AMX, or AMD's AVX512-BF16): "
            "expect it to run slower than --precision no"
        )
    return precision


def autocast(device, precision: str):
    """A context that runs the model in a resolved precision ("no", "bf16", "fp16") on `device`."""
    import torch

    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def fused_attention_pays(device, precision: str) -> bool:
    """Whether timm's fused attention (scaled_dot_product_attention) is the faster choice for training.

    It is on GPUs and in fp32; on a CPU in bf16 its backward runs slower than plain matmul-softmax attention.
    """
    return not (device.type == "cpu" and precision == "bf16")


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_processes() -> int:
    """How many processes `accelerate launch` or torchrun started on this machine (1 when run directly)."""
    launched = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, int(launched)) if launched.isdigit() else 1


def default_workers() -> int:
    """Image decoding processes for this process: on a small CPU box the model needs the cores; on a GPU box, feed it.

    The cores are shared among the processes launched on this machine. A GPU wants every core but one (one
    worker decodes a few hundred small JPEGs a second, far fewer camera photos); 16 bounds the memory their
    prefetched batches hold.
    """
    import torch

    share = max(1, cpu_count() // local_processes())
    if torch.cuda.is_available():
        return max(1, min(16, share - 1))
    return 1 if share <= 4 else min(4, share // 4)
