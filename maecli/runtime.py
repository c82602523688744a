"""Where and in what precision to run: shared by training and inference."""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """Does bf16 beat fp32 here: a GPU with bf16, or a CPU with AMX or AMD's AVX512-BF16 (Zen 4/5)?

    Intel's AVX512-BF16 without AMX (e.g. a VM that hides AMX) multiplies bf16 no faster than fp32 and pays
    the conversions: measured a bf16 GEMM at 0.55x fp32 and a ViT-B step at 0.6x (benchmarks/RESULTS.md). Even with
    its matmuls on the fp32 GEMM (`cpu_bf16_gemm_in_fp32`) a bf16 step there runs at 0.84-0.87x fp32.
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


def cpu_bf16_gemm_in_fp32() -> bool:
    """Should bf16 matmuls on this CPU run through the fp32 GEMM?

    Yes where bf16 is not native (`native_bf16`): there the bf16 GEMM is the slow one (here, AVX512-BF16 without
    AMX: 150-165 GFLOP/s against fp32's 270-320; elsewhere often worse), and multiplying bf16 values in fp32 gives
    the bf16 GEMM's result: the products of two bf16 numbers are exact in fp32, and both accumulate in fp32 (the
    order of the sums may differ). The casts cost memory traffic, but less than the faster GEMM saves: measured
    1.28x (ViT-Tiny) and 1.49x (ViT-B) faster bf16 training steps here.
    `MAECLI_CPU_BF16_GEMM=native` (or `fp32`) overrides the choice.
    """
    choice = os.environ.get("MAECLI_CPU_BF16_GEMM", "auto").strip().lower()
    if choice in ("native", "fp32"):
        return choice == "fp32"
    return not cpu_native_bf16()


@functools.cache
def cpu_native_bf16() -> bool:
    return native_bf16(torch.device("cpu"))  # reads /proc/cpuinfo: once per process


def bf16_on_fp32_gemm(x: torch.Tensor) -> bool:
    """Should a layer given `x` take the fp32-GEMM bf16 path: CPU bf16 autocast, on a CPU where that pays?"""
    on_cpu = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")  # cheap checks first: the fp32 default
    return on_cpu and torch.get_autocast_dtype("cpu") == torch.bfloat16 and cpu_bf16_gemm_in_fp32()


class _Bf16LinearInFp32(torch.autograd.Function):
    """F.linear as CPU bf16 autocast defines it (inputs, weight and bias rounded to bf16, bf16 out), each GEMM
    run by the fp32 kernel. Saves the bf16 input, as autocast does. Gradients for fp32 operands (the weight, an
    fp32 input) come out of the fp32 GEMM unrounded, where autocast's would be rounded to bf16."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        xb = x.to(torch.bfloat16)
        w = weight.to(torch.bfloat16).float()  # small: kept in fp32 for the backward
        ctx.save_for_backward(xb, w)
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        with torch.autocast("cpu", enabled=False):
            b = None if bias is None else bias.to(torch.bfloat16).float()
            return F.linear(xb.float(), w, b).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        xb, w = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            g = grad.float()
            grad_x = (g @ w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
            g2 = g.reshape(-1, g.shape[-1])
            grad_w = g2.t() @ xb.reshape(-1, xb.shape[-1]).float() if ctx.needs_input_grad[1] else None
            grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def bf16_linear_in_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _Bf16LinearInFp32.apply(x, weight, bias)
