#!/usr/bin/env python
"""This checkout against another one (--baseline DIR), side by side, each through its own code in subprocesses.

`python benchmarks/versus.py --baseline ../before [--quick]`. Per round, for each measurement, the two checkouts
run back to back in alternating order (ABBA): the tiny training step in fp32 and in bf16 (a child process that
imports the checkout's maecli and applies its CLI's host settings), `maecli pretrain` end to end on
cifar10-10k/train with the same explicit flags (images/s from metrics.jsonl after the first logged interval),
`maecli embed` over flowers-160/val (images/s of the whole command, start-up included) and `maecli --help`.
The result is new / old per round: its median and range.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import harness as H

# Timed steps per child, after one warm-up step: few, since bf16 on a CPU without bf16 units takes seconds a step
BF16_STEPS, FP32_STEPS = 1, 3


def child_step(checkout: str, precisions: list[str]) -> None:
    """In a child process: the tiny config's training step through `checkout`'s own maecli, as its `maecli
    pretrain` runs it on a CPU; prints {precision: images/s} as JSON."""
    sys.path.insert(0, checkout)
    try:  # the redesigned layout: host tuning in maecli/host.py
        from maecli import host

        host.configure_openmp()
        keep_freed_memory = host.keep_freed_memory
    except ImportError:  # before it: the CLI module and maecli/heap.py
        import maecli.cli
        from maecli import heap

        maecli.cli.configure_openmp()
        keep_freed_memory = heap.keep_freed_memory
    import torch

    from maecli.model import MAE, MAEConfig

    keep_freed_memory()
    fields, batch = H.CONFIGS["tiny"]
    cfg = MAEConfig(**fields)
    torch.manual_seed(0)
    model = MAE(cfg)
    cpu = torch.device("cpu")
    try:
        try:
            from maecli.train.loop import make_optimizer
        except ImportError:  # the layout before maecli/train/
            from maecli.loop import make_optimizer
        from maecli.model import no_weight_decay_groups

        optimizer = make_optimizer(no_weight_decay_groups(model, 0.05), 1e-4, cpu, betas=(0.9, 0.95))
    except ImportError:
        from maecli.train import make_optimizer

        optimizer = make_optimizer(model, 1e-4, 0.05, cpu)
    imgs, noise = H.inputs(cfg, batch)
    out = {}
    for prec in precisions:
        if hasattr(model, "set_fused_attention"):  # chosen once by the trainer; before, per forward by the model
            from maecli.runtime import fused_attention_pays

            model.set_fused_attention(fused_attention_pays(cpu, "bf16" if prec == "bf16" else "no"))
        step = H.train_step(optimizer, lambda: model(imgs, 0.75, noise)[0], prec)
        step()
        steps = BF16_STEPS if prec == "bf16" else FP32_STEPS
        t = time.perf_counter()
        for _ in range(steps):
            step()
        out[prec] = batch * steps / (time.perf_counter() - t)
    print(json.dumps(out))


def step_rates(checkout: Path, precisions: list[str]) -> dict:
    import subprocess

    done = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child-step",
            str(checkout),
            "--precisions",
            ",".join(precisions),
        ],
        env=H.clean_env(checkout),
        cwd=checkout,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"step child in {checkout} exited with {done.returncode}: {done.stderr[-800:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main(argv=None):
    ap = H.options(__doc__)
    ap.add_argument("--baseline", required=False, help="the other checkout (its repository root)")
    ap.add_argument("--child-step", default=None, metavar="CHECKOUT", help=argparse.SUPPRESS)
    ap.add_argument("--precisions", default="fp32,bf16", help="precisions of the step measurement [default: both]")
    ap.add_argument(
        "--only",
        default="step,pretrain,embed,help",
        help="comma-separated measurements [default: step,pretrain,embed,help]",
    )
    opts = ap.parse_args(argv)
    if opts.child_step:
        return child_step(opts.child_step, opts.precisions.split(","))
    info = H.header("versus")
    if not opts.baseline or not (Path(opts.baseline) / "maecli").is_dir():
        H.console.print("versus: skipped: give --baseline DIR, another checkout of maecli (its repository root)")
        return
    trees = {"new": H.ROOT, "old": Path(opts.baseline).resolve()}
    H.console.print(f"new: {trees['new']}\nold: {trees['old']}")
    rounds = opts.rounds or (3 if opts.quick else 5)
    steps, log_every, n_embed = 9, 3, 128
    only = opts.only.split(",")
    cifar = H.data_dir("cifar10-10k/train", "versus: pretrain") if "pretrain" in only else None
    flowers = H.data_dir("flowers-160/val", "versus: embed") if "embed" in only else None
    rates: dict[tuple[str, str], list[float]] = {}

    def record(what, tree, value):
        rates.setdefault((what, tree), []).append(value)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        precisions = opts.precisions.split(",")
        measurements = {
            "step": lambda tree: [record(f"step {p}", tree, v) for p, v in step_rates(trees[tree], precisions).items()]
        }
        if cifar:

            def pretrain(tree):
                run = tmp / f"run-{tree}"
                H.run_cli(
                    [
                        "pretrain",
                        cifar,
                        "--out",
                        run,
                        "--overwrite",
                        *H.TINY_FLAGS,
                        "--steps",
                        steps,
                        "--log-every",
                        log_every,
                        "--previews",
                        0,
                        "--save-every",
                        0,
                    ],
                    trees[tree],
                )
                record("pretrain", tree, H.metrics_rate(run))

            measurements["pretrain"] = pretrain
        if flowers:
            listing = embed_inputs(tmp, flowers, n_embed)

            def embed(tree):
                done = H.run_cli(
                    [
                        "embed",
                        "-",
                        "--weights",
                        tmp / "vit-tiny-224.safetensors",
                        "--batch-size",
                        64,
                        "--precision",
                        "no",
                        "-o",
                        tmp / f"emb-{tree}.jsonl",
                    ],
                    trees[tree],
                    stdin=listing,
                )
                record("embed", tree, n_embed / done.seconds)
                record("embed peak RSS MB", tree, done.max_rss_mb)

            measurements["embed"] = embed
        measurements["help"] = lambda tree: record("--help s", tree, H.run_cli(["--help"], trees[tree]).seconds)

        measurements = {k: v for k, v in measurements.items() if k in only}
        for r in range(rounds):
            for fn in measurements.values():
                for tree in ["new", "old"] if r % 2 == 0 else ["old", "new"]:
                    fn(tree)
            H.console.print(
                f"round {r + 1}/{rounds}, load {H.load()}; new/old: "
                + ", ".join(
                    f"{what} {rates[what, 'new'][-1]:.3g}/{rates[what, 'old'][-1]:.3g}" for what in measured(rates)
                )
            )

    rows, results = [], {}
    for what in measured(rates):
        new, old = rates[what, "new"], rates[what, "old"]
        per_round = [a / b for a, b in zip(new, old)]
        results[what] = {"new": new, "old": old, "new_over_old": per_round}
        unit = "s" if what.endswith(" s") else "MB" if "MB" in what else "img/s"
        rows.append(
            [
                what.removesuffix(" s").removesuffix(" MB"),
                unit,
                f"{H.median(new):.3g}",
                f"{H.median(old):.3g}",
                H.ratio_cell(per_round),
                str(len(per_round)),
            ]
        )
    H.show(
        f"this checkout (new) vs {trees['old']} (old), medians; new/old per round: median (range); "
        "img/s: higher is better, s and MB: lower",
        ["measurement", "unit", "new", "old", "new / old", "rounds"],
        rows,
    )
    H.finish(opts, {"versus": results, "baseline": str(trees["old"]), "rounds": rounds}, info)


def measured(rates: dict) -> list[str]:
    return [what for what, tree in rates if tree == "new"]


def embed_inputs(tmp: Path, root: Path, n: int) -> Path:
    """Weights both checkouts read (a seeded vit-tiny/16 at 224 px, saved by this checkout's maecli) and a list
    of the first `n` images under `root`, for stdin."""
    import torch

    from maecli.data import find_images
    from maecli.model import MAE, MAEConfig
    from maecli.weights import save_weights

    torch.manual_seed(0)
    save_weights(MAE(MAEConfig.preset("vit-tiny", img_size=224, patch_size=16)), tmp / "vit-tiny-224.safetensors")
    listing = tmp / "images.txt"
    listing.write_text("".join(f"{p}\n" for p in find_images(root)[:n]))
    return listing


if __name__ == "__main__":
    main()
