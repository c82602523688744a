#!/usr/bin/env python
"""The encoder on the visible patches only against an encoder on every patch: what masking saves, against the FLOPs.

`python benchmarks/mask.py [--quick]`. The full-sequence step runs the same encoder over all patches (as
SimMIM-style models do) and the same decoder and loss; both forward + backward at mask 0.75, in the precision
`--precision auto` picks here. The speedup should come close to the FLOP ratio; the parts (each encoder alone,
and the decoder plus loss, which both steps share) show where it departs. tiny, and ViT-B/16 unless --quick.
"""

from __future__ import annotations

import harness as H

H.act_like_the_cli()

import torch  # noqa: E402

from maecli.runtime import resolve_precision  # noqa: E402


def measure(name: str, prec: str, rounds: int) -> dict:
    model, cfg, batch = H.tiny_or_base(name)
    imgs, noise = H.inputs(cfg, batch)
    flop_ratio = H.step_flops(model, imgs, noise, full=True) / H.step_flops(model, imgs, noise)

    def backward_of(loss_fn):
        def run():
            with H.autocast(prec):
                loss = loss_fn()
            loss.backward()
            model.zero_grad(set_to_none=True)
            latent.grad = None

        return run

    latent, mask, ids_restore = (t.detach() for t in model.forward_encoder(imgs, 0.75, noise))
    latent.requires_grad_()
    parts = {
        "encoder masked": backward_of(lambda: model.forward_encoder(imgs, 0.75, noise)[0].float().square().mean()),
        "encoder full": backward_of(lambda: model.encode(imgs).float().square().mean()),
        "decoder + loss": backward_of(
            lambda: model.forward_loss(imgs, model.forward_decoder(latent, ids_restore), mask)
        ),
    }
    part_flops = {k: H.counted_flops(fn) for k, fn in parts.items()}
    model.set_fused_attention(prec != "bf16")  # as the trainer picks it on a CPU; FLOPs were counted on the plain path
    t = H.interleaved(
        {
            "masked": backward_of(lambda: model(imgs, 0.75, noise)[0]),
            "full": backward_of(lambda: H.full_sequence_loss(model, imgs, noise)),
            **parts,
        },
        rounds,
    )
    speedups = H.speedups(t, "masked", "full")
    return {
        "config": name,
        "precision": prec,
        "rounds": rounds,
        "masked_img_s": batch / H.median(t["masked"]),
        "full_img_s": batch / H.median(t["full"]),
        "speedup": speedups,
        "flop_ratio": flop_ratio,
        "parts_gflop_s": {k: part_flops[k] / H.median(t[k]) / 1e9 for k in parts},
    }


def main(argv=None):
    opts = H.options(__doc__).parse_args(argv)
    info = H.header("mask")
    prec = "bf16" if resolve_precision("auto", torch.device("cpu")) == "bf16" else "fp32"
    rows = [
        measure(name, prec, opts.rounds or (3 if opts.quick or name == "base" else 7))
        for name in (["tiny"] if opts.quick else ["tiny", "base"])
    ]
    H.show(
        f"encoder on visible patches vs on all patches (fwd + bwd, {prec}, mask 0.75); speedup per round: "
        "median (range)",
        [
            "config",
            "rounds",
            "masked img/s",
            "full img/s",
            "speedup",
            "FLOP ratio",
            "speedup / FLOP ratio",
            "GFLOP/s: encoder masked",
            "encoder full",
            "decoder + loss",
        ],
        [
            [
                r["config"],
                str(r["rounds"]),
                f"{r['masked_img_s']:.1f}",
                f"{r['full_img_s']:.1f}",
                H.ratio_cell(r["speedup"]),
                f"{r['flop_ratio']:.2f}",
                f"{H.median(r['speedup']) / r['flop_ratio']:.2f}",
                *(f"{r['parts_gflop_s'][k]:.0f}" for k in ("encoder masked", "encoder full", "decoder + loss")),
            ]
            for r in rows
        ],
    )
    H.finish(opts, {"mask": rows}, info)


if __name__ == "__main__":
    main()
