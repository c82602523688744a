#!/usr/bin/env python
"""End-to-end `maecli pretrain` from JPEG folders against the model-only training step at the same config.

`python benchmarks/pretrain.py [--quick]`. The real CLI in a subprocess with default settings (precision auto,
the default loader workers), images/s from its metrics.jsonl after the first logged interval (start-up, workers
forking); alternating with a block of as many model-only steps in this process on ready tensors. The ratio says
how much of the model's speed a real run keeps: what the loader, the loop and logging cost.
"""

from __future__ import annotations

import harness as H

H.act_like_the_cli()

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from maecli.runtime import resolve_precision  # noqa: E402
from maecli.train.pretrain import TrainArgs, build_config  # noqa: E402

TINY = dict(model="vit-tiny", patch_size=8, decoder_dim=128, decoder_depth=4, decoder_heads=4)
# (label, data folder under ../shared/data, TrainArgs fields)
CASES = [
    ("tiny @ 64 px", "cifar10-10k/train", dict(TINY, img_size=64, batch_size=64)),
    ("tiny @ 32 px, patch 4", "cifar10-10k/train", dict(TINY, img_size=32, batch_size=64, patch_size=4)),
    ("vit-tiny/16 @ 224 px, batch 32", "flowers-160/train", dict(TINY, img_size=224, batch_size=32, patch_size=16)),
]


def flags(fields: dict) -> list[str]:
    return [x for k, v in fields.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def model_only(fields: dict, steps: int):
    """`steps` training steps of the model the CLI builds from these flags, on random tensors, as the CLI runs
    them (its precision for `auto`, its optimizer and attention choice)."""
    from maecli.model import MAE

    cfg = build_config(TrainArgs(data="", **fields))
    torch.manual_seed(0)
    model = MAE(cfg)
    prec = "bf16" if resolve_precision("auto", torch.device("cpu")) == "bf16" else "fp32"
    imgs, noise = H.inputs(cfg, fields["batch_size"])
    step = H.maecli_step(model, H.optimizer_for(model, torch.device("cpu")), imgs, noise, prec)

    def block():
        for _ in range(steps):
            step()

    return block


def measure(label: str, data: Path, fields: dict, steps: int, log_every: int, rounds: int) -> dict:
    timed = steps - log_every
    cli_rates = []
    with tempfile.TemporaryDirectory() as tmp:

        def end_to_end():
            run = Path(tmp) / "run"
            H.run_cli(
                [
                    "pretrain",
                    data,
                    "--out",
                    run,
                    "--overwrite",
                    *flags(fields),
                    "--steps",
                    steps,
                    "--log-every",
                    log_every,
                    "--previews",
                    0,
                    "--save-every",
                    0,
                ]
            )
            cli_rates.append(H.metrics_rate(run))

        t = H.interleaved({"pretrain": end_to_end, "model": model_only(fields, timed)}, rounds, warmup=0)
    model_rates = [fields["batch_size"] * timed / s for s in t["model"]]
    return {
        "case": label,
        "data": str(data.relative_to(H.DATA)),
        "rounds": rounds,
        "pretrain_img_s": cli_rates,
        "model_only_img_s": model_rates,
        "ratio": [a / b for a, b in zip(cli_rates, model_rates)],
    }


def main(argv=None):
    opts = H.options(__doc__).parse_args(argv)
    info = H.header("pretrain")
    steps, log_every = (9, 3) if opts.quick else (12, 3)
    rows = []
    for label, rel, fields in CASES[:1] if opts.quick else CASES:
        data = H.data_dir(rel, f"pretrain {label}")
        if data is not None:
            rows.append(measure(label, data, fields, steps, log_every, opts.rounds or (3 if opts.quick else 5)))
    H.show(
        f"end-to-end `maecli pretrain` ({steps} steps, timed after step {log_every}) vs the model-only step, "
        "images/s; ratio per round: median (range)",
        ["case", "data", "rounds", "pretrain", "model only", "ratio"],
        [
            [
                r["case"],
                r["data"],
                str(r["rounds"]),
                f"{H.median(r['pretrain_img_s']):.1f}",
                f"{H.median(r['model_only_img_s']):.1f}",
                H.ratio_cell(r["ratio"]),
            ]
            for r in rows
        ],
    )
    H.finish(opts, {"pretrain": rows}, info)


if __name__ == "__main__":
    main()
