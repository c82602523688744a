"""Tar shards: `maecli shard` writes a folder into them, pretrain streams them and resumes each stream where the
checkpoint left it (after SIGKILL too), embed reads them with one line per image; bad members skipped and counted."""

import io
import json
import signal
import tarfile

import pytest
import torch
from conftest import TINY, invoke, one_line_error, start, stop_midway

from maecli.shards import Positions, ShardTraining, Streams, expand, samples

pytest.importorskip("webdataset")


@pytest.fixture
def shards(tmp_path, photo_dir) -> str:
    """The 8 photos in shards of 3, the last with a broken member added: returns the brace pattern."""
    r = invoke("shard", photo_dir, tmp_path / "shards", "--per-shard", "3")
    assert r.exit_code == 0, r.output
    pattern = r.stdout.strip()
    assert pattern.endswith("shard-{000000..000002}.tar") and "8 images into 3 shard(s)" in r.stderr
    last = expand(pattern)[-1]
    with tarfile.open(last, "a") as tar:
        info = tarfile.TarInfo("broken.jpg")
        info.size = 10
        tar.addfile(info, io.BytesIO(b"not a jpeg"))
    return pattern


def test_shards_hold_the_folder_in_its_order(shards, photo_dir):
    names = [name for path in expand(shards) for name, _, _ in samples(path)]
    assert names[:8] == [p.relative_to(photo_dir).as_posix() for p in sorted(photo_dir.rglob("*.*"))]
    assert names[8] == "broken.jpg"
    one_line_error(invoke("shard", photo_dir, shards.rsplit("/", 1)[0]), 1, "already holds")


def batches_of(streams, mine, start=None, workers=0):
    dataset = ShardTraining(streams, mine, 32, 3, 2, start)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    state = type("State", (), {"extra": {}})()
    return Positions(loader, state), state


def test_a_resumed_stream_goes_on_with_the_next_sample(shards):
    streams = Streams(expand(shards), total=2, seed=0, buffer=4)
    uninterrupted, _ = batches_of(streams, [0, 1])
    it = iter(uninterrupted)
    full = [next(it) for _ in range(12)]  # several epochs of both streams
    first, state = batches_of(streams, [0, 1])
    it = iter(first)
    for _ in range(5):
        next(it)
    positions = json.loads(json.dumps(state.extra["shards"]))  # as state.json keeps them
    resumed, _ = batches_of(streams, [0, 1], start=positions)
    it = iter(resumed)
    again = [next(it) for _ in range(6)]
    # the streams take turns (0, 1, 0, 1, 0 were taken): each goes on with the same crops of the same images as the
    # run that never stopped, stream 0 from its 4th batch and stream 1 from its 3rd
    for (x, failed), (want, want_failed) in [*zip(again[0::2], full[6::2]), *zip(again[1::2], full[5::2])]:
        assert torch.equal(x, want) and failed == want_failed
    seen = [f for _, failed in full for f, _ in failed]
    assert any(name.endswith("#broken") for name in seen)  # the bad member is reported, not a crash


def test_pretrain_on_shards_resumes_after_sigkill_and_embeds(tmp_path, shards):
    out = tmp_path / "run"
    args = ["pretrain", shards, "--out", out, "--steps", "400", "--save-every", "3", "--log-every", "1"]
    args += ["--previews", "1", *[a for a in TINY if a not in ("--workers", "0")], "--workers", "2"]
    proc = start(args, tmp_path / "log")
    assert stop_midway(proc, out, signal.SIGKILL, group=True, after_step=4) == -signal.SIGKILL
    saved = sorted((out / "checkpoints").glob("step-*"))[-1]
    positions = json.loads((saved / "state.json").read_text())["extra"]["shards"]
    assert positions and all(len(v) == 2 for v in positions.values())
    r = invoke("pretrain", shards, "--out", out, "--resume", "--steps", "12")
    assert r.exit_code == 0, r.output
    assert f"resuming {out} from step {int(saved.name[5:])}" in r.stderr
    final = json.loads((out / "checkpoints" / "step-00000012" / "state.json").read_text())
    assert [k.rsplit("/", 1)[1] for k in final["skipped"]] == ["shard-000002.tar#broken"]  # warned and counted once


def test_embed_reads_shards_one_line_per_image(shards, tiny_weights):
    r = invoke("embed", shards, "-w", tiny_weights)
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) == 8 and all(".tar#" in row["path"] for row in lines)
    assert "skipped" in r.stderr and "#broken" in r.stderr
    one_line_error(invoke("embed", shards.replace("000002", "000009"), "-w", tiny_weights), 1, "do not exist")
