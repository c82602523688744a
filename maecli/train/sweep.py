"""Did pretraining pay? `sweep()` fine-tunes the weights and the scratch baseline at several label fractions and
seeds, each pair in its own run folder inside RUN, and sums them up per fraction: top-1 as mean and standard
deviation over the seeds, and the gain. RUN/sweep.json holds the answer (and `maecli plot RUN` draws it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from ..errors import UsageError
from ..files import write_json
from ..rundir import CONFIG_NAME, SWEEP_NAME, default_out, sweep_run_dir
from .finetune import FinetuneArgs, finetune


def parse_fractions(text: str) -> list[float]:
    """ "0.01,0.1,1" -> [0.01, 0.1, 1.0]: each in (0, 1], no repeats, in the order given."""
    try:
        fractions = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--fraction {text}: give a number in (0, 1] or a comma-separated list of them") from None
    bad = [f for f in fractions if not (math.isfinite(f) and 0 < f <= 1)]
    if not fractions or bad:
        raise UsageError(f"--fraction {text}: each fraction must lie in (0, 1]")
    if len(set(fractions)) != len(fractions):
        raise UsageError(f"--fraction {text} repeats a fraction")
    return fractions


def sweep(args: FinetuneArgs, fractions: list[float], seeds: int, given: Iterable[str] = ()) -> dict:
    """Fine-tune `args.weights` and its scratch baseline for every fraction of the labels and `seeds` seeds (args.seed,
    args.seed + 1, ...; each seed draws its own labelled subset, init and data order). With `args.resume` each run
    continues where it stopped, and one not begun starts. Returns the summary that RUN/sweep.json holds, or stops
    at a signal with "signal" set to the run that was stopped."""
    if args.per_class is not None:
        raise UsageError("--per-class and a sweep of --fraction contradict each other; pick one")
    out = Path(args.out or default_out())
    runs = []
    for fraction in fractions:
        for seed in range(args.seed, args.seed + seeds):
            folder = out / sweep_run_dir(fraction, seed)
            resume = args.resume and (folder / CONFIG_NAME).exists()
            one = replace(args, out=str(folder), fraction=fraction, seed=seed, baseline=True, resume=resume)
            result = finetune(one, given=set(given) - {"fraction", "seed"} if resume else ())
            stopped = next((r for r in (result["finetuned"], result["baseline"]) if r and r["signal"]), None)
            if stopped is not None:
                return {"signal": stopped["signal"], "stopped": stopped, "out": str(out)}
            runs.append(
                {
                    "fraction": fraction,
                    "seed": seed,
                    "labels": len(result["labelled"].train.paths),
                    "pretrained": result["finetuned"]["top1"],
                    "scratch": result["baseline"]["top1"],
                    "out": str(folder),
                }
            )
            summary = summarize(runs, fractions, seeds, str(args.weights))
            write_json(out / SWEEP_NAME, summary)  # after every pair: a long sweep shows its progress
    return {**summary, "signal": None, "out": str(out)}


def mean_std(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(runs: list[dict], fractions: list[float], seeds: int, weights: str) -> dict:
    """Per fraction: the label count, each init's top-1 as mean and std over the seeds done, and the mean gain."""
    rows = []
    for fraction in fractions:
        done = [r for r in runs if r["fraction"] == fraction]
        if not done:
            continue
        row = {"fraction": fraction, "labels": round(sum(r["labels"] for r in done) / len(done)), "seeds": len(done)}
        for init in ("pretrained", "scratch"):
            mean, std = mean_std([r[init] for r in done])
            row[init] = {"mean": mean, "std": std, "runs": [r[init] for r in done]}
        row["gain"] = row["pretrained"]["mean"] - row["scratch"]["mean"]
        rows.append(row)
    return {"weights": weights, "fractions": fractions, "seeds": seeds, "rows": rows, "runs": runs}


def top1_cell(r: dict, seeds: int) -> str:
    return f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}%" if seeds > 1 else f"{100 * r['mean']:.1f}%"


def sweep_table(summary: dict) -> str:
    """The sweep as a table for stderr: per fraction, top-1 of each init as mean ± std over seeds, and the gain."""
    lines = [f"{'labels':<16} {'pretrained':>16} {'scratch':>16} {'gain':>7}"]
    for row in summary["rows"]:
        labels = f"{row['fraction']:.0%} ({row['labels']})" if row["fraction"] >= 0.01 else f"{row['fraction']:g}"
        cells = [top1_cell(row[init], row["seeds"]) for init in ("pretrained", "scratch")]
        lines.append(f"{labels:<16} {cells[0]:>16} {cells[1]:>16} {100 * row['gain']:>+7.1f}")
    seeds = summary["seeds"]
    lines.append(f"top-1 at each run's best epoch; mean ± std over {seeds} seeds" if seeds > 1 else "top-1, 1 seed")
    return "\n".join(lines)
