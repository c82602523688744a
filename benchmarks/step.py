#!/usr/bin/env python
"""Training step (forward, backward, AdamW) images/s: maecli against transformers' ViTMAEForPreTraining.

`python benchmarks/step.py [--quick]`. tiny: 64 px, patch 8, ViT-Tiny encoder, decoder 128 x 4, batch 64; base
(not with --quick): ViT-B/16 at 224, decoder 512 x 8, batch 8. Each in fp32 and bf16 autocast, with the same
input and mask noise on both sides. The GEMM columns time an n^3 matmul in the same rounds: the peak a step's
matmuls can reach in that precision. Without transformers its columns are left out.
"""

from __future__ import annotations

import harness as H

H.act_like_the_cli()

import torch  # noqa: E402


def measure(name: str, quick: bool, rounds: int | None, with_hf: bool) -> list[dict]:
    model, cfg, batch = H.tiny_or_base(name)
    imgs, noise = H.inputs(cfg, batch)
    flops = H.step_flops(model, imgs, noise)
    n = 1024 if quick else 2048
    contenders = {"gemm fp32": H.gemm(torch.float32, n), "gemm bf16": H.gemm(torch.bfloat16, n)}
    optimizer = H.optimizer_for(model, torch.device("cpu"))
    for prec in ("fp32", "bf16"):
        contenders[f"maecli {prec}"] = H.maecli_step(model, optimizer, imgs, noise, prec)
    if with_hf:
        hf = H.hf_model(cfg)
        for prec in ("fp32", "bf16"):
            contenders[f"transformers {prec}"] = H.hf_step(hf, imgs, noise, prec)
    rounds = rounds or (3 if quick or name == "base" else 7)
    t = H.interleaved(contenders, rounds)
    rows = []
    for prec in ("fp32", "bf16"):
        peak = 2 * n**3 / H.median(t[f"gemm {prec}"])
        ours = batch / H.median(t[f"maecli {prec}"])
        row = {
            "config": name,
            "precision": prec,
            "batch": batch,
            "rounds": rounds,
            "maecli_img_s": ours,
            "step_gflop": flops / 1e9,
            "maecli_gflop_s": flops * ours / batch / 1e9,
            "gemm_peak_gflop_s": peak / 1e9,
        }
        if with_hf:
            row["transformers_img_s"] = batch / H.median(t[f"transformers {prec}"])
            row["vs_transformers"] = H.speedups(t, f"maecli {prec}", f"transformers {prec}")
        rows.append(row)
    return rows


def main(argv=None):
    opts = H.options(__doc__).parse_args(argv)
    info = H.header("step")
    with_hf = H.have("transformers")
    rows = [
        r
        for name in (["tiny"] if opts.quick else ["tiny", "base"])
        for r in measure(name, opts.quick, opts.rounds, with_hf)
    ]
    H.show(
        "training step (fwd + bwd + AdamW), images/s; ratio: maecli / transformers per round, median (range)"
        + ("" if with_hf else " [transformers not installed: its columns skipped]"),
        [
            "config",
            "precision",
            "batch",
            "rounds",
            "maecli",
            "transformers",
            "ratio",
            "GFLOP/step",
            "maecli GFLOP/s",
            "GEMM peak GFLOP/s",
            "% of peak",
        ],
        [
            [
                r["config"],
                r["precision"],
                str(r["batch"]),
                str(r["rounds"]),
                f"{r['maecli_img_s']:.1f}",
                H.fmt(r.get("transformers_img_s")),
                H.ratio_cell(r.get("vs_transformers", [])),
                f"{r['step_gflop']:.1f}",
                f"{r['maecli_gflop_s']:.0f}",
                f"{r['gemm_peak_gflop_s']:.0f}",
                f"{100 * r['maecli_gflop_s'] / r['gemm_peak_gflop_s']:.0f}%",
            ]
            for r in rows
        ],
    )
    H.finish(opts, {"step": rows}, info)


if __name__ == "__main__":
    main()
