#!/usr/bin/env python
"""End-to-end `maecli embed` against the encoder's forward alone, and the command's peak memory.

`python benchmarks/embed.py [--quick]`. vit-tiny/16 at 224 px over the first 512 (--quick: 128) images of
flowers-160/val: the real CLI in a subprocess (paths on stdin, jsonl to a file, fp32, its default loader workers;
start-up, loading the weights and decoding included), alternating with `model.encode` + mean pooling on ready
(64, 3, 224, 224) tensors in this process. Peak RSS is the largest of the command and its loader workers.
"""

from __future__ import annotations

import harness as H

H.act_like_the_cli()

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from maecli.data import find_images  # noqa: E402
from maecli.model import MAE, MAEConfig  # noqa: E402
from maecli.weights import save_weights  # noqa: E402

BATCH = 64


def main(argv=None):
    opts = H.options(__doc__).parse_args(argv)
    info = H.header("embed")
    data = H.data_dir("flowers-160/val", "embed")
    if data is None:
        return H.finish(opts, {"embed": "skipped: no data"}, info)
    n = 128 if opts.quick else 512
    rounds = opts.rounds or (3 if opts.quick else 5)
    cfg = MAEConfig.preset("vit-tiny", img_size=224, patch_size=16)
    torch.manual_seed(0)
    model = MAE(cfg, decoder=False).eval()
    x = torch.randn(BATCH, 3, cfg.img_size, cfg.img_size)
    rss = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_weights(model, tmp / "model.safetensors")
        listing = tmp / "images.txt"
        listing.write_text("".join(f"{p}\n" for p in find_images(data)[:n]))

        def end_to_end():
            done = H.run_cli(
                ["embed", "-", "--weights", tmp / "model.safetensors", "--batch-size", BATCH, "-o", tmp / "e.jsonl"],
                stdin=listing,
            )
            rss.append(done.max_rss_mb)

        def forward_only():  # fp32, as embed's default: a vector does not depend on its batch then
            with torch.inference_mode():
                for _ in range(-(-n // BATCH)):
                    model.encode(x)[:, 1:].mean(dim=1)

        # no warm-up round: every embed command starts cold anyway (imports, weights, loader workers)
        t = H.interleaved({"embed": end_to_end, "forward": forward_only}, rounds, warmup=0)
    ratio = H.speedups(t, "embed", "forward")
    row = {
        "model": "vit-tiny/16 @ 224 px",
        "images": n,
        "rounds": rounds,
        "embed_img_s": n / H.median(t["embed"]),
        "forward_img_s": n / H.median(t["forward"]),
        "ratio": ratio,
        "peak_rss_mb": rss,
    }
    H.show(
        "end-to-end `maecli embed` (start-up included) vs the encoder's forward alone, images/s; ratio per "
        "round: median (range)",
        ["model", "images", "rounds", "embed", "forward", "ratio", "peak RSS MB"],
        [
            [
                row["model"],
                str(n),
                str(rounds),
                f"{row['embed_img_s']:.1f}",
                f"{row['forward_img_s']:.1f}",
                H.ratio_cell(ratio),
                f"{H.median(rss):.0f} ({min(rss):.0f}-{max(rss):.0f})",
            ]
        ],
    )
    H.finish(opts, {"embed": row}, info)


if __name__ == "__main__":
    main()
