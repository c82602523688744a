#!/usr/bin/env python
"""Run maecli's benchmarks, each file in a process of its own: `python benchmarks/run.py [--quick] [--only ...]`.

A process per file, as a `maecli` command is one: the CLI's host settings are chosen once per process, and a
loader worker forked from a process that already holds gigabytes (after the step file, say) pays to copy the
pages its parent writes. `versus` runs only when named, and needs --baseline; `gpu` says "no GPU" on a CPU box.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT = ["step", "mask", "pretrain", "embed", "startup", "gpu"]
EXTRA = ["versus"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--only",
        default=",".join(DEFAULT),
        help=f"comma-separated files: {','.join(DEFAULT + EXTRA)} [default: {','.join(DEFAULT)}]",
    )
    ap.add_argument("--quick", action="store_true", help="smaller configs and fewer rounds in every file")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds for every file")
    ap.add_argument("--baseline", default=None, help="the other checkout, for versus")
    opts = ap.parse_args(argv)
    chosen = [s.strip() for s in opts.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(DEFAULT + EXTRA))
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(DEFAULT + EXTRA)}")
    failed = []
    t0 = time.time()
    for name in chosen:
        cmd = [sys.executable, str(HERE / f"{name}.py")]
        cmd += ["--quick"] if opts.quick else []
        cmd += ["--rounds", str(opts.rounds)] if opts.rounds else []
        cmd += ["--baseline", opts.baseline] if name == "versus" and opts.baseline else []
        started = time.time()
        code = subprocess.run(cmd).returncode
        print(f"[{name}: {time.time() - started:.0f} s{'' if code == 0 else f', exit {code}'}]\n", flush=True)
        if code:
            failed.append(name)
    print(
        f"{len(chosen)} benchmark(s) in {time.time() - t0:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
