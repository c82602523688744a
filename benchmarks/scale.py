#!/usr/bin/env python
"""Folders of 10k, 100k and 1M images: discovery rate, time to the first training step, and peak memory.

`python benchmarks/scale.py [--quick] [--sizes 10000,100000,1000000] [--root /tmp/maecli-scale]`. Each folder is
built under --root from hard links to the small JPEGs of ../shared/data/cifar10-10k (or examples/images), 1,000 to
a subfolder, and deleted afterwards (unless --keep). Discovery: `find_images` and the resume fingerprint
(`DataList.of(...).fingerprint()`) in this process, each timed on a warm cache (the second of two passes). Start:
the real `maecli pretrain FOLDER --steps 2` in a subprocess (tiny model at 32 px, batch 16, 2 loader workers,
no previews), timed from its start to its "step 1" line on stderr, and to its end (the final checkpoint, with the
file list, included). Memory is sampled from /proc every 50 ms: the main process's peak resident set, and the
largest private (unshared) memory of any loader worker: what a worker copied of the parent's pages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import harness as H

PER_FOLDER = 1000
FLAGS = [
    *("--model", "vit-tiny", "--img-size", "32", "--patch-size", "8", "--decoder-dim", "64", "--decoder-depth", "1"),
    *("--decoder-heads", "2", "--batch-size", "16", "--steps", "2", "--log-every", "1", "--previews", "0"),
    *("--workers", "2", "--save-every", "0", "--precision", "no"),
]


def sources() -> list[Path]:
    """A few hundred small real JPEGs to link to."""
    found = sorted((H.DATA / "cifar10-10k" / "train").glob("*/*.jpg"))[:500]
    return found or sorted((H.ROOT / "examples" / "images").glob("*.jpg"))


def build(root: Path, n: int, images: list[Path]) -> Path:
    """ROOT/n/dNNNN/iNNNNNNN.jpg: n hard links, 1,000 to a folder."""
    folder = root / str(n)
    if folder.exists():
        shutil.rmtree(folder)
    for i in range(n):
        if i % PER_FOLDER == 0:
            sub = folder / f"d{i // PER_FOLDER:04d}"
            sub.mkdir(parents=True)
        os.link(images[i % len(images)], sub / f"i{i:07d}.jpg")
    return folder


def discovery(folder: Path) -> tuple[float, float]:
    """Seconds of find_images and of the fingerprint on a warm cache (the second pass of each)."""
    from maecli.data import find_images
    from maecli.rundir import DataList

    for _ in range(2):
        t = time.perf_counter()
        paths = find_images(folder)
        found = time.perf_counter() - t
        t = time.perf_counter()
        DataList.of(folder, paths).fingerprint()
        fingerprint = time.perf_counter() - t
        del paths
    return found, fingerprint


def private_mb(pid: int) -> float:
    """A process's private (unshared) resident memory, MB."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0.0
    kb = sum(int(line.split()[1]) for line in text.splitlines() if line.startswith(("Private_Clean", "Private_Dirty")))
    return kb / 1024


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def start(folder: Path, out: Path) -> dict:
    """`maecli pretrain FOLDER --steps 2`: seconds to its first step and to its end, and peak memory."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "-m", "maecli", "pretrain", str(folder), "--out", str(out), "--overwrite", *FLAGS],
        cwd=H.ROOT,
        env=H.clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    result = {"first_step_s": None, "main_mb": 0.0, "worker_private_mb": 0.0}
    lines = []

    def read():
        for line in p.stderr:
            lines.append(line)
            if result["first_step_s"] is None and line.startswith("step 1"):
                result["first_step_s"] = time.perf_counter() - t0

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while p.poll() is None:
        result["main_mb"] = max(result["main_mb"], rss_mb(p.pid))
        for child in children(p.pid):
            result["worker_private_mb"] = max(result["worker_private_mb"], private_mb(child))
        time.sleep(0.05)
    reader.join()
    result["total_s"] = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"maecli pretrain {folder} exited with {p.returncode}: {''.join(lines)[-800:]}")
    return result


def embed_memory(folder: Path, work: Path) -> dict:
    """`maecli embed -` over every file of `folder` on stdin (a tiny encoder at 16 px, batch 64, 2 workers): the
    main process's resident memory after each tenth of the paths and at its peak, the workers' private peak, and
    whether the output came back in input order."""
    import torch

    from maecli.data import find_images
    from maecli.model import MAE, MAEConfig
    from maecli.weights import save_weights

    cfg = MAEConfig.preset("vit-tiny", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    torch.manual_seed(0)
    save_weights(MAE(cfg, decoder=False), work / "w.safetensors")
    listing = work / "paths.txt"
    with open(listing, "w") as f:
        for path in find_images(folder):
            f.write(f"{path}\n")
    n = sum(1 for _ in open(listing))
    t0 = time.perf_counter()
    with open(listing, "rb") as inp, open(work / "out.jsonl", "wb") as out:
        p = subprocess.Popen(
            [sys.executable, "-m", "maecli", "embed", "-", "-w", str(work / "w.safetensors"), "--batch-size", "64",
             "--workers", "2"],  # fmt: skip
            cwd=H.ROOT, env=H.clean_env(), stdin=inp, stdout=out, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        tenths, peak, workers = [], 0.0, 0.0
        while p.poll() is None:
            rss = rss_mb(p.pid)
            peak = max(peak, rss)
            for child in children(p.pid):
                workers = max(workers, private_mb(child))
            done = os.path.getsize(work / "out.jsonl")
            if done and len(tenths) < 10:
                lines = done // max(1, _line_bytes(work / "out.jsonl"))
                while len(tenths) < 10 and lines >= (len(tenths) + 1) * n // 10:
                    tenths.append(rss)
            time.sleep(0.2)
    in_order = all(
        json.loads(line)["path"] == path.rstrip("\n") for line, path in zip(open(work / "out.jsonl"), open(listing))
    )
    return {"paths": n, "seconds": time.perf_counter() - t0, "main_peak_mb": peak, "tenths_mb": tenths,
            "worker_private_mb": workers, "in_order": in_order, "exit": p.returncode}  # fmt: skip


def _line_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return len(f.readline())


def main(argv=None):
    ap = H.options(__doc__)
    ap.add_argument("--sizes", default=None, help="comma-separated folder sizes [default: 10000,100000,1000000]")
    ap.add_argument("--root", default="/tmp/maecli-scale", help="where the folders are built")
    ap.add_argument("--keep", action="store_true", help="keep the folders for the next run")
    ap.add_argument("--embed", type=int, default=None, metavar="N", help="only `maecli embed -` over N stdin paths")
    opts = ap.parse_args(argv)
    info = H.header("scale")
    sizes = [int(s) for s in (opts.sizes or ("100,10000" if opts.quick else "100,10000,100000,1000000")).split(",")]
    root = Path(opts.root)
    root.mkdir(parents=True, exist_ok=True)
    images = sources()
    if opts.embed:
        return embed_only(opts, root, images, info)
    rows, results = [], {}
    for n in sizes:
        folder = root / str(n)
        if not (opts.keep and folder.is_dir()):
            build(root, n, images)
        found, fingerprint = discovery(folder)
        run = start(folder, root / f"run-{n}")
        shutil.rmtree(root / f"run-{n}", ignore_errors=True)
        if not opts.keep:
            shutil.rmtree(folder)
        results[n] = {"find_s": found, "fingerprint_s": fingerprint, **run}
        rows.append(
            [
                f"{n:,}",
                f"{n / found:,.0f}",
                f"{found:.2f}",
                f"{fingerprint:.2f}",
                H.fmt(run["first_step_s"]),
                f"{run['total_s']:.1f}",
                f"{run['main_mb']:.0f}",
                f"{run['worker_private_mb']:.0f}",
            ]
        )
        H.console.print(f"{n:,} files: done, load {H.load()}")
    H.show(
        "a folder of N hard-linked JPEGs: discovery (in process, warm cache), `maecli pretrain --steps 2` (subprocess)",
        ["files", "found/s", "find s", "fingerprint s", "first step s", "total s", "main peak MB", "worker private MB"],
        rows,
    )
    H.finish(opts, {"scale": results}, info)


def embed_only(opts, root: Path, images: list[Path], info: dict) -> None:
    folder = root / str(opts.embed)
    if not (opts.keep and folder.is_dir()):
        build(root, opts.embed, images)
    work = root / "embed"
    work.mkdir(exist_ok=True)
    r = embed_memory(folder, work)
    shutil.rmtree(work)
    if not opts.keep:
        shutil.rmtree(folder)
    H.show(
        "`maecli embed -` over N paths on stdin: main-process RSS (MB) after each tenth of the output",
        ["paths", "seconds", "exit", "in order", "RSS by tenths", "main peak MB", "worker private MB"],
        [[f"{r['paths']:,}", f"{r['seconds']:.0f}", str(r["exit"]), str(r["in_order"]),
          " ".join(f"{x:.0f}" for x in r["tenths_mb"]), f"{r['main_peak_mb']:.0f}", f"{r['worker_private_mb']:.0f}"]],
    )  # fmt: skip
    H.finish(opts, {"embed": r}, info)


if __name__ == "__main__":
    main()
