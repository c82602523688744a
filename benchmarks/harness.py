"""What every benchmark file shares: interleaved rounds and their ratios, the machine's description, the real CLI in
a subprocess, the data folders, the model step as `maecli pretrain` runs it, FLOP counting, and the tables.

Every comparison alternates its contenders round by round (A B, B A, A B, ...): load from other processes on the
machine then falls on both sides alike. Its result is the ratio within each round, reported as the median and the
spread over rounds; absolute images/s move with the machine's load.

torch is imported inside the functions: a file that runs the model in-process calls `act_like_the_cli()` first,
which must happen before torch loads.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]  # this checkout
DATA = ROOT.parent / "shared" / "data"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

console = Console(highlight=False, width=max(180, Console().width))  # tables whole when piped to a file

# name: (MAEConfig fields, batch size). tiny: ViT-Tiny width at 64 px in 8 px patches with the 128 x 4 decoder
# (vit-tiny's defaults at 64 px); base: ViT-B/16 at 224 with the paper's 512 x 8 decoder.
CONFIGS = {
    "tiny": (
        dict(
            img_size=64,
            patch_size=8,
            embed_dim=192,
            depth=12,
            num_heads=3,
            decoder_dim=128,
            decoder_depth=4,
            decoder_heads=4,
        ),
        64,
    ),
    "base": (
        dict(
            img_size=224,
            patch_size=16,
            embed_dim=768,
            depth=12,
            num_heads=12,
            decoder_dim=512,
            decoder_depth=8,
            decoder_heads=16,
        ),
        8,
    ),
}
# The same tiny model as `maecli pretrain` flags, spelled out so that every checkout trains the same shapes
TINY_FLAGS = [
    "--model",
    "vit-tiny",
    "--img-size",
    "64",
    "--patch-size",
    "8",
    "--decoder-dim",
    "128",
    "--decoder-depth",
    "4",
    "--decoder-heads",
    "4",
    "--batch-size",
    "64",
]


# ----------------------------------------------------------------------------------------------
# Rounds and ratios


def interleaved(contenders: dict[str, Callable], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each contender, alternating them round by round (ABBA order)."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    for r in range(rounds):
        order = list(contenders.items())
        if r % 2:
            order.reverse()  # neither side always runs in the other's wake (caches, clocks, neighbours)
        for name, fn in order:
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def speedups(times: dict[str, list[float]], a: str, b: str) -> list[float]:
    """How many times faster `a` ran than `b` in each round (b's time / a's time): load shifts between rounds
    cancel out, where a ratio of two medians would mix rounds taken under different loads."""
    return [tb / ta for ta, tb in zip(times[a], times[b])]


def ratio_cell(ratios: list[float], spec: str = ".2f") -> str:
    """`1.04 (0.98-1.07)`: the median of per-round ratios and their range."""
    if not ratios:
        return "-"
    if len(ratios) == 1:
        return f"{ratios[0]:{spec}}"
    return f"{median(ratios):{spec}} ({min(ratios):{spec}}-{max(ratios):{spec}})"


def fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


# ----------------------------------------------------------------------------------------------
# The machine


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def machine() -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": cores(),
        "load": load(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    if "torch" in sys.modules:  # only where the model runs in this process; `torch` alone costs a second
        import torch

        info |= {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
            "amx": torch.cpu._is_amx_tile_supported(),
        }
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    return info


def header(title: str) -> dict:
    """Print what ran where: the CPU, the load average (1, 5, 15 min), torch and its threads, OpenMP's waiting."""
    m = machine()
    extra = ""
    if "torch" in m:
        omp = os.environ.get("OMP_WAIT_POLICY") or f"spin {os.environ.get('GOMP_SPINCOUNT', 'default')}"
        extra = (
            f", torch {m['torch']} ({m['threads']} threads, OpenMP waits: {omp}; AVX512-BF16 "
            f"{'yes' if m['avx512_bf16'] else 'no'}, AMX {'yes' if m['amx'] else 'no'})"
        )
    console.print(f"[bold]{title}[/]: {m['date']}, {m['cpu']}, {m['cores']} cores, load {m['load']}{extra}")
    return m


def act_like_the_cli() -> bool:
    """Give this process the settings a `maecli` command gives itself on a CPU (maecli/host.py): OpenMP's wait
    policy, chosen before torch loads, and a heap that keeps freed memory. So a model step timed here runs as it
    does under `maecli pretrain`, and both sides of a comparison share them. Returns whether the heap is kept."""
    from maecli import host

    if "torch" in sys.modules:
        raise RuntimeError("act_like_the_cli() must run before torch is imported")
    host.configure_openmp()
    return False if host.gpu_present() else host.keep_freed_memory()


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ----------------------------------------------------------------------------------------------
# The real CLI, in a subprocess


def clean_env(checkout: Path = ROOT) -> dict:
    """This environment minus the settings a `maecli` command chooses for itself (so it chooses them as it would
    when a user starts it), with `checkout` first on the import path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "GLIBC_TUNABLES", "PYTHONPATH")
        and not k.startswith(("MALLOC_", "MAECLI_"))
    }
    env["PYTHONPATH"] = str(checkout)
    return env


class Finished:
    """A finished CLI run: wall seconds, peak resident memory (MB) of it and its loader workers, output."""

    def __init__(self, seconds: float, max_rss_mb: float, stdout: str, stderr: str):
        self.seconds, self.max_rss_mb, self.stdout, self.stderr = seconds, max_rss_mb, stdout, stderr


def run_cli(args: list, checkout: Path = ROOT, stdin: Path | None = None, timeout: float = 900) -> Finished:
    """`python -m maecli ARGS` from `checkout` (its own code and its own defaults); raises with its stderr on
    failure. cwd matters: `python -m maecli` imports the maecli folder in the working directory first."""
    import tempfile

    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        open(stdin, "rb") if stdin else contextlib.nullcontext(subprocess.DEVNULL) as inp,
    ):
        t = time.perf_counter()
        p = subprocess.Popen(
            [sys.executable, "-m", "maecli", *map(str, args)],
            cwd=checkout,
            env=clean_env(checkout),
            stdin=inp,
            stdout=out,
            stderr=err,
        )
        try:
            _, status, usage = os.wait4(p.pid, 0)  # its rusage: the peak of it and the children it waited for
        except BaseException:
            p.kill()
            raise
        seconds = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if p.returncode:
        raise RuntimeError(
            f"maecli {' '.join(map(str, args[:2]))} ... exited with {p.returncode} "
            f"(in {checkout}): {stderr.strip()[-800:]}"
        )
    return Finished(seconds, usage.ru_maxrss / 1024, stdout, stderr)


def metrics_rate(run: Path) -> float:
    """Images/s between the first and the last logged row of a run's metrics.jsonl: the first logged interval,
    which holds start-up (loader workers forking, first batches), is left out."""
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "images_seen" in r]
    if len(rows) < 2:
        raise RuntimeError(f"{run}: fewer than two logged steps in metrics.jsonl")
    return (rows[-1]["images_seen"] - rows[0]["images_seen"]) / (rows[-1]["time"] - rows[0]["time"])


# ----------------------------------------------------------------------------------------------
# Data


def data_dir(rel: str, title: str) -> Path | None:
    """../shared/data/REL, or None after printing why `title` is skipped."""
    path = DATA / rel
    if not path.is_dir():
        console.print(f"{title}: skipped: {path} is absent")
        return None
    return path


# ----------------------------------------------------------------------------------------------
# The model's training step, as `maecli pretrain` runs it


def tiny_or_base(name: str):
    """(model, config, batch) for CONFIGS[name], seeded."""
    import torch

    from maecli.model import MAE, MAEConfig

    fields, batch = CONFIGS[name]
    cfg = MAEConfig(**fields)
    torch.manual_seed(0)
    return MAE(cfg), cfg, batch


def inputs(cfg, batch: int):
    """Images and mask noise, the same for every contender."""
    import torch

    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g),
        torch.rand(batch, cfg.num_patches, generator=g),
    )


def autocast(precision: str, device: str = "cpu"):
    """ "bf16": bf16 autocast (what Accelerate's mixed_precision="bf16" runs); anything else fp32."""
    import torch

    return torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def optimizer_for(model, device):
    """maecli's AdamW: fused, betas (0.9, 0.95), no decay on norms, biases, tokens and positions."""
    from maecli.model import no_weight_decay_groups
    from maecli.train.loop import make_optimizer

    return make_optimizer(no_weight_decay_groups(model, 0.05), 1e-4, device, betas=(0.9, 0.95))


def train_step(optimizer, loss_fn: Callable, precision: str, device: str = "cpu", before: Callable | None = None):
    """One training step as a callable: loss_fn() under autocast, backward, optimizer step, gradients to None."""

    def step():
        if before is not None:
            before()
        with autocast(precision, device):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def maecli_step(model, optimizer, imgs, noise, precision: str, device: str = "cpu"):
    """`maecli pretrain`'s step: the attention kernel the trainer picks for this device and precision, the model's
    loss under autocast, backward, fused AdamW."""
    import torch

    from maecli.runtime import fused_attention_pays

    fused = fused_attention_pays(torch.device(device), "bf16" if precision == "bf16" else "no")
    return train_step(
        optimizer,
        lambda: model(imgs, 0.75, noise)[0],
        precision,
        device,
        before=lambda: model.set_fused_attention(fused),
    )


def hf_model(cfg):
    """transformers' ViTMAEForPreTraining with maecli's shapes and layer-norm eps (1e-6; its default is 1e-12);
    its own defaults otherwise (SDPA attention)."""
    import torch
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    hcfg = ViTMAEConfig(
        hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),
        image_size=cfg.img_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.in_chans,
        decoder_hidden_size=cfg.decoder_dim,
        decoder_num_hidden_layers=cfg.decoder_depth,
        decoder_num_attention_heads=cfg.decoder_heads,
        decoder_intermediate_size=int(cfg.decoder_dim * cfg.mlp_ratio),
        mask_ratio=0.75,
        norm_pix_loss=cfg.norm_pix_loss,
        layer_norm_eps=cfg.norm_eps,
        qkv_bias=True,
    )
    torch.manual_seed(0)
    return ViTMAEForPreTraining(hcfg)


def hf_step(model, imgs, noise, precision: str, device: str = "cpu"):
    """A transformers user's step: the same input and mask noise, the same autocast, torch's AdamW with its
    defaults (the for-loop implementation)."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return train_step(optimizer, lambda: model(pixel_values=imgs, noise=noise).loss, precision, device)


def gemm(dtype, n: int, device: str = "cpu"):
    """An n x n x n matmul in `dtype`: the peak the model's GEMMs can hope for (2 n^3 FLOPs per call)."""
    import torch

    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return lambda: a @ b


def counted_flops(fn: Callable) -> float:
    """FLOPs of `fn()` (a forward and the backward it runs), counted by torch (matmuls, convolutions).

    Counted under bf16 autocast, where the CPU runs plain matmul-softmax attention whose matmuls the counter sees;
    the fused kernel does the same arithmetic but is invisible to it.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        fn()
    return float(counter.get_total_flops())


def full_sequence_loss(model, imgs, noise, mask_ratio: float = 0.75):
    """The same MAE step with an encoder that sees every patch (as SimMIM-style models do); same decoder, loss."""
    from maecli.model import random_masking

    latent = model.encode(imgs)  # (N, 1 + L, D)
    _, mask, _ = random_masking(latent[:, 1:], mask_ratio, noise=noise)
    x = model._run(model.decoder_blocks, model.decoder_embed(latent) + model.decoder_pos_embed)
    pred = model.decoder_pred(model.decoder_norm(x))[:, 1:]
    return model.forward_loss(imgs, pred, mask)


def step_flops(model, imgs, noise, full: bool = False) -> float:
    """Forward + backward FLOPs of one training step (the optimizer's are negligible)."""
    model.set_fused_attention(False)

    def fwd_bwd():
        (full_sequence_loss(model, imgs, noise) if full else model(imgs, 0.75, noise)[0]).backward()

    flops = counted_flops(fwd_bwd)
    model.zero_grad(set_to_none=True)
    return flops


# ----------------------------------------------------------------------------------------------
# Command line and output


def options(doc: str, rounds_help: str = "interleaved rounds") -> argparse.ArgumentParser:
    """The flags every benchmark file takes; a file adds its own."""
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller configs and fewer rounds")
    ap.add_argument("--rounds", type=int, default=None, help=rounds_help + " [default: chosen per file]")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    return ap


def show(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def finish(opts, results: dict, machine_info: dict) -> None:
    """Print the load at the end; write JSON where --json asked for it."""
    console.print(f"load at the end: {load()}")
    if opts.json:
        Path(opts.json).write_text(
            json.dumps({"machine": machine_info, "load_after": load(), **results}, indent=1, default=str) + "\n"
        )
        console.print(f"wrote {opts.json}")
