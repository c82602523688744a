"""`maecli embed` in real pipes (stdin in, stdout parsed), its formats and failures, and `maecli.embed`."""

import json
import os
import select
import subprocess
import sys

import bad_images as B
import numpy as np
import pytest
import torch
from conftest import PHOTO, answers_each_path_in_turn, env
from typer.testing import CliRunner

import maecli
from maecli.cli import app
from maecli.data import DataError

runner = CliRunner()
MAECLI = [sys.executable, "-m", "maecli"]


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture
def paths(photo_dir):
    return sorted(str(p) for p in photo_dir.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def model(tiny_weights):
    return maecli.load(tiny_weights)


def parse_jsonl(text):
    rows = [json.loads(line) for line in text.splitlines()]
    return [r["path"] for r in rows], np.array([r["embedding"] for r in rows], dtype=np.float32)


def read_line(stream, timeout=120):
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "no output within the timeout"
    return stream.readline()


def test_stdin_pipe_streams_in_order_and_skips_a_bad_image(tmp_path, paths, tiny_weights, model):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    first, rest = paths[:2], paths[2:]
    # without decoding workers nothing is read ahead, so the first batch must come out at once
    proc = subprocess.Popen(
        [*MAECLI, "embed", "-", "--weights", tiny_weights, "--batch-size", "2", "--workers", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdin.write("\n".join(first) + "\n")
    proc.stdin.flush()
    # streaming: the first batch comes out while stdin is still open
    line = read_line(proc.stdout)
    assert json.loads(line)["path"] == first[0]
    proc.stdin.write("\n".join([rest[0], str(bad), *rest[1:]]) + "\n")
    proc.stdin.close()
    out = line + proc.stdout.read()
    err = proc.stderr.read()
    assert proc.wait() == 0, err
    got, vectors = parse_jsonl(out)  # stdout holds nothing but data
    assert got == paths and vectors.shape == (len(paths), 32)
    assert f"skipped {bad}" in err and "1 unreadable file skipped" in err and "Traceback" not in err
    # the CLI (batches of 2) gives what the API gives in one batch
    np.testing.assert_allclose(vectors, maecli.embed(model, paths).numpy(), atol=1e-5, rtol=0)


def test_head_closes_the_pipe_quietly(tmp_path, paths, tiny_weights):
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(paths * 60) + "\n")
    cmd = (
        f"{sys.executable} -m maecli embed - -w {tiny_weights} --batch-size 1 --workers 1 < {listing} "
        f'| head -n 1; echo "status=${{PIPESTATUS[0]}}"'
    )
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["path"] == paths[0]
    assert lines[1] == "status=0"
    assert r.stderr == "", r.stderr  # no traceback, no "Broken pipe", and it stopped early: no summary


def test_formats_agree(tmp_path, photo_dir, tiny_weights):
    r = invoke("embed", photo_dir, "-w", tiny_weights)
    assert r.exit_code == 0, r.output
    names, vectors = parse_jsonl(r.stdout)
    assert "embedded 8 images (32-d, mean pool)" in r.stderr

    r = invoke("embed", photo_dir, "-w", tiny_weights, "--format", "csv", "--workers", "2", "--batch-size", "3")
    assert r.exit_code == 0, r.output
    header, *rows = r.stdout.splitlines()
    assert header == "path," + ",".join(f"e{i}" for i in range(32))
    assert [row.split(",")[0] for row in rows] == names  # input order, with decoding in 2 processes
    np.testing.assert_allclose(np.array([row.split(",")[1:] for row in rows], dtype=np.float32), vectors)

    target = tmp_path / "out" / "emb.npy"
    target.parent.mkdir()
    r = invoke("embed", photo_dir, "-w", tiny_weights, "--format", "npy", "-o", target)
    assert r.exit_code == 0, r.output
    assert r.stdout == ""
    array = np.load(target)
    assert array.dtype == np.float32 and array.shape == (8, 32)
    np.testing.assert_array_equal(array, vectors)
    paths = [json.loads(line) for line in (target.parent / "emb.npy.paths.jsonl").read_text().splitlines()]
    assert paths == names
    assert sorted(p.name for p in target.parent.iterdir()) == ["emb.npy", "emb.npy.paths.jsonl"]  # no temp files


def test_npy_needs_a_file(tiny_weights, photo_dir):
    r = invoke("embed", photo_dir, "-w", tiny_weights, "--format", "npy")
    assert r.exit_code == 2 and "-o FILE" in r.stderr and r.stdout == ""


def test_pool_normalize_and_output_file(tmp_path, photo_dir, tiny_weights, model):
    target = tmp_path / "cls.jsonl"
    r = invoke("embed", photo_dir, "-w", tiny_weights, "--pool", "cls", "--normalize", "-o", target)
    assert r.exit_code == 0, r.output
    assert r.stdout == ""
    names, vectors = parse_jsonl(target.read_text())
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    expected = maecli.embed(model, names, pool="cls", normalize=True).numpy()
    np.testing.assert_allclose(vectors, expected, atol=1e-6)


def test_strict_and_missing_paths(tmp_path, paths, tiny_weights):
    bad = tmp_path / "zero.png"
    bad.write_bytes(b"")
    r = invoke("embed", "-", "-w", tiny_weights, "--strict", input="\n".join([paths[0], str(bad), paths[1]]))
    assert r.exit_code == 1 and f"cannot read {bad}" in r.stderr and "Traceback" not in r.output
    r = invoke("embed", tmp_path / "nope.jpg", "-w", tiny_weights)
    assert r.exit_code == 1 and "nope.jpg does not exist" in r.stderr
    r = invoke("embed", "-", "-w", tiny_weights, input=f"{paths[0]}\n{tmp_path / 'gone.jpg'}\n")
    assert r.exit_code == 1 and "gone.jpg does not exist" in r.stderr and "Traceback" not in r.output
    r = invoke("embed", paths[0], "-w", tmp_path / "no-weights")
    assert r.exit_code == 1 and "weights not found" in r.stderr


def test_deterministic_across_batch_sizes_and_runs(paths, model):
    reference = maecli.embed(model, paths, batch_size=len(paths))  # default precision: what the CLI uses
    for batch_size in (1, 3, 5):
        assert (maecli.embed(model, paths, batch_size=batch_size) - reference).abs().max() <= 1e-5
    assert torch.equal(maecli.embed(model, paths, batch_size=3), maecli.embed(model, paths, batch_size=3))
    bf16 = maecli.embed(model, paths, batch_size=3, precision="bf16")  # on request: close, not identical
    assert torch.nn.functional.cosine_similarity(bf16, reference).min() > 0.99


def test_api_takes_paths_images_and_tensors(paths, model):
    from PIL import Image

    png = next(p for p in paths if p.endswith(".png"))
    from_path = maecli.embed(model, png)
    assert from_path.shape == (1, 32) and from_path.dtype == torch.float32
    with Image.open(png) as img:
        torch.testing.assert_close(maecli.embed(model, [img]), from_path, atol=1e-5, rtol=0)
    batch = torch.rand(4, 3, 40, 48)
    assert maecli.embed(model, batch).shape == (4, 32)
    with pytest.raises(DataError, match="cannot read"):
        maecli.embed(model, [__file__])


def test_embed_help_does_not_import_torch():
    code = (
        "import sys\nfrom maecli.cli import app\n"
        "for cmd in ('embed', 'probe'):\n"
        "    try:\n        app([cmd, '--help'])\n    except SystemExit:\n        pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--weights" in r.stdout and "--baseline" in r.stdout


def test_bad_image_corpus_is_embedded_or_skipped(bad_images_dir, tiny_weights):
    r = invoke("embed", bad_images_dir, "-w", tiny_weights, "--format", "csv", "--workers", "1")
    assert r.exit_code == 0, r.output
    embedded = {os.path.relpath(row.split(",")[0], bad_images_dir) for row in r.stdout.splitlines()[1:]}
    assert embedded == B.usable() | {"deleted.jpg"}, B.describe(bad_images_dir)  # nothing deleted it here
    for name in B.unusable() - {"deleted.jpg"}:
        assert f"skipped {bad_images_dir / name}" in r.stderr, name
    assert f"{len(B.unusable()) - 1} unreadable files skipped" in r.stderr and "Traceback" not in r.output


def test_a_file_that_vanishes_from_a_searched_folder_is_skipped(photo_dir, model, monkeypatch):
    import io

    from maecli import embedding

    victim = sorted(photo_dir.rglob("*.jpg"))[-1]
    real_stream = embedding.stream

    def stream_after_deleting(model, sources, **kw):  # the folder was listed; now the file goes
        victim.unlink()
        return real_stream(model, sources, **kw)

    monkeypatch.setattr(embedding, "stream", stream_after_deleting)
    out = io.StringIO()
    summary = embedding.write_embeddings(model, [str(photo_dir)], out=out)
    assert (summary["embedded"], summary["skipped"]) == (7, 1)
    assert str(victim) not in out.getvalue()


def test_stdin_paths_are_bytes_and_nothing_hangs(tmp_path, tiny_weights):
    odd = os.fsencode(tmp_path) + b"/caf\xe9 \x01.jpg"  # Latin-1, not UTF-8, and a control character
    with open(odd, "wb") as f:
        f.write(PHOTO.read_bytes())
    stdin = odd + b"\n" + str(PHOTO).encode() + b"\n"
    r = subprocess.run(
        [sys.executable, "-m", "maecli", "embed", "-", "-w", str(tiny_weights), "--workers", "2"],
        input=stdin,
        capture_output=True,
        env=env(PYTHONIOENCODING="utf-8"),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr.decode()
    paths = [os.fsencode(json.loads(line)["path"]) for line in r.stdout.decode().splitlines()]
    assert paths == [odd, str(PHOTO).encode()]

    r = subprocess.run(
        [sys.executable, "-m", "maecli", "embed", "-", "-w", str(tiny_weights), "--workers", "2"],
        input=stdin + b"/no/such.jpg\n",
        capture_output=True,
        env=env(PYTHONIOENCODING="utf-8"),
        timeout=120,
    )
    assert r.returncode == 1 and r.stderr.decode().count("error: ") == 1 and "such.jpg" in r.stderr.decode()


def test_a_slow_pipe_gets_each_vector_when_its_path_pauses(photo_dir, tiny_weights):
    paths = sorted(p for p in photo_dir.rglob("*") if p.is_file())[:3]
    for workers in ("0", "2"):  # the loader pulls batches ahead: a pause must not hold back those before it
        lines = answers_each_path_in_turn(["embed", "-w", str(tiny_weights), "--workers", workers], paths)
        assert [json.loads(line)["path"] for line in lines] == [str(p) for p in paths]


def test_a_blank_or_whitespace_line_on_stdin_names_no_file(photo_dir, tiny_weights):
    path = sorted(p for p in photo_dir.rglob("*.jpg"))[0]
    r = CliRunner().invoke(app, ["embed", "-", "-w", str(tiny_weights)], input=f"   \n\n{path}\n \t\n")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 1 and "error" not in r.stderr, r.output
