#!/usr/bin/env python
"""`maecli --help` wall time, against a bare `python -c pass`: what a user waits for before anything runs.

`python benchmarks/startup.py [--quick]`. Both in fresh subprocesses with a clean environment, alternating.
"""

from __future__ import annotations

import subprocess
import sys

import harness as H


def main(argv=None):
    opts = H.options(__doc__).parse_args(argv)
    info = H.header("startup")
    env = H.clean_env()

    def bare():
        subprocess.run([sys.executable, "-c", "pass"], env=env, cwd=H.ROOT, check=True)

    rounds = opts.rounds or (5 if opts.quick else 9)
    t = H.interleaved({"maecli --help": lambda: H.run_cli(["--help"]), "python -c pass": bare}, rounds)
    rows = [[name, str(rounds), f"{H.median(s):.3f}", f"{min(s):.3f}-{max(s):.3f}"] for name, s in t.items()]
    H.show("start-up, seconds", ["command", "rounds", "median", "range"], rows)
    H.finish(opts, {"startup": {k: v for k, v in t.items()}}, info)


if __name__ == "__main__":
    main()
