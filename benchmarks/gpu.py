#!/usr/bin/env python
"""On a CUDA GPU: ViT-B/16 MAE at 224 px, batch 256, bf16, maecli against transformers; MFU; the loader per core.

`python benchmarks/gpu.py [--quick]`. Images/s of the training step on both sides (same input and mask noise),
model FLOPs utilization against the GPU's nominal dense bf16 peak and against a bf16 GEMM timed in the same
rounds, and how many images one CPU core decodes and crops per second (the loader's ceiling per worker). Without
a CUDA device it says so and exits; `--device cpu` runs the same code on the tiny config, to check it anywhere.
"""

from __future__ import annotations

import harness as H

H.act_like_the_cli()  # no-op on a GPU machine, as for the CLI

import torch  # noqa: E402

NOMINAL_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense tensor-core peaks, found in the name


def synced(fn, device: torch.device):
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def step_rates(device: torch.device, rounds: int) -> dict:
    name, batch, n = ("base", 256, 8192) if device.type == "cuda" else ("tiny", 64, 1024)
    model, cfg, _ = H.tiny_or_base(name)
    imgs, noise = H.inputs(cfg, 8)
    flops_per_image = H.step_flops(model, imgs, noise) / 8  # counted on the CPU: the same arithmetic anywhere
    model = model.to(device)
    imgs, noise = (t.to(device) for t in H.inputs(cfg, batch))
    contenders = {
        "gemm bf16": synced(H.gemm(torch.bfloat16, n, device.type), device),
        "maecli": synced(
            H.maecli_step(model, H.optimizer_for(model, device), imgs, noise, "bf16", device.type), device
        ),
    }
    if H.have("transformers"):
        contenders["transformers"] = synced(
            H.hf_step(H.hf_model(cfg).to(device), imgs, noise, "bf16", device.type), device
        )
    t = H.interleaved(contenders, rounds, warmup=2)
    peak = 2 * n**3 / H.median(t["gemm bf16"])
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    nominal = next((v * 1e12 for key, v in NOMINAL_BF16_TFLOPS.items() if key in gpu), None)
    out = {
        "device": gpu,
        "config": name,
        "batch": batch,
        "rounds": rounds,
        "gflop_per_image": flops_per_image / 1e9,
        "bf16_gemm_tflop_s": peak / 1e12,
        "sides": {},
    }
    for side in ("maecli", "transformers"):
        if side in t:
            rate = batch / H.median(t[side])
            out["sides"][side] = {
                "img_s": rate,
                "mfu_vs_gemm": rate * flops_per_image / peak,
                "mfu": rate * flops_per_image / nominal if nominal else None,
            }
    if "transformers" in t:
        out["vs_transformers"] = H.speedups(t, "maecli", "transformers")
    return out


def read_batches(ds, n: int, batch: int = 64) -> None:
    """Items 0..n-1 of a PretrainDataset as the DataLoader reads them: a micro-batch per __getitems__ call."""
    for b in range(0, n, batch):
        ds.__getitems__([(0, i) for i in range(b, min(b + batch, n))])


def loader_per_core(rounds: int) -> dict:
    """Images/s one core decodes and crops to 224 px, a micro-batch per call as the DataLoader reads them."""
    from maecli import data as D

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loader worker runs one thread
    out = {}
    try:
        for rel in ("flowers-160/train", "photos"):
            root = H.data_dir(rel, f"loader on {rel}")
            if root is None:
                continue
            paths = D.find_images(root)[:200]
            ds = D.PretrainDataset(paths, 224, 3, 0)

            t = H.interleaved({"read": lambda ds=ds, n=len(paths): read_batches(ds, n)}, rounds)
            out[rel] = len(paths) / H.median(t["read"])
    finally:
        torch.set_num_threads(threads)
    return out


def main(argv=None):
    ap = H.options(__doc__)
    ap.add_argument("--device", default=None, help="cuda (default, where there is one) or cpu (the tiny config)")
    opts = ap.parse_args(argv)
    info = H.header("gpu")
    if opts.device is None and not torch.cuda.is_available():
        H.console.print("gpu: skipped: no GPU (no CUDA device); `--device cpu` runs the same code on the tiny config")
        return H.finish(opts, {"gpu": "skipped: no GPU"}, info)
    device = torch.device(opts.device or "cuda")
    rounds = opts.rounds or (3 if opts.quick else 10)
    res = step_rates(device, rounds)
    sides = res["sides"]
    H.show(
        f"training step on {res['device']}: {res['config']}, batch {res['batch']}, bf16, {rounds} rounds; "
        f"{res['gflop_per_image']:.1f} GFLOP per image, bf16 GEMM {res['bf16_gemm_tflop_s']:.1f} TFLOP/s",
        ["side", "img/s", "MFU (nominal peak)", "MFU (measured GEMM)", "maecli / transformers"],
        [
            [
                side,
                f"{s['img_s']:.1f}",
                H.fmt(s["mfu"] and 100 * s["mfu"], ".0f", "%"),
                f"{100 * s['mfu_vs_gemm']:.0f}%",
                H.ratio_cell(res.get("vs_transformers", [])) if side == "maecli" else "",
            ]
            for side, s in sides.items()
        ],
    )
    loader = loader_per_core(2 if opts.quick else 3)
    H.show(
        "loader per CPU core (decode + crop + flip + normalize to 224 px), images/s",
        ["data", "img/s per core"],
        [[rel, f"{rate:.0f}"] for rel, rate in loader.items()],
    )
    H.finish(opts, {"gpu": res, "loader_img_s_per_core": loader}, info)


if __name__ == "__main__":
    main()
